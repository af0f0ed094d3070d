"""The loop's pieces: hooks fire when due and see their step's metrics before the state hooks; MFU is per mesh."""

from mct.config.run import Config
from mct.model import flops
from mct.train import hooks
from mct.train.trainer import Hook, StepInfo


class _Null:
    def write(self, *_): ...
    def set_postfix_str(self, *_): ...


def test_mfu_divides_by_the_peak_of_every_device(monkeypatch):
    monkeypatch.setattr(hooks, "measure_matmul_peak", lambda dtype: 1e11)
    clock = iter([0.0, 2.0, 2.0] * 2)  # per log: its start, the rate, the next mark
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: next(clock))
    config = Config.from_dict({"data": {"seq_len": 32}, "train": {"batch_size": 8}})
    metrics = {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "nonfinite_steps": 0, "tokens": 64.0}
    mfu = {}
    for n in (1, 4):
        log = hooks.MetricsLog(config, _Null(), _Null(), start=0, n_devices=n)
        log(StepInfo(step=10, metrics=metrics, state=None))  # 10 steps in 2 s
        mfu[n] = log.last["mfu"]
    assert abs(mfu[1] - 5 * log.flops_per_step / 1e11) < 1e-12
    assert abs(mfu[1] / mfu[4] - 4.0) < 1e-9


def test_hook_due_every_and_at():
    hook = Hook(fn=print, every=5, at=frozenset({7}), needs_state=False)
    assert [s for s in range(1, 13) if hook.due(s)] == [5, 7, 10]


def test_matmul_peak_is_measured_unless_overridden(monkeypatch):
    monkeypatch.delenv("MCT_MATMUL_PEAK")
    measured = flops.measure_matmul_peak(n=256, repeats=2)
    assert 1e8 < measured < 1e16  # any CPU or accelerator: above 0.1 GFLOP/s, below 10 PFLOP/s
    monkeypatch.setenv("MCT_MATMUL_PEAK", "2.5e12")
    assert flops.measure_matmul_peak() == 2.5e12
