"""RL entry point with chunk-wise rollout (MiniCPM4 report section 3.2):
python -m mct.rl --config experiments/configs/tiny_cpu_rl.py --config.init_from=SFT_WORKDIR

Every step: rl.prompts_per_step new prompts enter as groups of rl.group_size trajectories, merged with the
trajectories carried over in the replay buffer; one chunk (mct.posttrain.rollout) is decoded with the current params;
finished trajectories get their reward; every group whose G trajectories are all finished leaves the buffer,
gets group-normalised advantages, is dropped when uniform (dynamic sampling) and trains in mini-batches of
train.batch_size rows through `mct.train.trainer.build`'s step with the GRPO objective (mct/posttrain/grpo.py). The
reference policy is the params of the last multiple of rl.ref_refresh_steps; the lr is rl.lr, constant.

A checkpoint holds state = {params, opt_state, ref_params} and a JSON item with the replay buffer (tokens,
cached log-probs, policy versions), the prompt cursor and the group counter; sampling keys derive from
(seed, step), so a resumed run makes the same rollouts and losses as an uninterrupted one. SIGTERM saves.
"""

import dataclasses
import logging
import math
import pathlib
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from data_pipelines.chat import encode_chat, im_end_id
from data_pipelines.shards import DatasetError
from data_pipelines.tokenizer import EOS, read_tokenizer_file, special_token_ids
from mct.config.run import Config
from mct.errors import (
    ConfigError,
    TrainingDiverged,
    UserError,
)
from mct.infer.decoding import Sampling
from mct.parallel.distributed import global_batch, stop_agreed
from mct.posttrain.chat_data import arithmetic_problem, read_jsonl
from mct.posttrain.grpo import accepted_groups, group_advantages, grpo_objective, token_logprobs
from mct.posttrain.rewards import ANSWER_KEYS, REWARDS, Reward, safe_reward
from mct.posttrain.rollout import Trajectory, rollout_chunk
from mct.run.checkpoint import Checkpointer, run_meta
from mct.run.init_from import init_from_state, parse_spec
from mct.run.pretrain import check_workdir, first_dataset, job_lock
from mct.train.metrics import MetricsWriter
from mct.train.trainer import TrainSetup, build

log = logging.getLogger("mct.train")


def arithmetic_items(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """The embedded task: n distinct questions of SFT's generated arithmetic (mct.posttrain.chat_data), none in exclude,
    with their answers."""
    rng, items, seen = np.random.default_rng(seed), [], set(exclude)
    while len(items) < n:
        question, value = arithmetic_problem(rng)
        if question not in seen:
            seen.add(question)
            items.append({"prompt": question, "answer": str(value)})
    return items


def read_prompts(path: str, reward: str) -> list[dict]:
    """The items of a prompts JSONL; DatasetError naming the file and line of a malformed one."""
    key = ANSWER_KEYS[reward]
    items = []
    for where, item in read_jsonl(path, ("prompt", key)):
        if not isinstance(item["prompt"], str):
            raise DatasetError(f'{where}: needs {{"prompt": str, "{key}": ...}} for reward {reward}')
        items.append(item)
    if not items:
        raise UserError(f"config rl.prompts={path}: no prompts in the file")
    return items


def encode_prompts(items: list[dict], tokenizer: Tokenizer, max_tokens: int, source: str) -> list[list[int]]:
    """Each item's prompt as a user turn plus the assistant header (data_pipelines.chat); too long is a UserError."""
    encoded = []
    for i, item in enumerate(items):
        ids, _ = encode_chat(
            tokenizer, [{"role": "user", "content": item["prompt"]}], add_generation_prompt=True
        )
        if len(ids) > max_tokens:
            raise UserError(
                f"{source}: prompt {i} has {len(ids)} tokens, over rl.max_prompt_tokens={max_tokens}"
            )
        encoded.append(ids)
    return encoded


@dataclasses.dataclass
class RLState:
    """The host side of an RL run that a checkpoint keeps (JSON): replay buffer, prompt cursor, group ids."""

    cursor: int = 0  # prompts drawn so far (the order is a seeded permutation per epoch)
    next_group: int = 0
    groups: dict[int, int] = dataclasses.field(default_factory=dict)  # group -> prompt index
    buffer: list[Trajectory] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {"cursor": self.cursor, "next_group": self.next_group,
                "groups": {str(g): i for g, i in self.groups.items()},
                "buffer": [dataclasses.asdict(t) for t in self.buffer]}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> "RLState":
        return cls(d["cursor"], d["next_group"], {int(g): i for g, i in d["groups"].items()},
                   [Trajectory(**t) for t in d["buffer"]])  # fmt: skip


def draw_prompts(state: RLState, n_items: int, count: int, seed: int) -> list[int]:
    """The next `count` prompt indices: a fresh seeded permutation of the prompts every epoch."""
    out = []
    for _ in range(count):
        epoch, offset = divmod(state.cursor, n_items)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_items)[offset]))
        state.cursor += 1
    return out


