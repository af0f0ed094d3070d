"""The tiny post-training chain on CPU: pretrain -> SFT -> RL on the arithmetic task (docs/posttrain.md).

python -m experiments.posttrain.tiny_chain [--work_dir /tmp/mct-chain --pretrain_steps 300 --sft_steps 100
    --rl_steps 60] [--stage_flag=--config.KEY=VALUE ...] [--json]

Runs the three entry points as a user would (mct.train, mct.sft, mct.rl, each resuming if its workdir already
has checkpoints), then decodes held-out arithmetic prompts (none of RL's training prompts) greedily with the
SFT and the RL params and scores them with the numeric reward. Writes chain.png (RL's reward curve and the
accuracy before / after RL) and chain.json into the work dir.
"""

import json
import pathlib
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import flags  # noqa: E402

from data_pipelines.chat import encode_chat, im_end_id  # noqa: E402
from mct.cli.common import run  # noqa: E402
from mct.infer.decoding import generate  # noqa: E402
from mct.posttrain.rewards import numeric  # noqa: E402
from mct.posttrain.rl import arithmetic_items  # noqa: E402
from mct.run.reader import RunCheckpoint  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/mct-chain", "Where the three runs live.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 300, "Pre-training steps (tiny_cpu).")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 100, "SFT steps (tiny_cpu_sft).")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 60, "RL steps (tiny_cpu_rl).")
_HELD_OUT = flags.DEFINE_integer("held_out", 200, "Held-out prompts scored before and after RL.")
_STAGE_FLAGS = flags.DEFINE_multi_string(
    "stage_flag", [], "A flag for every stage after this script's own (e.g. --config.model.n_layers=1)."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def run_stage(module: str, config: str, workdir: pathlib.Path, *flags_: str) -> None:
    command = [
        sys.executable,
        "-m",
        module,
        "--config",
        str(REPO / "experiments/configs" / config),
        f"--config.workdir={workdir}",
        *flags_,
        *_STAGE_FLAGS.value,
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def accuracy(workdir: pathlib.Path, items: list[dict]) -> float:
    """Greedy answers of the run's params to the items' prompts, scored by the numeric reward."""
    run = RunCheckpoint(str(workdir))
    tokenizer = run.tokenizer()
    prompts = [
        encode_chat(tokenizer, [{"role": "user", "content": item["prompt"]}], add_generation_prompt=True)[0]
        for item in items
    ]
    outputs = generate(
        run.model_cfg, run.read_params(), prompts, max_new_tokens=24, eos_id=im_end_id(tokenizer)
    )
    return sum(numeric(tokenizer.decode(out), item) for out, item in zip(outputs, items)) / len(items)


def main(argv: list[str]) -> None:
    del argv
    work = pathlib.Path(_WORK_DIR.value)
    pretrain, sft, rl = work / "pretrain", work / "sft", work / "rl"
    run_stage("mct.train", "tiny_cpu.py", pretrain, f"--config.train.steps={_PRETRAIN_STEPS.value}")
    run_stage(
        "mct.sft",
        "tiny_cpu_sft.py",
        sft,
        f"--config.init_from={pretrain}",
        f"--config.train.steps={_SFT_STEPS.value}",
    )
    run_stage(
        "mct.rl", "tiny_cpu_rl.py", rl, f"--config.init_from={sft}", f"--config.train.steps={_RL_STEPS.value}"
    )
    training = frozenset(item["prompt"] for item in arithmetic_items(512, seed=0))  # what mct.rl trains on
    held_out = arithmetic_items(_HELD_OUT.value, seed=1, exclude=training)
    before, after = accuracy(sft, held_out), accuracy(rl, held_out)
    lines = [json.loads(line) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    curve = [(m["step"], m["reward_mean"]) for m in lines if "reward_mean" in m]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(*zip(*curve), marker=".")
    left.set(
        xlabel="RL step", ylabel="mean reward of completed groups", title="RL reward (numeric, arithmetic)"
    )
    right.bar(["after SFT", "after RL"], [before, after], color=["tab:gray", "tab:blue"])
    right.set(ylabel="held-out accuracy (greedy)", ylim=(0, 1), title=f"{len(held_out)} held-out prompts")
    for x, v in enumerate((before, after)):
        right.text(x, v + 0.02, f"{v:.3f}", ha="center")
    fig.tight_layout()
    fig.savefig(work / "chain.png", dpi=110)
    report = {
        "accuracy_sft": before,
        "accuracy_rl": after,
        "reward_curve": curve,
        "steps": {"pretrain": _PRETRAIN_STEPS.value, "sft": _SFT_STEPS.value, "rl": _RL_STEPS.value},
    }
    (work / "chain.json").write_text(json.dumps(report, indent=1))
    print(f"held-out accuracy: after SFT {before:.3f}, after RL {after:.3f}; plot: {work / 'chain.png'}")
    if _JSON.value:
        print(json.dumps(report))


if __name__ == "__main__":
    run(main)
