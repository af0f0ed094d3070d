"""`python -m mct.train`: pre-training. A shim: mct/cli/train.py is the entry point."""

from mct.cli import train

if __name__ == "__main__":
    train.entry()
