"""`python -m mct.upcycle`: a dense run into a mixture-of-experts workdir.

A shim: mct/cli/upcycle.py is the entry point."""

from mct.cli import upcycle

if __name__ == "__main__":
    upcycle.entry()
