"""Pre-training entry point: python -m mct.train --config experiments/configs/tiny_cpu.py --config.workdir DIR

Builds the mesh, model, optimizer and data from one ml_collections config, resumes from the workdir's
latest committed checkpoint (or starts a decay branch from another run's stable checkpoint), then runs
jitted steps with periodic eval, metrics and async orbax checkpoints. SIGTERM saves and exits 0.
"""

import logging
import math
import pathlib
import shutil
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

from data_pipelines.loader import (
    load_tokenizer,
    make_eval_batches,
    make_train_iterator,
    merge_states,
    resolve_dataset,
)
from data_pipelines.shards import DatasetError
from data_pipelines.tokenizer import BOS, EOS, special_token_ids
from mct.checkpoint import Checkpointer, abstract_with_shardings, model_signature
from mct.distributed import gather_json, global_batch, initialize
from mct.flops import measure_matmul_peak, train_flops_per_token
from mct.metrics import MetricsWriter, logged_metrics
from mct.model import ParamsModel, compute_dtype
from mct.optimizer import make_optimizer
from mct.schedule import schedule_from_config
from mct.sharding import ConfigError, logical_spec, make_mesh, named
from mct.train_step import make_eval_step, make_train_step
from mct.tunnel.scalingbench import make_scalingbench_batches
from mct.validate import validate_config

log = logging.getLogger("mct.train")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the workdir keeps its last good checkpoint."""


def state_specs(model: ParamsModel, tx: optax.GradientTransformation):
    """PartitionSpecs of {"params", "opt_state"}: an optimizer leaf stored under a parameter's name with that
    parameter's shape (Adam's moments) is sharded like it; everything else (counts) is replicated."""
    params = jax.tree.map(
        logical_spec, model.metadata("logical_axes"), is_leaf=lambda x: isinstance(x, tuple)
    )
    shapes = {name: x.shape for name, x in model.abstract().items()}

    def spec(path, leaf) -> PartitionSpec:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = next((n for n in reversed(names) if n in params), None)
        return params[name] if name is not None and shapes[name] == leaf.shape else PartitionSpec()

    opt_state = jax.tree_util.tree_map_with_path(spec, jax.eval_shape(tx.init, model.abstract()))
    return {"params": params, "opt_state": opt_state}


def apply_branch(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A decay branch runs from branch_step for decay_steps: its train.steps is their sum."""
    if config.schedule.branch_from:
        config = ml_collections.ConfigDict(config.to_dict())
        config.train.steps = config.schedule.branch_step + config.schedule.decay_steps
    return config


def restore_branch_source(config, abstract_state):
    """(state, data_state) from the stable-phase checkpoint a decay branch starts from; never writes there."""
    s = config.schedule
    source = Checkpointer(s.branch_from, read_only=True)
    meta = (
        source.check_compatible(s.branch_step, config.model) if s.branch_step in source.all_steps() else None
    )
    if meta is None:
        raise ConfigError(
            f"config schedule.branch_step={s.branch_step}: no committed checkpoint at that step in "
            f"{s.branch_from} (have {source.all_steps()})"
        )
    if s.branch_step > meta["decay_start"]:  # at decay_start itself the lr is still the stable one
        raise ConfigError(
            f"config schedule.branch_step={s.branch_step} is in the decay phase of {s.branch_from} (decay starts at "
            f"step {meta['decay_start']}); a branch must start from a stable-phase checkpoint"
        )
    state, data_state, _ = source.restore(s.branch_step, abstract_state)
    source.close()
    if meta["data_mixture"] != config.data.mixture.to_dict():
        log.info("decay branch switches the data mixture: the data iterator starts fresh")
        data_state = None
    return state, data_state


def scalingbench_batches(config: ml_collections.ConfigDict) -> list[dict]:
    """ScalingBench (eval.scalingbench: "default" or a JSONL path) in global batches, tokenized with the
    tokenizer of the first dataset of the mixture."""
    tokenizer = load_tokenizer(first_dataset(config))
    ids = special_token_ids(tokenizer)
    path = None if config.eval.scalingbench == "default" else config.eval.scalingbench
    return make_scalingbench_batches(
        tokenizer, seq_len=config.data.seq_len, batch_size=config.train.batch_size, path=path,
        bos_id=ids[BOS], eos_id=ids[EOS],
    )  # fmt: skip


def first_dataset(config: ml_collections.ConfigDict) -> pathlib.Path:
    """The prepared directory of the mixture's first dataset (whose tokenizer the run uses)."""
    first = next(iter(config.data.mixture.values()))
    return resolve_dataset(first.path, cache_dir=config.data.cache_dir, vocab_size=config.data.vocab_size)


def keep_tokenizer(config: ml_collections.ConfigDict) -> None:
    """Copies the run's tokenizer.json into the workdir, so export and generation need no dataset."""
    target = pathlib.Path(config.workdir) / "tokenizer.json"
    if not target.exists():
        shutil.copyfile(first_dataset(config) / "tokenizer.json", target)


