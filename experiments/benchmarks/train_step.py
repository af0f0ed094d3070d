"""Times one jitted training step of a config on synthetic tokens and reports MFU.

python -m experiments.benchmarks.train_step --config experiments/configs/tunnel.py:30m --seq 1024 --batch 8 --json

MFU = analytic model FLOPs per step (mct/model/flops.py: 6 * matmul params * tokens + 6 * layers * seq * heads *
head_dim * tokens) / median step time / median fp32 matmul FLOP/s, measured in the same process after each
timed step.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from experiments.benchmarks.synthetic import random_batch
from mct.cli import common as cli
from mct.model.decoder import compute_dtype
from mct.model.flops import matmul_params, measure_matmul_peak, train_flops_per_token
from mct.train.trainer import build

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_SEQ = flags.DEFINE_integer("seq", 1024, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def main(argv):
    del argv
    seq, batch = _SEQ.value, _BATCH.value
    cd = _CONFIG.value
    cd.data.seq_len, cd.train.batch_size, cd.train.grad_accum, cd.mesh.data = seq, batch, 1, 1
    setup = build(cli.config_from_flag(cd), jax.devices()[:1])
    config, step = setup.config, setup.step_fn
    state = setup.init_state(0)
    data = random_batch(config.model.vocab_size, batch, seq)
    for i in range(2):
        state, metrics = step(state, data, jnp.int32(i))
    jax.block_until_ready(metrics)
    # The peak is measured next to every timed step (this VM's matmul rate drifts with its neighbours by up to
    # 1.5x over minutes); the MFU divides by the median of those measurements, taken under the same conditions.
    peaks, times = [measure_matmul_peak(dtype=compute_dtype(config.model))], []
    for i in range(_STEPS.value):
        t = time.perf_counter()
        state, metrics = step(state, data, jnp.int32(i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        peaks.append(measure_matmul_peak(dtype=compute_dtype(config.model)))
    peak = statistics.median(peaks)
    step_time = statistics.median(times)
    flops = train_flops_per_token(config.model, seq) * batch * seq
    result = {
        "model_flops_per_step": flops,
        "n_params": matmul_params(config.model),
        "n_layers": config.model.n_layers,
        "d_model": config.model.d_model,
        "seq": seq,
        "tokens_per_step": batch * seq,
        "step_time_s": step_time,
        "matmul_peak_flops": peak,
        "matmul_peak_range": [min(peaks), max(peaks)],
        "mfu": flops / step_time / peak,
        # each step against the peak measured right after it: robust to drifts in the machine's speed
        "mfu_per_step_median": statistics.median(flops / t / p for t, p in zip(times, peaks[1:])),
        "attention": config.model.attention,
    }
    if not _JSON.value:
        print(f"step {step_time:.3f} s | {batch * seq / step_time:,.0f} tok/s | mfu {result['mfu']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
