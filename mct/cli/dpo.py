"""Direct preference optimisation (Rafailov et al. 2023; MiniCPM-DPO, MiniCPM paper section 7):
python -m mct.dpo --config experiments/configs/tiny_cpu_dpo.py --config.workdir W --config.init_from=SFT_WORKDIR

Flags and wiring only: `mct.posttrain.dpo` runs it (its docstring says how).
"""

from mct.cli.train import entry_for
from mct.config.posttrain import DPORunConfig
from mct.posttrain.dpo import train_dpo

entry = entry_for(train_dpo, DPORunConfig)


if __name__ == "__main__":
    entry()