def training_rows(trajectories: list[Trajectory], advantages: list[float], seq_len: int,
                  overlong_filter: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """Rows [n, seq_len] of prompt + response: the model reads tokens and predicts targets; loss_mask,
    old_logp and advantages sit on the positions whose target is a response token (0 on overlong ones)."""
    n = len(trajectories)
    rows = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    rows |= {k: np.zeros((n, seq_len), np.float32) for k in ("loss_mask", "old_logp", "advantages")}
    for r, (t, a) in enumerate(zip(trajectories, advantages)):
        seq = t.prompt + t.response
        length, first = len(seq) - 1, len(t.prompt) - 1  # inputs; the first index predicting a response token
        rows["tokens"][r, :length], rows["targets"][r, :length] = seq[:-1], seq[1:]
        rows["positions"][r, :length], rows["segment_ids"][r, :length] = np.arange(length), 1
        rows["old_logp"][r, first:length] = t.logprobs
        rows["advantages"][r, first:length] = a
        rows["loss_mask"][r, first:length] = 0.0 if (overlong_filter and t.truncated) else 1.0
    return rows


def rl_config(config: Config) -> Config:
    """The run config with RL's constant lr (rl.lr, no warmup or decay)."""
    schedule = dataclasses.replace(config.schedule, warmup_steps=0, decay_steps=0, lr_from_init=False)
    return config.replace(optimizer=dataclasses.replace(config.optimizer, lr=config.rl.lr), schedule=schedule)


def check_rl_fit(config: Config) -> None:
    r, m = config.rl, config.model
    total = r.max_prompt_tokens + r.max_response_tokens
    if total > config.data.seq_len:
        raise ConfigError(f"config rl.max_prompt_tokens + rl.max_response_tokens = {total} exceeds "
                          f"data.seq_len={config.data.seq_len} (the training rows)")  # fmt: skip
    if total > m.max_position:
        raise ConfigError(f"config rl.max_prompt_tokens + rl.max_response_tokens = {total} exceeds "
                          f"model.max_position={m.max_position}")  # fmt: skip
    if jax.process_count() > 1:
        raise ConfigError("mct.rl runs in one process (its devices may be several); got a multi-process job")


def run_tokenizer(config: Config) -> pathlib.Path:
    """The tokenizer.json of init_from's workdir, else of the data mixture's first dataset."""
    if config.init_from:
        path = parse_spec(config.init_from)[0] / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"config init_from={config.init_from}: no tokenizer.json in {path.parent}")
        return path
    return first_dataset(config) / "tokenizer.json"


