"""`python -m mct.import_hf`: an HF checkpoint into a new workdir. A shim: mct/cli/import_hf.py is the entry point."""

from mct.cli import import_hf

if __name__ == "__main__":
    import_hf.entry()
