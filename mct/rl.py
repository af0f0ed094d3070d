"""`python -m mct.rl`: RL with chunk-wise rollout. A shim: mct/cli/rl.py is the entry point."""

from mct.cli import rl

if __name__ == "__main__":
    rl.entry()
