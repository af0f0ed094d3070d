"""Decode speed of mct's engine (mct.infer.loop: the token loop on the device) beside the per-token host loop it
replaced, for fp32 / int8 / int4 weights, and the memory-bandwidth limit of a batch-1 step.

python -m experiments.benchmarks.decode [--shape 30m --prompt_len 32 --max_new_tokens 128 --batches 1,16
    --quants none,int8,int4 --slots 4,16 --requests 16 --repeats 2] --json

Random weights of the tunnel shape (speed does not depend on them), greedy, no stop token: batch 1 is one
prompt of --prompt_len tokens, a larger batch has prompts of different lengths (half to all of it). For every
(quant, batch), both loops run the same strategy (decoding.sampling_strategy) once untimed (compiling) and then
--repeats times; the best decode rate counts (all rows' tokens after the prefill's first, over the token loop's
time). "before" calls the jitted step once per token and reads its tokens back, as the host loop did; "after" is
loop.decode. The bandwidth limit is (bandwidth of a large reduction) / (weight bytes a step reads).

Continuous batching (mct.infer.engine), with the first of --quants: --requests prompts of different lengths
(as a batch's) asking for different numbers of tokens (a quarter of --max_new_tokens to all of it) through each
--slots count; its decode rate (tokens after each request's first, over the token loops' time) and its rate
over prefill and decode together, beside the batch-1 rate of loop.decode in the same run.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.configs.tunnel import get_config
from mct.cli.common import run
from mct.config.model import ModelConfig
from mct.config.run import Config
from mct.infer.decoding import GREEDY, DecodeWeights, decode_weights, pad_prompts, sampling_strategy
from mct.infer.engine import Engine, Request
from mct.infer.loop import Bound, StopRule, Strategy, Timings, decode
from mct.model.decoder import ParamsModel
from mct.model.quant import QUANTISED

_SHAPE = flags.DEFINE_string("shape", "30m", "experiments/configs/tunnel.py shape.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (the longest prompt of a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens generated per row.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_QUANTS = flags.DEFINE_list("quants", ["none", "int8", "int4"], "Weight formats (decoding.decode_weights).")
_SLOTS = flags.DEFINE_list("slots", ["4", "16"], "Continuous batching: slot counts (none: no such rows).")
_REQUESTS = flags.DEFINE_integer("requests", 16, "Continuous batching: requests per run.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per loop (the best counts).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def prompts_of(cfg: ModelConfig, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """`batch` random prompts: one of prompt_len tokens, or lengths spread over prompt_len/2 .. prompt_len."""
    rng = np.random.default_rng(seed)
    lengths = (
        [prompt_len] if batch == 1 else np.linspace(max(prompt_len // 2, 1), prompt_len, batch).astype(int)
    )
    return [rng.integers(0, cfg.vocab_size, int(n)).tolist() for n in lengths]


@functools.cache
def jitted_step(step: Bound):
    """A strategy's step jitted on its own (once per step), its state donated, as the host loop ran it."""
    return jax.jit(lambda operands, state, active, key: step(operands, state, active, key), donate_argnums=1)


def host_loop_rate(strategy: Strategy, batch: int, max_new: int) -> float:
    """Tokens/s of the per-token host loop: the jitted step called once per token, its tokens read back."""
    step = jitted_step(strategy.step)
    key = jax.random.key(0)
    _, state = strategy.prefill(key)
    active = jnp.ones(batch, bool)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(max_new - 1):
        key, sub = jax.random.split(key)
        proposal, state = step(strategy.operands, state, active, sub)
        jax.device_get(proposal.tokens)
    return batch * (max_new - 1) / (time.perf_counter() - start)


def engine_rate(strategy: Strategy, batch: int, max_new: int) -> tuple[float, Timings]:
    """Tokens/s of loop.decode's token loop (without compiling and prefill), and its timings."""
    timings = Timings()
    out, _ = decode(
        strategy, StopRule.of([max_new] * batch, [[]] * batch), jax.random.key(0), timings=timings
    )
    decoded = sum(len(tokens) - 1 for tokens in out.tokens)
    return decoded / timings.decode_s, timings


def best(measure, repeats: int, rate=lambda result: result):
    """The result of the highest `rate` among `repeats` timed calls, after one untimed (compiling) call."""
    measure()
    return max((measure() for _ in range(repeats)), key=rate)


def step_bytes(w: DecodeWeights) -> int:
    """Weight bytes a decode step reads: the hidden matrices (their codes and scales when quantised), norms and
    the output head (an embedding lookup reads a few rows only)."""
    quantized = w.params.get("quantized_layers", {})
    hidden = [quantized.get(name, w.params[name]) for name in QUANTISED]
    norms = [w.params[name] for name in ("attn_norm", "mlp_norm", "final_norm")]
    return sum(x.nbytes for x in jax.tree.leaves([hidden, norms, w.head]))


