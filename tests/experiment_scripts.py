"""Every experiments/ script at tiny size, as its user runs it: `python -m MODULE FLAGS --json`, one process each
(two absl scripts in one process collide on their flag names). SCRIPTS: module -> (its flags given a scratch
directory and the session's tiny dataset, a key its JSON line must hold)."""

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

from tests.tiny_runs import REPO, overrides

Flags = Callable[[pathlib.Path, pathlib.Path], list[str]]
# a 1-layer model whose rows are multiples of 256 (ggml's q4_k and tq2_0 blocks), for the GGUF export
GGUF_MODEL = dict(n_layers=1, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_mlp=256, vocab_size=2048)


def tiny_config(data: pathlib.Path) -> list[str]:
    """--config tiny_cpu.py with the tests' tiny model (tests/tiny_runs.py) reading `data`."""
    keep = {k: v for k, v in overrides(data).items() if k.startswith(("model.", "data.mixture."))}
    return [
        "--config",
        str(REPO / "experiments/configs/tiny_cpu.py"),
        *(f"--config.{k}={v}" for k, v in keep.items()),
    ]


BENCHMARKS: dict[str, tuple[Flags, str]] = {
    "experiments.benchmarks.data_loader": (
        lambda tmp, data: [f"--data={data}", "--seq=32", "--batch=2", "--warmup=1", "--batches=20"],
        "fill_ratio",
    ),
    "experiments.benchmarks.sparse_attention": (
        lambda tmp, data: [
            "--seq=256",
            "--q_heads=2",
            "--kv_heads=1",
            "--head_dim=16",
            "--baseline_seq=0",
            "--reps=1",
        ],
        "results",
    ),
    "experiments.benchmarks.train_step": (
        lambda tmp, data: [*tiny_config(data), "--seq=32", "--batch=2", "--steps=1"],
        "mfu",
    ),
    "experiments.benchmarks.rl_rollout": (
        lambda tmp, data: (
            ["--steps=1", "--warmup_steps=0", "--max_response_tokens=4", "--chunk_tokens=4", "--sigma=0"]
            + ["--median_tokens=4", "--group_size=2", "--prompts_per_step=1"]  # one rollout shape to compile
        ),
        "throughput_ratio",
    ),
    "experiments.benchmarks.preprocess": (
        lambda tmp, data: ["--files=3", "--vocab_size=300", "--manifest_shards=10"],
        "projection",
    ),
    "experiments.benchmarks.scaling": (
        lambda tmp, data: (
            ["--processes=1", "--batch_per_process=8", "--seq=32", "--steps=6"]
            + [f"--train_flag={f}" for f in tiny_config(data)[2:]]
        ),
        "results",
    ),
    "experiments.benchmarks.gguf_decode": (
        lambda tmp, data: (
            [f"--work_dir={tmp}", "--prompt_len=4", "--max_new_tokens=2", "--repeats=1"]
            + [*tiny_config(data)[:2], *(f"--config.model.{k}={v}" for k, v in GGUF_MODEL.items())]
        ),
        "llama_cpp",
    ),
    "experiments.benchmarks.speculative": (
        lambda tmp, data: (
            [f"--work_dir={tmp}", "--train_steps=2", "--num_draft=2", "--num_batches=1", "--tree=2,2,4"]
            + ["--drafters=eagle_tree", "--fractions=4", "--notime_draft"]
            + ["--prompt_len=8", "--max_new_tokens=4", *tiny_config(data)]
        ),
        "variants",
    ),
    "experiments.benchmarks.decode": (
        lambda tmp, data: (
            ["--shape=9m", "--prompt_len=6", "--max_new_tokens=4", "--batches=1"]
            + ["--quants=int8", "--repeats=1", "--slots=2", "--requests=3"]
        ),
        "rows",
    ),
    "experiments.benchmarks.eval_throughput": (
        lambda tmp, data: (
            [*tiny_config(data), "--examples=6", "--choices=2", "--steps=1", "--max_words=30"]
            + ["--seq=128", "--batch=2"]
        ),
        "ratio",
    ),
    "experiments.benchmarks.aot_remat_table": (
        lambda tmp, data: (
            ["--rows=0p5b:v5e-8", "--policies=none", "--overrides=model.n_layers=1"]
            + [f"--out={tmp / 'aot.jsonl'}", "--png="]
        ),
        "rows",
    ),
}
OTHERS: dict[str, tuple[Flags, str]] = {
    "experiments.bitcpm.qat_vs_scratch": (
        lambda tmp, data: (
            [f"--out={tmp / 'out'}", f"--workdir={tmp}", "--steps=2", "--fractions=0.5"] + tiny_config(data)
        ),
        "ternary_scratch",
    ),
    "experiments.posttrain.tiny_chain": (
        lambda tmp, data: (
            [f"--work_dir={tmp}", "--pretrain_steps=1", "--sft_steps=1", "--rl_steps=1", "--held_out=2"]
            + [f"--stage_flag={f}" for f in tiny_config(data)[2:]]
        ),
        "accuracy_rl",
    ),
    "experiments.probes.bad_inputs": (lambda tmp, data: ["--only=2"], "2-seq-len-0"),
    "experiments.device.check_gpu": (lambda tmp, data: ["--cpu_dry_run", "--check_seq=128"], "checks"),
}


def run_script(module: str, flags: list[str], timeout: float = 300) -> dict:
    """The JSON object the last stdout line of `python -m module *flags --json` holds (it must exit 0)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    command = [sys.executable, "-m", module, *flags, "--json"]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(command)} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def script_modules() -> set[str]:
    """Every experiments/*/*.py that runs as `python -m` (configs are checked by the config tests)."""
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts)
        for path in (REPO / "experiments").glob("*/*.py")
        if 'if __name__ == "__main__":' in path.read_text()
    }
