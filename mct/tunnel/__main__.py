"""`python -m mct.tunnel`: ModelTunnel v2 sweeps, fits, reports, coord check.

A shim: mct/cli/tunnel.py is the entry point."""

from mct.cli import tunnel

if __name__ == "__main__":
    tunnel.entry()
