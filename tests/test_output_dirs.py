"""Output directories written whole (data_pipelines.output_dirs): a writer killed hard leaves its temporary
sibling behind, and the next writer of the same output removes it, but never a live writer's."""

import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from data_pipelines import output_dirs, prepare
from tests.data_fixtures import write_text_documents

REPO = pathlib.Path(__file__).resolve().parents[1]
# `python -c PREPARE_HANGING OUT INPUT`: prepare, stopped in the middle of writing OUT's temporary sibling (at
# its manifest, the last file), which it prints
PREPARE_HANGING = """
import sys, time
from data_pipelines import prepare, shards

def hang(directory, manifest):
    print(directory, flush=True)
    time.sleep(300)

shards.write_manifest = hang
prepare.prepare_dataset(sys.argv[1], [sys.argv[2]], vocab_size=300, workers=1, progress=False)
"""


def test_the_next_prepare_removes_what_a_killed_one_left_and_keeps_a_live_ones(tmp_path):
    """Two prepares of the same output stop in the middle of writing it; one is SIGKILLed. The next prepare
    removes the killed one's temporary sibling, and keeps the live one's and another host's."""
    raw, out = tmp_path / "docs.jsonl", tmp_path / "ds"
    write_text_documents(raw, 40, max_words=30)
    killed, live = (
        subprocess.Popen(
            [sys.executable, "-c", PREPARE_HANGING, str(out), str(raw)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    )
    try:
        killed_tmp, live_tmp = (pathlib.Path(p.stdout.readline().strip()) for p in (killed, live))
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        # another host's sibling (whose processes are unknown here), named for the killed pid all the same
        other_host = tmp_path / f".ds.tmp-not-{socket.gethostname()}-{killed.pid}-abcdefgh"
        other_host.mkdir()
        prepare.prepare_dataset(out, [str(raw)], vocab_size=300, workers=1, progress=False)
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [raw.name, out.name, live_tmp.name, other_host.name]
    ), f"{killed_tmp.name} was left"


def test_a_file_output_removes_a_dead_writers_sibling_and_keeps_a_live_ones(tmp_path):
    """GGUF files are written whole too (output_dirs.fresh_file): a killed export's temporary file goes, a live
    writer's and another host's stay, and the output is the block's file."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names a process of this host that is gone
    host, out = socket.gethostname(), tmp_path / "model.gguf"
    left = {
        "dead": tmp_path / f".model.gguf.tmp-{host}-{dead.pid}-abcdefgh",
        "live": tmp_path / f".model.gguf.tmp-{host}-{os.getpid()}-abcdefgh",
        "other host": tmp_path / f".model.gguf.tmp-not-{host}-{dead.pid}-abcdefgh",
    }
    for path in left.values():
        path.write_bytes(b"partial")
    with output_dirs.fresh_file(out) as tmp:
        tmp.write_bytes(b"GGUF")
    assert out.read_bytes() == b"GGUF" and oct(out.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, left["live"].name, left["other host"].name]
    )
    with pytest.raises(FileExistsError):  # never overwritten
        with output_dirs.fresh_file(out):
            pass
