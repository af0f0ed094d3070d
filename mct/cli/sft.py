"""Supervised fine-tuning on chat data (MiniCPM4 report, SFT):
python -m mct.sft --config experiments/configs/tiny_cpu_sft.py --config.workdir W --config.init_from=PRETRAIN_WORKDIR

The run is a pre-training run (mct.run.pretrain: lock, resume, hooks, checkpoints, SIGTERM save) whose mixture is
the chat files of data.chat, each prepared once with the source run's tokenizer into a masked dataset
(mct/posttrain/chat_data.py), so the loss covers assistant content and its `<|im_end|>` only. It starts from
init_from's params with a fresh optimizer; with schedule.lr_from_init the WSD peak is the source's final lr.
A batch or an eval set without loss tokens is an error naming the chat files.
"""

from mct.cli.train import entry_for
from mct.posttrain.sft import train_sft

entry = entry_for(train_sft)


if __name__ == "__main__":
    entry()
