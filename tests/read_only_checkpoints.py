"""`python -m tests.read_only_checkpoints CHECKPOINTS ARGS...`: `python -m mct.train ARGS...` in a process where
the directory CHECKPOINTS turns read-only once it holds a committed checkpoint (the run's first save).

Tests run as root, whom no directory permission stops, and may not mount a read-only filesystem; so the fault
is put in this process, at the call a read-only directory refuses first: a save begins by making its step's
directory in CHECKPOINTS, and os.mkdir (which orbax's paths and os.makedirs call) refuses a new entry there with
EROFS once a committed step directory (all digits) is in it. Renames, which commit the first save, are left
alone.
"""

import errno
import os
import pathlib
import runpy
import sys


def refuse_after_first_step(directory: pathlib.Path) -> None:
    """os.mkdir raises EROFS for a new entry of `directory` once a committed step (a name of digits) is there."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if pathlib.Path(path).parent == directory and any(p.name.isdigit() for p in directory.iterdir()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    os.mkdir = mkdir


if __name__ == "__main__":
    refuse_after_first_step(pathlib.Path(sys.argv.pop(1)).absolute())
    runpy.run_module("mct.train", run_name="__main__", alter_sys=True)
