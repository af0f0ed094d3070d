"""BitCPM wind tunnel (MiniCPM4 report, BitCPM4): is QAT from a high-precision checkpoint as good as ternary
training from scratch, at the same total token budget?

python -m experiments.bitcpm.qat_vs_scratch --out docs/bitcpm [--steps 300] [--json]

Runs on the embedded default corpus (or --config's data: `--config.KEY=VALUE` overrides tiny_cpu), one tiny
proxy shape: (1) fp32 WSD over `steps`; (2) ternary (group 32)
from scratch over the same steps; (3) for each QAT fraction r: the fp32 run's stable-phase checkpoint at
(1 - r) * steps, then r * steps of ternary QAT (fresh optimizer, re-warmed lr at half the peak, its own decay).
Every ternary run sees `steps` batches in total. Writes results.json and qat_vs_scratch.png (eval loss over
tokens; final eval losses) into --out.
"""

import json
import pathlib

import jax
import matplotlib
from absl import flags
from ml_collections import config_flags

from mct.config.run import Config
from mct.run.training_run import train
from mct.train.metrics import logged_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mct.cli.common import run

REPO = pathlib.Path(__file__).resolve().parents[2]
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(REPO / "experiments/configs/tiny_cpu.py"),
    "The runs' base config (the proxy shape replaces its model's).",
)
_OUT = flags.DEFINE_string("out", "docs/bitcpm", "Directory for results.json and the PNG.")
_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/mct-bitcpm", "Parent of the runs' workdirs (reused: resumes)."
)
_STEPS = flags.DEFINE_integer("steps", 300, "Steps of the fp32 and from-scratch runs (batches of 16 x 128).")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.2", "0.4", "0.6"], "QAT shares of the token budget.")
_JSON = flags.DEFINE_bool("json", False, "Print the results as one JSON object on the last line.")

LR = 0.01  # stage 1 peak; QAT's is half (BitCPM convention)


def proxy_config(
    workdir: pathlib.Path, steps: int, *, ternary: bool = False, lr: float = LR, init_from: str = ""
) -> Config:
    """The tiny proxy: 2 layers x 64 wide, seq 128, batch 16, WSD (10% warmup, 20% decay), eval every 20%."""
    c = _CONFIG.value.copy_and_resolve_references()
    c.workdir, c.init_from = str(workdir), init_from
    c.model.update(dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=192))
    c.model.quant.weights, c.model.quant.group_size = ("ternary" if ternary else "none"), 32
    c.data.seq_len, c.data.eval_batches = 128, 4
    c.train.steps, c.train.batch_size, c.train.log_every_steps = steps, 16, 10
    c.optimizer.lr = lr
    c.schedule.warmup_fraction, c.schedule.decay_fraction = 0.1, 0.2
    c.eval.every_steps = max(steps // 5, 1)
    c.checkpoint.every_steps = max(steps // 10, 1)
    c.checkpoint.max_to_keep = 20
    return Config.from_dict(c.to_dict())


def eval_curve(workdir: pathlib.Path, offset: int) -> list[tuple[int, float]]:
    """(total step counting the source's steps, eval loss) of a run's metrics.jsonl."""
    lines = [
        json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    return [(m["step"] + offset, m["eval_loss"]) for m in lines if "eval_loss" in m]


def run_all(root: pathlib.Path, steps: int, fractions: list[float]) -> dict:
    """Trains every run (resuming finished ones is a no-op) and returns {name: {final, curve, ...}}."""
    one = jax.devices()[:1]
    results = {}

    def run(name: str, config: Config, offset: int = 0, **info) -> None:
        print(f"--- {name}: {config.train.steps} steps", flush=True)
        train(config, devices=one)
        results[name] = {
            "final_eval_loss": logged_metrics(config.workdir)["eval_loss"],
            "curve": eval_curve(pathlib.Path(config.workdir), offset),
            **info,
        }

    checkpoint_every = max(steps // 10, 1)
    run("fp32", proxy_config(root / "fp32", steps))
    run("ternary_scratch", proxy_config(root / "ternary_scratch", steps, ternary=True))
    for r in fractions:
        qat_steps = round(r * steps / checkpoint_every) * checkpoint_every
        source_step = steps - qat_steps  # a stable-phase checkpoint of the fp32 run (its decay starts at 80%)
        config = proxy_config(
            root / f"qat_{r:.0%}",
            qat_steps,
            ternary=True,
            lr=LR / 2,
            init_from=f"{root / 'fp32'}:{source_step}",
        )
        run(f"qat_{r:.0%}", config, offset=source_step, qat_fraction=r, source_step=source_step)
    return results


def plot(results: dict, tokens_per_step: int, path: pathlib.Path) -> None:
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        steps, losses = zip(*r["curve"])
        curves.plot([s * tokens_per_step / 1e6 for s in steps], losses, marker="o", label=name)
    curves.set(
        xlabel="tokens seen in total (M)", ylabel="eval loss", title="eval loss (QAT starts from fp32)"
    )
    curves.legend()
    names = list(results)
    bars.bar(names, [results[n]["final_eval_loss"] for n in names], color="tab:gray")
    low = min(results[n]["final_eval_loss"] for n in names)
    bars.set(ylabel="final eval loss", title="same token budget", ylim=(low * 0.95, None))
    bars.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv) -> None:
    del argv
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    steps = _STEPS.value
    results = run_all(pathlib.Path(_WORKDIR.value), steps, [float(f) for f in _FRACTIONS.value])
    config = proxy_config(pathlib.Path(_WORKDIR.value), steps)
    tokens_per_step = config.train.batch_size * config.data.seq_len
    summary = {"steps": steps, "tokens_per_step": tokens_per_step, "runs": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, tokens_per_step, out / "qat_vs_scratch.png")
    for name, r in results.items():
        print(f"{name:>16}: final eval loss {r['final_eval_loss']:.4f}")
    if _JSON.value:
        print(json.dumps({name: r["final_eval_loss"] for name, r in results.items()}))


if __name__ == "__main__":
    run(main)