def bandwidth_gb_s(megabytes: int = 256) -> float:
    """The machine's read bandwidth as JAX sees it: a jitted sum over a large fp32 array (best of 5)."""
    x = jnp.ones(megabytes * 2**18, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        total(x).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return x.nbytes / min(seconds) / 1e9


def measure_row(w: DecodeWeights, batch: int, prompt_len: int, max_new: int, repeats: int) -> dict:
    """Both loops' decode rates for one weight format and batch size."""
    tokens, lengths = pad_prompts(prompts_of(w.model.cfg, batch, prompt_len))
    strategy = lambda: sampling_strategy(w, GREEDY, tokens, lengths, tokens.shape[1] + max_new)
    before = best(lambda: host_loop_rate(strategy(), batch, max_new), repeats)
    after, timings = best(lambda: engine_rate(strategy(), batch, max_new), repeats, lambda r: r[0])
    return {
        "batch": batch,
        "before_tokens_per_s": round(before, 1),
        "after_tokens_per_s": round(after, 1),
        "speedup": round(after / before, 2),
        "prefill_tokens_per_s": round(int(lengths.sum()) / timings.prefill_s, 1),
    }


def engine_row(
    w: DecodeWeights, slots: int, requests: int, prompt_len: int, max_new: int, repeats: int
) -> dict:
    """Continuous batching's rates for `requests` prompts of different lengths and token limits over `slots`."""
    limits = np.linspace(max(max_new // 4, 2), max_new, requests).astype(int)[::-1]  # long ones first
    batch = [Request(p, int(n)) for p, n in zip(prompts_of(w.model.cfg, requests, prompt_len), limits)]

    def run_once() -> tuple[float, float]:
        timings = Timings()
        out = Engine(w, slots).run(batch, timings)
        decoded = sum(len(c.tokens) - 1 for c in out)
        return decoded / timings.decode_s, (decoded + len(out)) / (timings.decode_s + timings.prefill_s)

    decode_rate, overall = best(run_once, repeats, lambda r: r[0])
    return {
        "slots": slots,
        "requests": requests,
        "decode_tokens_per_s": round(decode_rate, 1),
        "tokens_per_s_with_prefill": round(overall, 1),
    }


def continuous_rows(
    w: DecodeWeights,
    slots: list[int],
    requests: int,
    prompt_len: int,
    max_new: int,
    repeats: int,
    one: float | None,
) -> list[dict]:
    """An engine_row per slot count, each beside `one`, the batch-1 rate of loop.decode in this run (measured
    here when None)."""
    if not slots:
        return []
    if one is None:
        tokens, lengths = pad_prompts(prompts_of(w.model.cfg, 1, prompt_len))
        strategy = lambda: sampling_strategy(w, GREEDY, tokens, lengths, prompt_len + max_new)
        one, _ = best(lambda: engine_rate(strategy(), 1, max_new), repeats, lambda r: r[0])
    rows = []
    for n in slots:
        row = engine_row(w, n, requests, prompt_len, max_new, repeats)
        rows.append(
            {
                **row,
                "batch1_tokens_per_s": round(one, 1),
                "vs_batch1": round(row["decode_tokens_per_s"] / one, 2),
            }
        )
        print(
            f"engine: {requests} requests over {n:>3} slots {row['decode_tokens_per_s']:8.1f} tokens/s "
            f"(x{rows[-1]['vs_batch1']} batch 1 {one:.1f})",
            flush=True,
        )
    return rows


def show(row: dict) -> None:
    """One measured row as a line of text, printed as soon as it is measured."""
    print(
        f"{row['quant']:>5} batch {row['batch']:>3}: {row['before_tokens_per_s']:8.1f} -> "
        f"{row['after_tokens_per_s']:8.1f} tokens/s (x{row['speedup']}); bandwidth limit "
        f"{row['bandwidth_limit_steps_per_s']} steps/s",
        flush=True,
    )


def measure(
    cfg: ModelConfig,
    prompt_len: int,
    max_new: int,
    batches: list[int],
    quants: list[str],
    repeats: int,
    slots: list[int],
    requests: int,
) -> dict:
    """The benchmark's rows and context, as one JSON-able dict."""
    params = ParamsModel(cfg).init(0)
    bandwidth = bandwidth_gb_s()
    rows = []
    for quant in quants:
        w = decode_weights(cfg, params, quant)
        context = {
            "quant": quant,
            "step_weight_mb": round(step_bytes(w) / 1e6, 1),
            "bandwidth_limit_steps_per_s": round(bandwidth * 1e9 / step_bytes(w), 1),
        }
        for batch in batches:
            rows.append({**context, **measure_row(w, batch, prompt_len, max_new, repeats)})
            show(rows[-1])
    first = decode_weights(cfg, params, quants[0])  # continuous batching runs on the first weight format
    one = next((r["after_tokens_per_s"] for r in rows if r["quant"] == quants[0] and r["batch"] == 1), None)
    engine_rows = continuous_rows(first, slots, requests, prompt_len, max_new, repeats, one)
    return {
        "platform": jax.devices()[0].platform,
        "load_average": os.getloadavg(),
        "bandwidth_gb_s": round(bandwidth, 2),
        "prompt_len": prompt_len,
        "max_new_tokens": max_new,
        "rows": rows,
        "continuous_batching": engine_rows,
    }


def main(argv: list[str]) -> None:
    del argv
    cfg = Config.from_dict(get_config(_SHAPE.value).to_dict()).model
    result = measure(
        cfg,
        _PROMPT_LEN.value,
        _MAX_NEW.value,
        [int(b) for b in _BATCHES.value],
        _QUANTS.value,
        _REPEATS.value,
        [int(n) for n in _SLOTS.value],
        _REQUESTS.value,
    )
    if _JSON.value:
        print(json.dumps({"shape": _SHAPE.value, **result}))


if __name__ == "__main__":
    run(main)
