"""Supervised fine-tuning on chat data (MiniCPM4 report, SFT):
python -m mct.sft --config experiments/configs/tiny_cpu_sft.py --config.workdir W --config.init_from=PRETRAIN_WORKDIR

Flags and wiring only: `mct.posttrain.sft` runs it (its docstring says how).
"""

from mct.cli.train import entry_for
from mct.posttrain.sft import train_sft

entry = entry_for(train_sft)


if __name__ == "__main__":
    entry()
