"""Direct preference optimisation (Rafailov et al. 2023; MiniCPM-DPO, MiniCPM paper section 7).

loss = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))) per pair, plus
dpo.sft_weight x the chosen answer's mean token loss (OpenBMB: beta 0.1, weight 0.5). The reference is a
frozen copy of init_from's params; its log-probs are computed once per batch, before the step, and ride in
the batch (`ref_logp` [rows, 2]). Everything else is a pre-training run (mct.run.training_run: resume, hooks,
checkpoints, SIGTERM save); eval_loss is the held-out chosen answers' token loss.
"""

import dataclasses
import threading

import jax
import jax.numpy as jnp

from mct.config.posttrain import DPORunConfig
from mct.model.decoder import MiniCPM
from mct.model.loss import token_losses
from mct.parallel.distributed import global_batch
from mct.posttrain.preference import PairBatches, eval_batches, pair_rows
from mct.posttrain.sft import file_weights, init_tokenizer, with_source_data
from mct.run.init_from import load_init_params
from mct.run.training_run import RunData, train
from mct.train.step import Objective
from mct.train.trainer import TrainSetup


def sequence_logps(model: MiniCPM, batch: dict) -> jnp.ndarray:
    """[rows, 2]: the log-probability of each row's chosen and rejected answer (their masked targets)."""
    logp = -token_losses(model, batch)  # [rows, seq]
    return jnp.stack([(logp * batch["loss_mask"]).sum(1), (logp * batch["rejected_mask"]).sum(1)], axis=1)


def dpo_terms(policy: jnp.ndarray, reference: jnp.ndarray, beta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(loss [rows], reward margin [rows]) of policy and reference log-probs [rows, (chosen, rejected)]."""
    rewards = beta * (policy - reference)  # [rows, 2]
    margin = rewards[:, 0] - rewards[:, 1]
    return -jax.nn.log_sigmoid(margin), margin


def dpo_objective(beta: float, sft_weight: float) -> Objective:
    """The DPO objective: sums over the pairs of the batch (rows with both answers), counted per pair."""

    def objective(model: MiniCPM, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray, dict]:
        policy, reference = sequence_logps(model, batch), batch["ref_logp"]
        chosen_tokens = batch["loss_mask"].sum(1)  # [rows]
        valid = ((chosen_tokens > 0) & (batch["rejected_mask"].sum(1) > 0)).astype(jnp.float32)
        loss, margin = dpo_terms(policy, reference, beta)
        sft = -policy[:, 0] / jnp.maximum(chosen_tokens, 1.0)  # the chosen answer's mean token loss
        total = jnp.sum(valid * (loss + sft_weight * sft))
        extras = {
            "dpo_loss": jnp.sum(valid * loss),
            "sft_loss": jnp.sum(valid * sft),
            "reward_margin": jnp.sum(valid * margin),
            "reward_accuracy": jnp.sum(valid * (margin > 0)),
            "kl_proxy": jnp.sum(valid * (policy - reference).mean(1)),  # mean log pi/ref of the answers
        }
        return total, jnp.sum(valid), extras

    return objective


class PreferenceData(RunData):
    """Pair rows of dpo.path; the step gets the frozen reference's log-probs of each batch."""

    continues_source_data = False  # its stream is preference pairs, never the source's documents

    def __init__(self, config: DPORunConfig):
        self.tokenizer = init_tokenizer(config)
        self.rows = pair_rows(
            config.dpo.path,
            self.tokenizer,
            seq_len=config.data.seq_len,
            eval_fraction=config.data.chat.eval_fraction,
        )

    def train_batches(self, setup: TrainSetup, state: dict | None):
        batches = PairBatches(
            self.rows["train"],
            global_batch=setup.config.train.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            seed=setup.config.data.seed,
            tokenizer=self.tokenizer,
        )
        if state is not None:
            batches.set_state(state)
        return batches

    def eval_sets(self, setup: TrainSetup) -> dict[str, list]:
        c = setup.config
        local = eval_batches(
            self.rows["eval"],
            batch_size=c.train.batch_size,
            num_batches=c.data.eval_batches,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return {"eval_loss": [global_batch(b, setup.batch_sharding) for b in local]}

    def merge(self, states: list[dict]) -> dict:
        return states[0]  # every process is at the same step of the same permutation

    def prepare(self, setup: TrainSetup) -> TrainSetup:
        reference = load_init_params(setup.config.init_from, setup)  # its own buffers: never donated
        model = setup.model
        ref_fn = jax.jit(lambda p, b: sequence_logps(model.bind(p), b), out_shardings=setup.batch_sharding)
        step_fn = setup.step_fn

        def step_with_reference(state: dict, batch: dict, step) -> tuple[dict, dict]:
            return step_fn(state, {**batch, "ref_logp": ref_fn(reference, batch)}, step)

        return dataclasses.replace(setup, step_fn=step_with_reference)


def dpo_config(config: DPORunConfig) -> DPORunConfig:
    """`config` reading its tokenizer's dataset from the source run's mixture (kept in the workdir), with
    schedule.lr_from_init applied."""
    file_weights(config.dpo.path, (), "dpo")  # the files are read in turn, every pair once per epoch
    return with_source_data(config)


def train_dpo(config: DPORunConfig, devices: list | None = None, stop: threading.Event | None = None) -> dict:
    """Runs (or resumes) DPO in config.workdir; returns the last logged metrics and eval losses."""
    init_tokenizer(config)  # init_from is set and readable before anything else
    config = dpo_config(config)
    return train(
        config,
        devices,
        stop,
        objective=dpo_objective(config.dpo.beta, config.dpo.sft_weight),
        data=PreferenceData(config),
    )
