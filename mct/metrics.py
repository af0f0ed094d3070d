"""Run metrics to WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events."""

import json
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


class MetricsWriter:
    """Appends to the run's metrics; a resumed run continues the same files. Disabled off process 0."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            path = pathlib.Path(workdir)
            path.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(path / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(path / "tensorboard"))

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
