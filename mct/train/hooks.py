"""The train loop's hooks (Trainer.add_hook): metrics lines (and MFU), eval, the profiler.

Each is a small callable over a StepInfo; `mct.run.training_run` registers them with their `every` / `at` steps.
"""

import logging
import pathlib
import time
from collections.abc import Callable

import jax
from tqdm import tqdm

from mct.config.run import Config
from mct.model.decoder import compute_dtype
from mct.model.flops import measure_matmul_peak, train_flops_per_token
from mct.train.metrics import MetricsWriter
from mct.train.trainer import StepInfo

log = logging.getLogger("mct.train")


class StepLog:
    """A metrics hook: writes a logged step's line (metrics.jsonl, TensorBoard), shows it on the progress bar
    and keeps it in `last`; each kind of run says what its bar shows (`postfix`), and its line when it is not
    the step's metrics as they are (`line`)."""

    def __init__(self, writer: MetricsWriter, bar: tqdm, start: int):
        self.writer, self.bar = writer, bar
        self.last: dict = {"step": start}

    def __call__(self, info: StepInfo) -> None:
        line = self.line(info)
        self.writer.write(info.step, line)
        self.bar.set_postfix_str(self.postfix(line))
        self.last.update(line, step=info.step)

    def line(self, info: StepInfo) -> dict:
        """The logged metrics of the step (without "ok")."""
        return {k: v for k, v in info.metrics.items() if k != "ok"}

    def postfix(self, line: dict) -> str:
        """The progress bar's text of a line."""
        raise NotImplementedError


class MetricsLog(StepLog):
    """Writes loss, lr, grad norm, tokens/s, MFU, the loss-token count and the objective's extra metrics to
    metrics.jsonl, TensorBoard and the progress bar.

    MFU = model FLOPs per second / (one device's measured matmul peak x the number of devices): the FLOPs are
    the global batch's, so the peak is the whole mesh's."""

    def __init__(self, config: Config, writer: MetricsWriter, bar: tqdm, start: int, n_devices: int):
        super().__init__(writer, bar, start)
        self.config = config
        seq = config.data.seq_len
        self.flops_per_step = train_flops_per_token(config.model, seq) * config.train.batch_size * seq
        self.peak = measure_matmul_peak(dtype=compute_dtype(config.model)) * n_devices
        self.t_mark, self.step_mark = time.perf_counter(), start

    def __call__(self, info: StepInfo) -> None:
        super().__call__(info)
        self.t_mark, self.step_mark = time.perf_counter(), info.step

    def line(self, info: StepInfo) -> dict:
        c, m = self.config, info.metrics
        rate = max(info.step - self.step_mark, 1) / (
            time.perf_counter() - self.t_mark
        )  # 1st includes compile
        return {
            "loss": m["loss"],
            "lr": m["lr"],
            "grad_norm": m["grad_norm"],
            "tokens_per_s": rate * c.train.batch_size * c.data.seq_len,
            "mfu": rate * self.flops_per_step / self.peak,
            "nonfinite_steps": m["nonfinite_steps"],
            "loss_tokens": m["tokens"],
            **{
                k: v
                for k, v in m.items()
                if k not in ("loss", "lr", "grad_norm", "ok", "tokens", "nonfinite_steps")
            },
        }

    def postfix(self, line: dict) -> str:
        return (
            f"loss {line['loss']:.4f} | {line['tokens_per_s']:,.0f} tok/s | mfu {line['mfu']:.3f} | "
            f"lr {line['lr']:.2e}"
        )


class Evaluator:
    """Mean token loss of every eval set (held-out split, ScalingBench solutions) of the params."""

    def __init__(self, eval_fn: Callable, eval_sets: dict[str, list]):
        self.eval_fn, self.eval_sets = eval_fn, eval_sets

    def __call__(self, params: dict) -> dict[str, float]:
        out = {}
        for name, batches in self.eval_sets.items():
            sums = [self.eval_fn(params, b) for b in batches]
            total, count = (sum(float(x[i]) for x in sums) for i in (0, 1))
            out[name] = total / max(count, 1.0)
        return out

    def hook(self, writer: MetricsWriter, bar: tqdm, last: dict) -> Callable[[StepInfo], None]:
        """Evaluates the state's params, writes the losses and keeps them in `last`."""

        def run(info: StepInfo) -> None:
            losses = self(info.state["params"])
            last.update(losses)
            writer.write(info.step, losses)
            if jax.process_index() == 0:
                bar.write(f"step {info.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))

        return run


def profile_hook(workdir: str, first: int, last: int) -> Callable[[StepInfo], None]:
    """A jax.profiler trace of steps first+1 .. last into WORKDIR/profile (TensorBoard's profile plugin)."""
    directory = str(pathlib.Path(workdir) / "profile")

    def run(info: StepInfo) -> None:
        if info.step == first:
            jax.profiler.start_trace(directory)
        elif info.step == last:
            jax.block_until_ready(info.state)
            jax.profiler.stop_trace()
            log.info("profile of steps %d-%d written to %s", first + 1, last, directory)

    return run
