"""Weak scaling of the tiny config over local processes (one CPU device each, fixed per-process batch).

python -m experiments.benchmarks.scaling --processes 1,2,4 --json

All processes share this machine's cores, so compute per step grows with the process count; what this
measures is the rest: gloo all-reduces of the gradients, the global-batch assembly and host coordination.
`overhead_s` = step time - P x (1-process step time), i.e. time beyond the ideal share of the cores.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import flags

from mct.cli import common as cli

_PROCESSES = flags.DEFINE_list("processes", ["1", "2", "4"], "Process counts to run.")
_BATCH = flags.DEFINE_integer("batch_per_process", 8, "Sequences per process per step.")
_SEQ = flags.DEFINE_integer("seq", 256, "Sequence length.")
_STEPS = flags.DEFINE_integer("steps", 30, "Steps per run (the first 5 are warm-up).")
_TRAIN_FLAGS = flags.DEFINE_multi_string(
    "train_flag",
    [],
    "A flag for every mct.train run after this script's own (e.g. --config.model.n_layers=1).",
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def run(processes: int, workdir: str) -> list[dict]:
    batch = _BATCH.value * processes
    train_flags = [
        "--config",
        "experiments/configs/tiny_cpu.py",
        f"--config.workdir={workdir}",
        f"--config.train.steps={_STEPS.value}",
        f"--config.train.batch_size={batch}",
        "--config.train.log_every_steps=1",
        "--config.schedule.warmup_steps=2",
        "--config.schedule.decay_steps=2",
        "--config.checkpoint.every_steps=100000",
        "--config.eval.every_steps=100000",
        f"--config.data.num_logical_shards={max(8, processes)}",
        "--config.mesh.data=-1",
        f"--config.data.seq_len={_SEQ.value}",
        *_TRAIN_FLAGS.value,
    ]
    command = [sys.executable, "-m", "mct.launch", "local", f"--processes={processes}", "--", *train_flags]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def main(argv):
    del argv
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in map(int, _PROCESSES.value):
            lines = run(p, os.path.join(tmp, f"p{p}"))[5:]
            tokens_per_step = _BATCH.value * p * _SEQ.value
            step_time = statistics.median(tokens_per_step / m["tokens_per_s"] for m in lines)
            results.append(
                {
                    "processes": p,
                    "global_batch": _BATCH.value * p,
                    "step_time_s": step_time,
                    "steps_per_s": 1.0 / step_time,
                }
            )
    base = results[0]["step_time_s"] / results[0]["processes"]
    for r in results:
        r["overhead_s"] = r["step_time_s"] - r["processes"] * base
        if not _JSON.value:
            ms, overhead = r["step_time_s"] * 1e3, r["overhead_s"] * 1e3
            print(f"{r['processes']} processes: {ms:.1f} ms/step, overhead {overhead:.1f} ms")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    cli.run(main)
