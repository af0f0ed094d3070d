"""Run metrics to WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events."""

import json
import os
import pathlib

from tensorboardX import SummaryWriter


def logged_metrics(workdir: str) -> dict:
    """The latest value of every metric in WORKDIR/metrics.jsonl ({} when there is none)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    latest = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                latest.update(json.loads(line))
    return latest


def _drop_lines_after(path: pathlib.Path, step: int) -> None:
    """Rewrites a metrics.jsonl without its lines past `step` (and any line a kill tore), atomically: a kill
    during the rewrite leaves the old file or the new one."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # torn by a kill mid-write
            pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsWriter:
    """Appends to the run's metrics; a resumed run continues the same files. Disabled off process 0.

    A run resuming at step N (resume_step=N; 0 for a fresh start) first drops what an earlier, killed attempt
    logged past N, so that every step is logged once: metrics.jsonl is rewritten without those lines, and
    TensorBoard is told to purge them (a SessionLog START at step N + 1 hides the events of later steps
    written before it).
    """

    def __init__(self, workdir: str, enabled: bool = True, *, resume_step: int | None = None):
        self.enabled = enabled
        if enabled:
            path = pathlib.Path(workdir)
            path.mkdir(parents=True, exist_ok=True)
            jsonl = path / "metrics.jsonl"
            if resume_step is not None and jsonl.exists():
                _drop_lines_after(jsonl, resume_step)
            self._jsonl = open(jsonl, "a")
            purge_step = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(path / "tensorboard"), purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