class RLRun:
    """One RL run in a locked workdir: the state, the buffer, one step at a time."""

    def __init__(self, setup: TrainSetup, ckpt: Checkpointer, reward: Reward):
        self.setup, self.ckpt, self.reward = setup, ckpt, reward
        config = self.config = setup.config
        r = config.rl
        tokenizer_path = run_tokenizer(config)
        self.tokenizer = read_tokenizer_file(tokenizer_path)
        target = pathlib.Path(config.workdir) / "tokenizer.json"
        if not target.exists():  # export and generate read the workdir's own copy
            shutil.copyfile(tokenizer_path, target.with_suffix(".tmp"))
            target.with_suffix(".tmp").rename(target)
        source = r.prompts or "the embedded arithmetic task"
        self.items = read_prompts(r.prompts, r.reward) if r.prompts else arithmetic_items(512, seed=0)
        self.prompt_ids = encode_prompts(self.items, self.tokenizer, r.max_prompt_tokens, source)
        self.stop_ids = [im_end_id(self.tokenizer), special_token_ids(self.tokenizer)[EOS]]
        self.sampling = Sampling(r.temperature, r.top_p)
        temperature = r.temperature or 1.0
        model = setup.model
        self.ref_fn = jax.jit(lambda p, b: token_logprobs(model.bind(p), b, temperature))
        self.nonfinite_run = 0
        self.start, self.state, self.ref_params, self.host = self.initial_state()

    def initial_state(self) -> tuple[int, dict, dict, RLState]:
        setup = self.setup
        abstract = {**setup.abstract_state, "ref_params": setup.abstract_state["params"]}
        restored = self.ckpt.restore_latest(abstract, self.config.model)
        if restored is not None:
            step, state, host = restored
            log.info("resumed RL from %s step %d", self.ckpt.directory, step)
            ref = state.pop("ref_params")
            return step, state, ref, RLState.from_json(host)
        if self.config.init_from:  # the source's params with a fresh optimizer state
            state = init_from_state(self.config.init_from, setup)
        else:
            state = setup.init_state(self.config.seed)
        return 0, state, jax.tree.map(jnp.copy, state["params"]), RLState()

    def save(self, step: int, force: bool = False) -> None:
        tree = {**self.state, "ref_params": self.ref_params}
        self.ckpt.save(step, tree, self.host.to_json(), run_meta(self.config, step), force=force)

    def rollout(self, step: int) -> dict:
        """Adds this step's new groups to the buffer and decodes one chunk of every unfinished trajectory."""
        r, host = self.config.rl, self.host
        for index in draw_prompts(host, len(self.items), r.prompts_per_step, self.config.seed):
            host.groups[host.next_group] = index
            host.buffer += [
                Trajectory(host.next_group, list(self.prompt_ids[index])) for _ in range(r.group_size)
            ]
            host.next_group += 1
        pending = [t for t in host.buffer if not t.finished]
        key = jax.random.fold_in(jax.random.key(self.config.seed), step)
        decoded = rollout_chunk(
            self.setup.model.cfg, self.state["params"], pending, chunk_tokens=r.chunk_tokens,
            max_response_tokens=r.max_response_tokens, stop_ids=self.stop_ids, sampling=self.sampling, key=key,
            version=step, capacity=r.max_prompt_tokens + r.max_response_tokens,
            row_multiple=r.group_size * r.prompts_per_step,
        )  # fmt: skip
        for t in pending:
            if t.finished:
                text = self.tokenizer.decode(t.response[:-1] if not t.truncated else t.response)
                t.reward = safe_reward(self.reward, text, self.items[host.groups[t.group]])
        return {"tokens_decoded": decoded, "finished": sum(t.finished for t in pending)}

    def complete_groups(self) -> tuple[list[Trajectory], list[float], dict]:
        """Takes the groups whose G trajectories are all finished out of the buffer; returns the trajectories of
        the accepted (non-uniform) ones with their advantages, and the reward metrics."""
        host = self.host
        by_group: dict[int, list[Trajectory]] = {}
        for t in host.buffer:
            by_group.setdefault(t.group, []).append(t)
        done = {g: ts for g, ts in by_group.items() if all(t.finished for t in ts)}
        host.buffer = [t for t in host.buffer if t.group not in done]
        for g in done:
            del host.groups[g]
        metrics = {"completed_groups": len(done), "accepted_groups": 0, "chunk_carried": len(host.buffer)}
        if not done:
            return [], [], metrics
        rewards = np.array([[t.reward for t in ts] for ts in done.values()])  # [groups, G]
        keep, advantages = accepted_groups(rewards), group_advantages(rewards)
        lengths = [len(t.response) for ts in done.values() for t in ts]
        metrics |= {
            "reward_mean": float(rewards.mean()), "accepted_groups": int(keep.sum()),
            "response_len_mean": float(np.mean(lengths)),
            "truncated_fraction": float(np.mean([t.truncated for ts in done.values() for t in ts])),
        }  # fmt: skip
        chosen = [
            (t, float(a)) for k, ts, adv in zip(keep, done.values(), advantages) if k for t, a in zip(ts, adv)
        ]
        return [t for t, _ in chosen], [a for _, a in chosen], metrics

    def train_rows(self, step: int, trajectories: list[Trajectory], advantages: list[float]) -> dict:
        """Mini-batch updates over the rows; returns token-weighted loss metrics (nothing when no rows)."""
        c, setup = self.config, self.setup
        if not trajectories:
            return {}
        rows = training_rows(trajectories, advantages, c.data.seq_len, c.rl.overlong_filter)
        batch = c.train.batch_size
        padded = math.ceil(len(trajectories) / batch) * batch
        rows = {k: np.pad(v, ((0, padded - len(v)), (0, 0))) for k, v in rows.items()}
        sums: dict[str, float] = {"tokens": 0.0, "updates": 0.0}
        for first in range(0, padded, batch):
            host_batch = {k: v[first : first + batch] for k, v in rows.items()}
            with jax.set_mesh(setup.mesh):
                device_batch = global_batch(host_batch, setup.batch_sharding)
                ref = self.ref_fn(self.ref_params, device_batch)
                device_batch["ref_logp"] = ref
                self.state, metrics = setup.step_fn(self.state, device_batch, jnp.int32(step))
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            self.nonfinite_run = 0 if m["ok"] else self.nonfinite_run + 1  # a non-finite update was skipped
            if self.nonfinite_run >= c.train.max_consecutive_nonfinite:
                raise TrainingDiverged(f"RL step {step}: {self.nonfinite_run} consecutive non-finite updates "
                                       f"(train.max_consecutive_nonfinite); last good checkpoint: step "
                                       f"{self.ckpt.latest_step()} in {self.ckpt.directory}")  # fmt: skip
            if not m["ok"]:
                continue
            for k, v in m.items():
                if k not in ("ok", "lr", "tokens"):
                    sums[k] = sums.get(k, 0.0) + v * (m["tokens"] if k != "grad_norm" else 1.0)
            sums["tokens"] += m["tokens"]
            sums["updates"] += 1
        tokens, updates = max(sums.pop("tokens"), 1.0), sums.pop("updates")
        out = {k: v / (max(updates, 1.0) if k == "grad_norm" else tokens) for k, v in sums.items()}
        return out | {"loss_tokens": tokens, "updates": updates, "lr": c.rl.lr}

    def step(self, step: int) -> dict:
        """One RL step: rollout, rewards, group completion, updates, reference refresh; its metrics."""
        t0 = time.perf_counter()
        metrics = self.rollout(step)
        t1 = time.perf_counter()
        trajectories, advantages, group_metrics = self.complete_groups()
        metrics |= group_metrics | self.train_rows(step, trajectories, advantages)
        jax.block_until_ready(self.state)
        t2 = time.perf_counter()
        if (step + 1) % self.config.rl.ref_refresh_steps == 0:
            self.ref_params = jax.tree.map(jnp.copy, self.state["params"])
        return metrics | {"rollout_s": t1 - t0, "train_s": t2 - t1}


