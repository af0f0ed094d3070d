"""Chunk-wise vs full-length rollout in RL steps (MiniCPM4 report section 3.2: step 489 -> 286 s and sampling
393 -> 174 s with 8K chunks), on prompts whose answer lengths are long-tailed.

python -m experiments.benchmarks.rl_rollout [--steps 8 --chunk_tokens 16 --max_response_tokens 128] --json

A tiny random-init policy decodes with the KV-cache decoder (mct.posttrain.rollout) and trains with the GRPO step
(mct.posttrain.grpo through mct.train.trainer.build). Each trajectory's answer length is drawn from a log-normal
clipped at
max_response_tokens (the long tail) and a trajectory stops when it reaches it, as if it had emitted
`<|im_end|>` there; rewards are coin flips. The decoder runs its batch in lockstep, so a full-length rollout
step lasts as long as its longest answer, while a chunked step decodes at most chunk_tokens and carries the
rest. Both variants take the same new prompts each step; after warm-up steps the timed steps
report step, rollout and train seconds and finished trajectories per second, side by side (each variant runs
twice with the same seeds and only the second pass is timed, so no compile is counted).
"""

import json
import math
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import flags

from experiments.configs.tiny_cpu_rl import get_config
from mct.cli.common import run
from mct.config.posttrain import RLRunConfig
from mct.infer.decoding import Sampling
from mct.parallel.distributed import global_batch
from mct.posttrain.grpo import accepted_groups, group_advantages, grpo_objective, token_logprobs
from mct.posttrain.rl import training_rows
from mct.posttrain.rollout import Trajectory, rollout_chunk
from mct.train.trainer import TrainSetup, build

_STEPS = flags.DEFINE_integer("steps", 8, "Timed RL steps per variant.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 4, "Untimed steps first (filling the replay buffer).")
_CHUNK = flags.DEFINE_integer("chunk_tokens", 16, "Tokens per trajectory per step in the chunked variant.")
_MAX_RESPONSE = flags.DEFINE_integer("max_response_tokens", 128, "Response cap (the tail's end).")
_MEDIAN = flags.DEFINE_integer("median_tokens", 16, "Median answer length of the log-normal.")
_SIGMA = flags.DEFINE_float("sigma", 1.0, "Log-normal sigma of the answer lengths (the tail's weight).")
_PROMPTS = flags.DEFINE_integer("prompts_per_step", 2, "New prompts per step.")
_GROUP = flags.DEFINE_integer("group_size", 8, "Rollouts per prompt.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")

PROMPT_TOKENS = 16


def bench_config() -> RLRunConfig:
    c = get_config()
    c.model.vocab_size, c.data.vocab_size = 512, 512
    c.model.update(dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=128))
    c.data.seq_len = PROMPT_TOKENS + _MAX_RESPONSE.value
    c.train.batch_size = 16
    c.rl.group_size, c.rl.prompts_per_step = _GROUP.value, _PROMPTS.value
    c.rl.max_prompt_tokens, c.rl.max_response_tokens = PROMPT_TOKENS, _MAX_RESPONSE.value
    c.mesh.data = 1
    return RLRunConfig.from_dict(c.to_dict())


def bench_setup(config: RLRunConfig) -> tuple[TrainSetup, Callable]:
    """The GRPO train setup and the jitted reference log-prob function, shared by both variants (built and
    compiled once: the variants differ in chunk_tokens only)."""
    r = config.rl
    objective = grpo_objective(
        eps_low=r.eps_low, eps_high=r.eps_high, dual_clip=r.dual_clip, kl_beta=r.kl_beta
    )
    setup = build(config, jax.devices()[:1], objective=objective)
    return setup, jax.jit(lambda p, b: token_logprobs(setup.model.bind(p), b))


def run_variant(setup: TrainSetup, ref_fn: Callable, config: RLRunConfig, chunk_tokens: int) -> dict:
    """RL steps with at most chunk_tokens decoded per trajectory per step, run twice with the same seeds: the
    first pass compiles every shape the second (timed) pass meets."""
    run_steps(setup, ref_fn, config, chunk_tokens)
    return run_steps(setup, ref_fn, config, chunk_tokens)