def _metrics_line(m: dict) -> str:
    return f"loss {m['loss']:.4f} | {m['tokens_per_s']:,.0f} tok/s | mfu {m['mfu']:.3f} | lr {m['lr']:.2e}"


def initial_state(config, ckpt: Checkpointer, model: ParamsModel, tx, shardings, abstract_state):
    """(start step, state, data state): the workdir's latest committed checkpoint, else a decay branch's source
    checkpoint, else a fresh initialisation (data state None: the iterator starts at the beginning)."""
    restored = ckpt.restore_latest(abstract_state, config.model)
    if restored is not None:
        log.info("resumed from %s step %d", ckpt.directory, restored[0])
        return restored
    if config.schedule.branch_from:
        state, data_state = restore_branch_source(config, abstract_state)
        log.info("decay branch from %s step %d", config.schedule.branch_from, config.schedule.branch_step)
        return config.schedule.branch_step, state, data_state
    init = jax.jit(lambda: {"params": (p := model.init(config.seed)), "opt_state": tx.init(p)},
                   out_shardings=shardings)  # fmt: skip
    return 0, init(), None


def make_eval_sets(config: ml_collections.ConfigDict, batch_sharding: NamedSharding) -> dict[str, list]:
    """Global eval batches by metric name: the held-out split, and ScalingBench when eval.scalingbench is set."""
    pid, nproc = jax.process_index(), jax.process_count()
    local_batch = config.train.batch_size // nproc
    held_out = make_eval_batches(
        config.data, batch_size=local_batch, num_batches=config.data.eval_batches,
        process_index=pid, process_count=nproc, model_vocab_size=config.model.vocab_size,
    )  # fmt: skip
    eval_sets = {"eval_loss": [global_batch(b, batch_sharding) for b in held_out]}
    if config.eval.scalingbench:
        rows = slice(pid * local_batch, (pid + 1) * local_batch)
        eval_sets["scalingbench_loss"] = [
            global_batch({k: v[rows] for k, v in b.items()}, batch_sharding)
            for b in scalingbench_batches(config)
        ]
    return eval_sets


class StepLog:
    """Reads a finished step's metrics (one step late, so the host never stalls the device): counts non-finite
    steps and stops the run after train.max_consecutive_nonfinite of them; every log_every_steps writes loss,
    lr, grad norm, tokens/s and MFU to metrics.jsonl, TensorBoard and the progress bar."""

    def __init__(self, config: ml_collections.ConfigDict, writer: MetricsWriter, bar: tqdm, start: int,
                 ckpt: Checkpointer):  # fmt: skip
        self.config, self.writer, self.bar, self.ckpt = config, writer, bar, ckpt
        seq = config.data.seq_len
        self.flops_per_step = train_flops_per_token(config.model, seq) * config.train.batch_size * seq
        self.peak = measure_matmul_peak(dtype=compute_dtype(config.model))
        self.last = {"step": start}
        self.nonfinite_run = self.nonfinite_total = 0
        self.t_mark, self.step_mark = time.perf_counter(), start

    def finish(self, step: int, device_metrics) -> None:
        c = self.config
        m = jax.device_get(device_metrics)
        if not m["ok"]:
            self.nonfinite_run, self.nonfinite_total = self.nonfinite_run + 1, self.nonfinite_total + 1
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            if self.nonfinite_run >= c.train.max_consecutive_nonfinite:
                raise TrainingDiverged(
                    f"stopping: {self.nonfinite_run} consecutive non-finite steps up to step {step} "
                    f"(train.max_consecutive_nonfinite); last good checkpoint: step {self.ckpt.latest_step()} "
                    f"in {self.ckpt.directory}"
                )
        else:
            self.nonfinite_run = 0
        if step % c.train.log_every_steps == 0 or step == c.train.steps:
            # the first interval of a run includes compilation
            rate = max(step - self.step_mark, 1) / (time.perf_counter() - self.t_mark)
            line = {
                "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                "tokens_per_s": rate * c.train.batch_size * c.data.seq_len,
                "mfu": rate * self.flops_per_step / self.peak, "nonfinite_steps": self.nonfinite_total,
            }  # fmt: skip
            self.writer.write(step, line)
            self.bar.set_postfix_str(_metrics_line(line))
            self.last.update(line, step=step)
            self.t_mark, self.step_mark = time.perf_counter(), step


