"""Every other experiments/*/*.py script runs at tiny size and prints its --json line, and every script has a
smoke run here or in tests/test_benchmark_scripts.py (a new script without one fails)."""

import pytest

from tests.experiment_scripts import BENCHMARKS, OTHERS, run_script, script_modules


def test_every_script_has_a_smoke_run():
    assert script_modules() == set(BENCHMARKS) | set(OTHERS)


@pytest.mark.parametrize("module", sorted(OTHERS))
def test_script_runs_tiny_and_prints_json(module, tiny_dataset, tmp_path):
    flags, key = OTHERS[module]
    assert key in run_script(module, flags(tmp_path, tiny_dataset))