def run_steps(setup: TrainSetup, ref_fn: Callable, config: RLRunConfig, chunk_tokens: int) -> dict:
    """Warm-up steps (filling the buffer), then the timed ones; their mean times."""
    r = config.rl
    state = setup.init_state(0)
    ref_params = jax.tree.map(lambda x: x.copy(), state["params"])
    rng = np.random.default_rng(0)  # the same prompts, lengths and rewards for both variants
    buffer: list[Trajectory] = []
    targets: dict[int, int] = {}  # id(trajectory) -> answer length
    rows_per_step = r.group_size * r.prompts_per_step
    times = {"step_s": [], "rollout_s": [], "train_s": [], "finished": [], "carried": []}
    for step in range(_WARMUP.value + _STEPS.value):
        t0 = time.perf_counter()
        for g in range(r.prompts_per_step):
            prompt = rng.integers(10, 500, PROMPT_TOKENS).tolist()
            for _ in range(r.group_size):
                t = Trajectory(step * r.prompts_per_step + g, prompt)
                length = int(_MEDIAN.value * math.exp(_SIGMA.value * rng.standard_normal()))
                targets[id(t)] = min(max(length, 1), r.max_response_tokens)
                buffer.append(t)
        active = [t for t in buffer if not t.finished]
        # the batch decodes in lockstep until its longest answer ends or the chunk is used up
        longest = max(targets[id(t)] - len(t.response) for t in active)
        rollout_chunk(
            setup.model.cfg,
            state["params"],
            active,
            chunk_tokens=min(chunk_tokens, longest),
            max_response_tokens=r.max_response_tokens,
            stop_ids=[],
            sampling=Sampling(1.0),
            key=jax.random.key(step),
            version=step,
            slots=rows_per_step,
        )
        for t in active:
            n = targets[id(t)]
            if len(t.response) >= n:  # the simulated <|im_end|> at the answer's length
                del t.response[n:], t.logprobs[n:], t.versions[n:]
                t.finished, t.truncated, t.reward = (
                    True,
                    n == r.max_response_tokens,
                    float(rng.integers(0, 2)),
                )
        t1 = time.perf_counter()
        groups: dict[int, list[Trajectory]] = {}
        for t in buffer:
            groups.setdefault(t.group, []).append(t)
        done = [ts for ts in groups.values() if all(t.finished for t in ts)]
        buffer = [t for ts in groups.values() if not all(t.finished for t in ts) for t in ts]
        train_rows, advantages = [], []
        if done:
            rewards = np.array([[t.reward for t in ts] for ts in done])
            for keep, ts, adv in zip(accepted_groups(rewards), done, group_advantages(rewards)):
                if keep:
                    train_rows += ts
                    advantages += adv.tolist()
        if train_rows:
            rows = training_rows(train_rows, advantages, config.data.seq_len, r.overlong_filter)
            padded = -(-len(train_rows) // config.train.batch_size) * config.train.batch_size
            rows = {k: np.pad(v, ((0, padded - len(v)), (0, 0))) for k, v in rows.items()}
            for first in range(0, padded, config.train.batch_size):
                with jax.set_mesh(setup.mesh):
                    batch = global_batch(
                        {k: v[first : first + config.train.batch_size] for k, v in rows.items()},
                        setup.batch_sharding,
                    )
                    batch["ref_logp"] = ref_fn(ref_params, batch)
                    state, _ = setup.step_fn(state, batch, np.int32(step))
            jax.block_until_ready(state)
        t2 = time.perf_counter()
        if step >= _WARMUP.value:
            for k, v in (
                ("step_s", t2 - t0),
                ("rollout_s", t1 - t0),
                ("train_s", t2 - t1),
                ("finished", sum(len(ts) for ts in done)),
                ("carried", len(buffer)),
            ):
                times[k].append(v)
    total = sum(times["step_s"])
    return {
        "step_s": float(np.mean(times["step_s"])),
        "rollout_s": float(np.mean(times["rollout_s"])),
        "train_s": float(np.mean(times["train_s"])),
        "finished_per_s": sum(times["finished"]) / total,
        "carried_mean": float(np.mean(times["carried"])),
        "chunk_tokens": chunk_tokens,
    }


def main(argv: list[str]) -> None:
    del argv
    config = bench_config()
    setup, ref_fn = bench_setup(config)
    full = run_variant(setup, ref_fn, config, _MAX_RESPONSE.value)
    chunked = run_variant(setup, ref_fn, config, _CHUNK.value)
    report = {
        "full": full,
        "chunked": chunked,
        "step_ratio": chunked["step_s"] / full["step_s"],
        "rollout_ratio": chunked["rollout_s"] / full["rollout_s"],
        "throughput_ratio": chunked["finished_per_s"] / full["finished_per_s"],
        "settings": {
            "steps": _STEPS.value,
            "max_response_tokens": _MAX_RESPONSE.value,
            "median_tokens": _MEDIAN.value,
            "sigma": _SIGMA.value,
            "rows_per_step": _GROUP.value * _PROMPTS.value,
            "backend": jax.default_backend(),
        },
    }
    for name in ("full", "chunked"):
        v = report[name]
        print(
            f"{name:8s} chunk {v['chunk_tokens']:4d}: step {v['step_s']:.3f} s, rollout {v['rollout_s']:.3f} s, "
            f"train {v['train_s']:.3f} s, {v['finished_per_s']:.1f} finished trajectories/s"
        )
    print(
        f"chunked / full: step {report['step_ratio']:.2f}, rollout {report['rollout_ratio']:.2f}, "
        f"throughput {report['throughput_ratio']:.2f}"
    )
    if _JSON.value:
        print(json.dumps(report))


if __name__ == "__main__":
    run(main)
