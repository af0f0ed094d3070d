"""`python -m mct.sft`: supervised fine-tuning. A shim: mct/cli/sft.py is the entry point."""

from mct.cli import sft

if __name__ == "__main__":
    sft.entry()