def train(config: ml_collections.ConfigDict, devices: list | None = None) -> dict:
    """Runs (or resumes) training to config.train.steps on `devices` (default: all); returns the last logged
    metrics and eval loss."""
    config = apply_branch(config)
    devices = jax.devices() if devices is None else devices
    validate_config(config, len(devices), jax.process_count())
    mesh = make_mesh(config.mesh, devices)
    model = ParamsModel(config.model)
    tx = make_optimizer(config, model)
    schedule = schedule_from_config(config)
    pid, nproc = jax.process_index(), jax.process_count()
    steps = config.train.steps

    with jax.set_mesh(mesh):
        shardings = named(mesh, state_specs(model, tx))
        abstract_state = abstract_with_shardings(
            {"params": model.abstract(), "opt_state": jax.eval_shape(tx.init, model.abstract())}, shardings
        )
        ckpt = Checkpointer(config.workdir, max_to_keep=config.checkpoint.max_to_keep,
                            async_save=config.checkpoint.async_save)  # fmt: skip
        start, state, data_state = initial_state(config, ckpt, model, tx, shardings, abstract_state)

        local_batch = config.train.batch_size // nproc
        train_iter = make_train_iterator(
            config.data, batch_size=local_batch, process_index=pid, process_count=nproc,
            model_vocab_size=config.model.vocab_size, state=data_state,
        )  # fmt: skip
        batch_sharding = NamedSharding(mesh, logical_spec(("batch", None)))
        eval_sets = make_eval_sets(config, batch_sharding)
        step_fn = jax.jit(
            make_train_step(model, tx, schedule, config.train.grad_accum),
            in_shardings=(shardings, batch_sharding, None),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        eval_fn = jax.jit(make_eval_step(model))

        def evaluate(params) -> dict[str, float]:
            """Mean token loss of every eval set (held-out split, ScalingBench solutions)."""
            out = {}
            for name, batches in eval_sets.items():
                sums = [eval_fn(params, b) for b in batches]
                total, count = (sum(float(x[i]) for x in sums) for i in (0, 1))
                out[name] = total / max(count, 1.0)
            return out

        meta = {
            "config": config.to_dict(),
            "model_signature": model_signature(config.model),
            "data_mixture": config.data.mixture.to_dict(),
            "decay_start": steps - config.schedule.decay_steps,
        }

        def save(step: int, force: bool = False) -> None:
            data = merge_states(gather_json(train_iter.get_state()))
            ckpt.save(step, state, data, {**meta, "step": step}, force=force)

        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())

        writer = MetricsWriter(config.workdir, enabled=pid == 0)
        if pid == 0:
            keep_tokenizer(config)
        bar = tqdm(total=steps, initial=start, desc="train", disable=pid != 0, dynamic_ncols=True)
        step_log = StepLog(config, writer, bar, start, ckpt)
        pending = None  # (step, device metrics) of the step before the one in flight: read without stalling
        step = start
        try:
            for step in range(start, steps):
                if stop.is_set():
                    break
                batch = global_batch(next(train_iter), batch_sharding)
                state, metrics = step_fn(state, batch, jnp.int32(step))
                if pending is not None:
                    step_log.finish(*pending)
                pending = (step + 1, metrics)
                bar.update(1)
                done = step + 1
                eval_now = done % config.eval.every_steps == 0 or done == steps
                save_now = done % config.checkpoint.every_steps == 0 or done == steps
                if eval_now or save_now:  # step done's metrics line comes before its eval and its checkpoint
                    step_log.finish(*pending)
                    pending = None
                if eval_now:
                    losses = evaluate(state["params"])
                    step_log.last.update(losses)
                    writer.write(done, losses)
                    if pid == 0:
                        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
                if save_now:
                    save(done)
            else:
                step = steps
            if pending is not None:
                step_log.finish(*pending)
            if stop.is_set():
                log.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
                if step not in ckpt.all_steps():
                    save(step, force=True)
        finally:
            ckpt.wait()
            ckpt.close()
            bar.close()
            writer.close()
        last = step_log.last
        if start >= steps:  # resumed a finished run (e.g. a sweep trial re-queued after its worker died)
            last.update({k: v for k, v in logged_metrics(config.workdir).items() if k != "step"})
            last.update(evaluate(state["params"]), step=steps)
        last["nonfinite_steps"] = step_log.nonfinite_total
        last["preempted"] = stop.is_set()
        return last


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (ml_collections).", lock_config=True
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join the jax.distributed job JAX detects (TPU, SLURM)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", "", "host:port of process 0, for an explicit multi-process job."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the explicit job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in the explicit job.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices_per_process", 0, "Simulate this many CPU devices per process."
)
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100, "Seconds before a silent peer ends the job.")


def main(argv: list[str]) -> None:
    del argv
    # orbax, grain and jax.distributed log every save / connection at INFO: keep warnings, and our own info
    # lines (e.g. where the default corpus is prepared)
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(
        lambda r: r.levelno >= logging.WARNING or "data_pipelines" in r.pathname or "/mct/" in r.pathname
    )
    log.setLevel(logging.INFO)
    initialize(
        coordinator=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
        cpu_devices_per_process=_CPU_DEVICES.value, heartbeat_timeout_s=_HEARTBEAT.value, auto=_DISTRIBUTED.value,
    )  # fmt: skip
    try:
        result = train(_CONFIG.value)
    except (ConfigError, DatasetError, TrainingDiverged, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        finite = {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))}
        print("done:", finite)


if __name__ == "__main__":
    app.run(main)