def train(config: Config, devices: list | None = None, stop: threading.Event | None = None,
          reward: Reward | None = None) -> dict:  # fmt: skip
    """Runs (or resumes) RL to train.steps; returns the last step's metrics. `reward` overrides rl.reward."""
    stop = stop or threading.Event()
    check_workdir(config.workdir)
    r = config.rl
    objective = grpo_objective(eps_low=r.eps_low, eps_high=r.eps_high, dual_clip=r.dual_clip, kl_beta=r.kl_beta,
                               temperature=r.temperature or 1.0)  # fmt: skip
    setup = build(rl_config(config), devices, objective=objective)
    config = setup.config
    check_rl_fit(config)
    with job_lock(config.workdir):
        ckpt = Checkpointer(config.workdir, max_to_keep=config.checkpoint.max_to_keep,
                            async_save=config.checkpoint.async_save)  # fmt: skip
        try:
            return _loop(RLRun(setup, ckpt, reward or REWARDS[r.reward]), stop)
        finally:
            ckpt.close()


def _loop(run: RLRun, stop: threading.Event) -> dict:
    config, steps = run.config, run.config.train.steps
    writer = MetricsWriter(config.workdir, resume_step=run.start)
    bar = tqdm(total=steps, initial=run.start, desc="rl", dynamic_ncols=True)
    last: dict = {"step": run.start}
    step = run.start
    try:
        while step < steps and not stop_agreed(stop, step):
            metrics = run.step(step)
            step += 1
            run.ckpt.check_saves()
            writer.write(step, metrics)
            last = {"step": step, **metrics}
            bar.update(1)
            bar.set_postfix_str(f"reward {metrics.get('reward_mean', float('nan')):.3f} | "
                                f"groups {metrics['accepted_groups']}/{metrics['completed_groups']} | "
                                f"carried {metrics['chunk_carried']}")  # fmt: skip
            if step % config.checkpoint.every_steps == 0 or step == steps:
                run.save(step)
        if stop.is_set() and step not in run.ckpt.all_steps():
            log.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
            run.save(step, force=True)
    finally:
        run.ckpt.wait()
        bar.close()
        writer.close()
    return last | {"preempted": stop.is_set()}
