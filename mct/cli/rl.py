"""RL with chunk-wise rollout (MiniCPM4 report section 3.2):
python -m mct.rl --config experiments/configs/tiny_cpu_rl.py --config.init_from=SFT_WORKDIR

Flags and wiring only: `mct.posttrain.rl` runs it (its docstring says how).
"""

from mct.cli.train import entry_for
from mct.config.posttrain import RLRunConfig
from mct.posttrain.rl import train

entry = entry_for(train, RLRunConfig)


if __name__ == "__main__":
    entry()
