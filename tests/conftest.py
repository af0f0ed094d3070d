"""Test session setup: 8 simulated CPU devices (before JAX initialises), a fixed matmul peak (each training run
would otherwise measure it; tests/test_hooks.py measures it once) and shared tiny fixtures."""

import os

import pytest

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MCT_MATMUL_PEAK", "1e11")  # mct.model.flops reads it, in subprocesses too


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """(workdir, dataset) of a 2-step tiny pre-training run: the init_from of the post-training tests."""
    import jax

    from tests.tiny_runs import pretrain_source

    return pretrain_source(tmp_path_factory.mktemp("pretrained"), jax.devices()[:1])
