"""Metrics of a resumed run: what a killed attempt logged past the resume step is dropped from metrics.jsonl and
hidden in TensorBoard, so every step is logged once."""

import json
import pathlib
import struct

from tensorboardX.proto.event_pb2 import Event, SessionLog

from mct.train.metrics import MetricsWriter, logged_metrics


def killed_run(workdir: pathlib.Path) -> list[str]:
    """Steps 1-6 logged (an eval at 4), then a kill mid-line; returns the complete lines of metrics.jsonl."""
    writer = MetricsWriter(str(workdir))
    for step in range(1, 7):
        writer.write(step, {"loss": float(step)})
        if step == 4:
            writer.write(step, {"eval_loss": 2.5})
    writer.close()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    # the killed attempt's event file is older than the resumed one's (their names start with a timestamp)
    (events,) = (workdir / "tensorboard").iterdir()
    events.rename(events.with_name("events.out.tfevents.0000000001.killed"))
    return lines


def read_events(path: pathlib.Path) -> list[Event]:
    """The events of a TFRecord file: [length u64][crc u32][data][crc u32] records."""
    data, events, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        events.append(Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return events


def tensorboard_view(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each scalar as TensorBoard shows it: files in name order, and a SessionLog START at step
    s purges the events of steps >= s read before it."""
    view: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.iterdir()):
        for event in read_events(path):
            if event.session_log.status == SessionLog.START:
                view = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in view.items()}
            for value in event.summary.value:
                view.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {tag: points for tag, points in view.items() if points}


def test_resuming_drops_the_lines_past_the_resume_step_keeps_the_rest_exactly_and_appends(tmp_path):
    lines = killed_run(tmp_path)
    writer = MetricsWriter(str(tmp_path), resume_step=4)
    kept = lines[:5]  # steps 1-4 and the eval at 4: step 4's lines were written before its checkpoint
    assert [json.loads(line)["step"] for line in kept] == [1, 2, 3, 4, 4]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == kept
    writer.write(5, {"loss": 0.25})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [*kept, '{"step": 5, "loss": 0.25}']
    assert logged_metrics(str(tmp_path)) == {"step": 5, "loss": 0.25, "eval_loss": 2.5}
    assert not list(tmp_path.glob("*.tmp"))


def test_tensorboard_purges_the_steps_past_the_resume_step(tmp_path):
    killed_run(tmp_path)
    writer = MetricsWriter(str(tmp_path), resume_step=4)
    for step in (5, 6):
        writer.write(step, {"loss": 0.5})
    writer.close()
    resumed = sorted((tmp_path / "tensorboard").iterdir())[-1]
    starts = [e.step for e in read_events(resumed) if e.session_log.status == SessionLog.START]
    assert starts == [5]
    view = tensorboard_view(tmp_path / "tensorboard")
    assert view["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 0.5), (6, 0.5)]
    assert view["eval_loss"] == [(4, 2.5)]


def test_a_fresh_start_drops_all_history(tmp_path):
    killed_run(tmp_path)
    writer = MetricsWriter(str(tmp_path), resume_step=0)
    writer.write(1, {"loss": 9.0})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'
    assert tensorboard_view(tmp_path / "tensorboard") == {"loss": [(1, 9.0)]}


def test_a_disabled_writer_leaves_the_files_alone(tmp_path):
    """Processes other than 0 open a disabled writer: only process 0 rewrites the shared files."""
    killed_run(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    MetricsWriter(str(tmp_path), enabled=False, resume_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == before
