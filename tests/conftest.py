"""Test session setup: 8 simulated CPU devices (before JAX initialises), a fixed matmul peak (each training run
would otherwise measure it; tests/test_hooks.py measures it once), one persistent compilation cache and shared
tiny fixtures."""

import fcntl
import os
import pathlib
import tempfile

import pytest

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MCT_MATMUL_PEAK", "1e11")  # mct.model.flops reads it, in subprocesses too
# XLA's persistent cache, shared by both xdist workers and every CLI a test starts: a tiny program that many
# tests build (the same train step, the same decode loop) compiles once per machine, not once per process.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", f"{tempfile.gettempdir()}/mct-tests-xla-cache-{os.getuid()}"
)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """(workdir, dataset) of a 2-step tiny pre-training run: the init_from of the post-training tests."""
    import jax

    from tests.tiny_runs import pretrain_source

    return pretrain_source(tmp_path_factory.mktemp("pretrained"), jax.devices()[:1])


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> pathlib.Path:
    """A directory every xdist worker of this session sees (the workers' base temp dirs share a parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_dataset(shared_dir) -> pathlib.Path:
    """The tests' tiny prepared dataset (vocab tiny_runs.VOCAB), prepared once a session by the first worker that
    asks, under an exclusive lock the others wait on."""
    from tests.data_fixtures import make_tiny_dataset
    from tests.tiny_runs import VOCAB

    with (shared_dir / "tiny_dataset.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        dataset = shared_dir / "tiny" / "dataset"
        if not (dataset / "manifest.json").is_file():
            make_tiny_dataset(shared_dir / "tiny", vocab_size=VOCAB, num_docs=60)
    return dataset
