"""llama.cpp CPU decoding of mct's GGUF exports (f16, q8_0, q4_k_m, tq2_0) beside mct.infer.decoding on JAX.

python -m experiments.benchmarks.gguf_decode [--config experiments/configs/tunnel.py:30m --prompt_len 32
    --max_new_tokens 64 --threads 2] --json

Makes (or reuses) two runs of the --config model (default: the 30m tunnel shape; `--config.KEY=VALUE` overrides)
under --work_dir with random weights (speed does not depend on them): a dense one and a ternary QAT one
(model.quant.group_size 256, as tq2_0 needs), with a byte-level BPE tokenizer trained on mct's own sources (the
model keeps its config's vocabulary, 32768 rows in the tunnel). Exports the dense
run as f16 / q8_0 / q4_k_m and the QAT run as tq2_0, then times greedy decoding of one prompt, end to end
(prefill + max_new_tokens steps, each variant run once untimed first): llama.cpp through llama-cpp-python on
--threads CPU threads, and mct.infer.decoding.generate on JAX's CPU backend on the same machine. Prints tokens/s,
file sizes and the ratio to JAX (dense run) as JSON and draws them into WORK_DIR/gguf_decode.png.
"""

import json
import pathlib
import time

import llama_cpp
import matplotlib
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data_pipelines.tokenizer import BOS, train_bpe_tokenizer  # noqa: E402
from mct.cli.common import run
from mct.config.run import Config  # noqa: E402
from mct.export.gguf_export import export_gguf  # noqa: E402
from mct.infer.decoding import generate  # noqa: E402
from mct.model.decoder import ParamsModel  # noqa: E402
from mct.run.checkpoint import Checkpointer, model_signature  # noqa: E402
from mct.run.reader import RunCheckpoint  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
VARIANTS = {"f16": "dense", "q8_0": "dense", "q4_k_m": "dense", "tq2_0": "qat"}  # gguf_type -> run

_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/mct-bench-gguf", "Where the runs and GGUF files go.")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(REPO / "experiments/configs/tunnel.py:30m"),
    "The model's config (d_model a multiple of 256).",
)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated.")
_THREADS = flags.DEFINE_integer("threads", 2, "llama.cpp CPU threads.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per variant (the best is reported).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def make_run(workdir: pathlib.Path, quant: dict) -> RunCheckpoint:
    """A checkpoint of the --config model with random weights and a small tokenizer (reused when present)."""
    if not (workdir / "checkpoints").is_dir():
        c = _CONFIG.value.copy_and_resolve_references()
        c.workdir = str(workdir)
        c.model.quant.update(quant)
        config = Config.from_dict(c.to_dict())
        texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "mct").glob("*.py"))]
        workdir.mkdir(parents=True)
        train_bpe_tokenizer(texts, 2048).save(workdir)
        params = ParamsModel(config.model).init(0)
        meta = {"config": config.to_dict(), "model_signature": model_signature(config.model), "step": 0}
        ckpt = Checkpointer(str(workdir), async_save=False)
        ckpt.save(0, {"params": params, "opt_state": {}}, None, meta)
        ckpt.wait()
        ckpt.close()
    return RunCheckpoint(workdir)


def best_seconds(fn) -> float:
    """The fastest of --repeats timed calls, after one untimed call (compilation, caches)."""
    fn()
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def llama_cpp_seconds(path: pathlib.Path, prompt: list[int]) -> float:
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(prompt) + _MAX_NEW.value,
        n_threads=_THREADS.value,
        n_threads_batch=_THREADS.value,
        verbose=False,
    )

    def decode():
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
            if i + 1 == _MAX_NEW.value:
                break

    return best_seconds(decode)


def jax_seconds(run: RunCheckpoint, prompt: list[int]) -> float:
    params = run.read_params()
    return best_seconds(lambda: generate(run.model_cfg, params, [prompt], max_new_tokens=_MAX_NEW.value))


def draw(result: dict, path: pathlib.Path) -> None:
    names = ["mct JAX dense", "mct JAX qat", *(f"llama.cpp {t}" for t in VARIANTS)]
    rates = [result["mct_jax"][k]["tokens_per_s"] for k in ("dense", "qat")]
    rates += [result["llama_cpp"][t]["tokens_per_s"] for t in VARIANTS]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, rates, color=["tab:gray"] * 2 + ["tab:blue"] * len(VARIANTS))
    for i, t in enumerate(VARIANTS):
        ax.annotate(
            f"{result['llama_cpp'][t]['file_mb']:.0f} MB", (i + 2, rates[i + 2]), ha="center", va="bottom"
        )
    ax.set_ylabel("decode tokens/s (batch 1, CPU)")
    ax.set_title(
        f"{result['params'] / 1e6:.1f}M params: {result['max_new_tokens']} new tokens after {result['prompt_len']}"
    )
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    work = pathlib.Path(_WORK_DIR.value)
    runs = {
        "dense": make_run(work / "dense", {}),
        "qat": make_run(work / "qat", {"weights": "ternary", "group_size": 256}),
    }
    tokenizer = runs["dense"].tokenizer()
    text = (REPO / "README.md").read_text(encoding="utf-8")
    prompt = [tokenizer.token_to_id(BOS)] + tokenizer.encode_ids(text)[: _PROMPT_LEN.value - 1]
    result = {
        "model": {
            key: getattr(runs["dense"].model_cfg, key) for key in ("n_layers", "d_model", "vocab_size")
        },
        "params": sum(int(np.prod(s.shape)) for s in runs["dense"].abstract.values()),
        "prompt_len": len(prompt),
        "max_new_tokens": _MAX_NEW.value,
        "llama_cpp_threads": _THREADS.value,
        "mct_jax": {
            name: {"tokens_per_s": _MAX_NEW.value / jax_seconds(run, prompt)} for name, run in runs.items()
        },
        "llama_cpp": {},
    }
    for gguf_type, run_name in VARIANTS.items():
        path = work / f"{run_name}-{gguf_type}.gguf"
        if not path.exists():
            export_gguf(runs[run_name], runs[run_name].tokenizer(), path, gguf_type)
        rate = _MAX_NEW.value / llama_cpp_seconds(path, prompt)
        result["llama_cpp"][gguf_type] = {
            "file_mb": path.stat().st_size / 2**20,
            "tokens_per_s": rate,
            "vs_mct_jax_dense": rate / result["mct_jax"]["dense"]["tokens_per_s"],
        }
    draw(result, work / "gguf_decode.png")
    print(json.dumps(result, indent=None if _JSON.value else 2))


if __name__ == "__main__":
    run(main)
