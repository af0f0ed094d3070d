"""`python -m mct.export`: export to HF safetensors, the ternary layout or GGUF.

A shim: mct/cli/export.py is the entry point."""

from mct.cli import export

if __name__ == "__main__":
    export.entry()
