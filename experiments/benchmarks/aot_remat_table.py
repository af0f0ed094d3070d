"""Bytes per device, fit and the TPU compiler's estimated step time by remat policy, from `mct.aot --json`: the
README's table (and a bar chart).

    python -m experiments.benchmarks.aot_remat_table --json [--rows 8b:v5p-64,8b:v5p-128,0p5b:v5e-8]
        [--policies none,full,...] [--out aot_remat.jsonl] [--png aot_remat.png]

Each (config, topology, policy) is one `python -m mct.aot --config ... --topology ... --config.model.remat=P
--json` process run after the other (an 8B compile takes up to a minute of CPU and several GB). Results are
appended to --out as they come, so a rerun skips what is there; the last line with --json is one object with
every row.
"""

import json
import subprocess
import sys
from pathlib import Path

import tqdm
from absl import flags

from mct.cli.common import run
from mct.config.model import REMAT_NAMES

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"8b": "experiments/configs/minicpm4_8b.py", "0p5b": "experiments/configs/minicpm4_0p5b.py"}
POLICIES = REMAT_NAMES[:7]  # the named policies; the rest are jax's own names

_ROWS = flags.DEFINE_list("rows", ["8b:v5p-64", "8b:v5p-128", "0p5b:v5e-8"], "config:topology pairs.")
_POLICIES = flags.DEFINE_list("policies", list(POLICIES), "model.remat policies.")
_OVERRIDES = flags.DEFINE_list("overrides", [], "Extra --config.KEY=VALUE overrides for every compile.")
_OUT = flags.DEFINE_string("out", "aot_remat.jsonl", "Results, one JSON line per compile (resumable).")
_PNG = flags.DEFINE_string("png", "aot_remat.png", "Bar chart of GiB per device ('' = none).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")

GiB = 2**30


def compile_one(config: str, topology: str, policy: str, overrides: list[str]) -> dict:
    """mct.aot's JSON report (exit 0 fits, 3 does not); {"error": line} for anything else."""
    command = [
        sys.executable,
        "-m",
        "mct.aot",
        "--config",
        str(REPO / CONFIGS[config]),
        "--topology",
        topology,
        f"--config.model.remat={policy}",
        *(f"--config.{o}" for o in overrides),
        "--json",
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if out.returncode not in (0, 3):
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """Markdown: one line per (config, topology, policy)."""
    lines = [
        "| config | topology | mesh | remat | GiB per device | fits | estimated step s | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = " ".join([f"minicpm4_{r['config']}", *r.get("overrides", ())])
        if "error" in r:
            lines.append(f"| {name} | {r['topology']} | | {r['policy']} | error: {r['error']} | | | |")
            continue
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        seconds = r.get("estimated_step_s")  # the TPU compiler's estimate; only where it fits
        lines.append(
            f"| {name} | {r['topology']} | {mesh} | {r['policy']} | {r['bytes_per_device'] / GiB:.2f} "
            f"| {'yes' if r['fits'] else 'no'} | {'' if seconds is None else f'{seconds:.2f}'} "
            f"| {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def draw(rows: list[dict], path: str) -> None:
    """Grouped bars: GiB per device by policy, one group per (config, topology), HBM as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = lambda r: (r["config"], r["topology"], " ".join(r.get("overrides", ())))
    groups = list(dict.fromkeys(group(r) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (config, topology, overrides) in zip(axes[0], groups):
        mine = [r for r in rows if group(r) == (config, topology, overrides) and "error" not in r]
        ax.bar(
            [r["policy"] for r in mine],
            [r["bytes_per_device"] / GiB for r in mine],
            color=["tab:green" if r["fits"] else "tab:red" for r in mine],
        )
        if mine:
            ax.axhline(mine[0]["hbm_per_device"] / GiB, color="k", linestyle="--", label="HBM per chip")
        ax.set_yscale("log")
        ax.set_title(f"minicpm4_{config} on {topology} {overrides}".strip())
        ax.set_ylabel("GiB per device")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str]) -> None:
    del argv
    out = Path(_OUT.value)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = [r for r in done if "error" not in r]  # a failed compile is retried
    key = lambda r: (r["config"], r["topology"], r["policy"], tuple(r.get("overrides", ())))
    have = {key(r) for r in done}
    extra = tuple(_OVERRIDES.value)
    todo = [
        (c, t, p, extra) for c, _, t in (row.partition(":") for row in _ROWS.value) for p in _POLICIES.value
    ]
    for config, topology, policy, _ in tqdm.tqdm([x for x in todo if x not in have], desc="compiles"):
        report = {
            "config": config,
            "topology": topology,
            "policy": policy,
            "overrides": list(extra),
            **compile_one(config, topology, policy, list(extra)),
        }
        with out.open("a") as f:
            f.write(json.dumps(report) + "\n")
        done.append(report)
    rows = sorted((r for r in done if key(r) in set(todo)), key=lambda r: todo.index(key(r)))
    print(table(rows))
    if _PNG.value:
        draw(rows, _PNG.value)
    if _JSON.value:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    run(main)
