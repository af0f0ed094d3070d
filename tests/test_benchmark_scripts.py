"""Every experiments/benchmarks script runs at tiny size and prints its --json line (tests/experiment_scripts.py):
a benchmark that no longer imports, or calls an API that moved, fails here rather than in the next lab session."""

import pytest

from tests.experiment_scripts import BENCHMARKS, run_script


@pytest.mark.parametrize("module", sorted(BENCHMARKS))
def test_benchmark_runs_tiny_and_prints_json(module, tiny_dataset, tmp_path):
    flags, key = BENCHMARKS[module]
    report = run_script(module, flags(tmp_path, tiny_dataset))
    assert key in report, report
    failed = [row for row in report.get("rows", ()) if "error" in row]  # aot_remat_table keeps them as rows
    assert not failed, failed
