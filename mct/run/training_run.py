"""One run in a workdir: resume (or branch, or start fresh), data, hooks, the loop, the last save.

The workdir's latest committed checkpoint wins; else a decay branch restores the stable-phase checkpoint of
another run (MiniCPM paper section 4.2: decay branches); else post-training's init_from params (fresh
optimizer state); else the state is initialised. The workdir is locked for the run, metrics past the restored
step are dropped, and SIGTERM (the `stop` event) saves and returns. This shell is every run's (pre-training,
SFT, DPO, RL): `RunData` says what a kind of run brings (its start, the source of its steps, eval sets, its
metrics line), the objective what the step minimises.
"""

import contextlib
import logging
import pathlib
import tempfile
import threading
from collections.abc import Callable

import jax
from tqdm import tqdm

from data_pipelines.loader import (
    dataset_dir,
    dataset_tokenizer,
    make_eval_batches,
    make_train_iterator,
    merge_states,
)
from data_pipelines.prefetch import prefetch
from data_pipelines.tokenizer import BOS, EOS, TextTokenizer, has_tokenizer, load_tokenizer
from mct.config.model import ModelConfig
from mct.config.run import Config
from mct.errors import ConfigError, UserError, WorkdirLocked
from mct.model.decoder import ParamsModel
from mct.parallel.distributed import gather_json, global_batch
from mct.run.checkpoint import Checkpointer, run_meta
from mct.run.init_from import continued_data_state, init_from_state, parse_spec
from mct.run.lock import WorkdirLock
from mct.run.scalingbench import make_scalingbench_batches
from mct.run.task_files import read_tasks
from mct.run.tasks import Scorer, task_hook
from mct.train.hooks import Evaluator, MetricsLog, StepLog, profile_hook
from mct.train.metrics import MetricsWriter, logged_metrics
from mct.train.step import Objective, next_token_objective
from mct.train.trainer import Batches, StepSource, Trainer, TrainSetup, build

log = logging.getLogger("mct.train")


def restore_branch_source(setup: TrainSetup) -> tuple[dict, dict | None]:
    """(state, data_state) from the stable-phase checkpoint a decay branch starts from; never writes there."""
    s = setup.config.schedule
    source = Checkpointer(s.branch_from, read_only=True)
    if s.branch_step not in source.all_steps():
        raise ConfigError(
            f"config schedule.branch_step={s.branch_step}: no committed checkpoint at that step in "
            f"{s.branch_from} (have {source.all_steps()})"
        )
    meta = source.check_compatible(s.branch_step, setup.config.model)
    if s.branch_step > meta["decay_start"]:  # at decay_start itself the lr is still the stable one
        raise ConfigError(
            f"config schedule.branch_step={s.branch_step} is in the decay phase of {s.branch_from} (decay starts "
            f"at step {meta['decay_start']}); a branch must start from a stable-phase checkpoint"
        )
    state, data_state, _ = source.restore(s.branch_step, setup.abstract_state)
    source.close()
    if meta["data_mixture"] != setup.config.to_dict()["data"]["mixture"]:
        log.info("decay branch switches the data mixture: kept components continue where the source stopped")
    return state, data_state


def initial_state(
    setup: TrainSetup, ckpt: Checkpointer, continue_source_data: bool = True
) -> tuple[int, dict, dict | None]:
    """(start step, state, data state): the latest committed checkpoint, a branch's source, init_from's params
    (with the source's data stream when `continue_source_data` and the run reads the same data), or a fresh
    state."""
    config = setup.config
    restored = ckpt.restore_latest(setup.abstract_state, config.model)
    if restored is not None:
        log.info("resumed from %s step %d", ckpt.directory, restored[0])
        return restored
    aside = ckpt.moved_aside()
    if aside and not config.checkpoint.allow_fresh_start:
        raise ConfigError(
            f"every checkpoint in {ckpt.directory} was unreadable and moved aside ({', '.join(aside)}); "
            "restore one, or start again from step 0 with --config.checkpoint.allow_fresh_start=true"
        )
    if config.schedule.branch_from:
        state, data_state = restore_branch_source(setup)
        log.info("decay branch from %s step %d", config.schedule.branch_from, config.schedule.branch_step)
        return config.schedule.branch_step, state, data_state
    if config.init_from:
        check_init_tokenizer(config)
        data_state = continued_data_state(config.init_from, config) if continue_source_data else None
        log.info(
            "starting from the params of %s (fresh optimizer state, %s)",
            config.init_from,
            "its data stream continued" if data_state else "data from the start",
        )
        return 0, init_from_state(config.init_from, setup), data_state
    return 0, setup.init_state(config.seed), None


def check_init_tokenizer(config: Config) -> None:
    """UserError naming both when init_from's workdir holds a tokenizer other than the one the run's data was
    prepared with (an imported release continued on data of another vocabulary)."""
    source = parse_spec(config.init_from)[0]
    if not has_tokenizer(source):
        return
    dataset = first_dataset(config)
    theirs, ours = load_tokenizer(source), dataset_tokenizer(dataset)
    if theirs.fingerprint != ours.fingerprint:
        raise UserError(
            f"config init_from={config.init_from}: its tokenizer ({theirs.kind}, {theirs.vocab_size} ids) is not "
            f"the one {dataset} was prepared with ({ours.kind}, {ours.vocab_size} ids); prepare the "
            f"data with --tokenizer={source}"
        )


def first_dataset(config: Config) -> pathlib.Path:
    """The prepared directory of the mixture's first dataset (whose tokenizer the run uses)."""
    first = next(iter(config.data.mixture.values()))
    return dataset_dir(first.path, cache_dir=config.data.cache_dir, vocab_size=config.data.vocab_size)


def make_eval_sets(setup: TrainSetup) -> dict[str, list]:
    """Global eval batches by metric name: the held-out split, and ScalingBench when eval.scalingbench is set."""
    config, sharding = setup.config, setup.batch_sharding
    pid, nproc = jax.process_index(), jax.process_count()
    local_batch = config.train.batch_size // nproc
    held_out = make_eval_batches(
        config.data,
        batch_size=local_batch,
        num_batches=config.data.eval_batches,
        process_index=pid,
        process_count=nproc,
        model_vocab_size=config.model.vocab_size,
    )
    eval_sets = {"eval_loss": [global_batch(b, sharding) for b in held_out]}
    if config.eval.scalingbench:
        tokenizer = dataset_tokenizer(first_dataset(config))
        ids = tokenizer.special_token_ids()
        path = None if config.eval.scalingbench == "default" else config.eval.scalingbench
        batches = make_scalingbench_batches(
            tokenizer,
            seq_len=config.data.seq_len,
            batch_size=config.train.batch_size,
            path=path,
            bos_id=ids[BOS],
            eos_id=ids[EOS],
        )
        rows = slice(pid * local_batch, (pid + 1) * local_batch)
        eval_sets["scalingbench_loss"] = [
            global_batch({k: v[rows] for k, v in b.items()}, sharding) for b in batches
        ]
    return eval_sets


def check_workdir(workdir: str) -> None:
    """The workdir is named and writable (created if missing), before anything compiles."""
    if not workdir:
        raise ConfigError("config workdir is empty: pass --config.workdir=DIR")
    try:
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=workdir).close()
    except OSError as e:
        raise ConfigError(f"config workdir={workdir} is not writable: {e.strerror or e}") from None


@contextlib.contextmanager
def job_lock(workdir: str):
    """The workdir's lock, held by process 0 for the whole job; every process learns whether it was refused
    (so a refused multi-process job ends at once instead of waiting at its first collective)."""
    lock = WorkdirLock(workdir, enabled=jax.process_index() == 0)
    refusal = None
    try:
        lock.acquire()
    except WorkdirLocked as e:
        refusal = str(e)
    if refusal := next((r for r in gather_json(refusal) if r), None):
        raise WorkdirLocked(refusal)
    try:
        yield
    finally:
        lock.release()


class RunData:
    """What a kind of run brings to the run shell (`train`): where it starts, the source of its steps, its eval
    sets, what checkpoints keep of its source, its tokenizer and its metrics line. Pre-training's here;
    post-training (mct.sft, mct.dpo, mct.rl) overrides what it needs."""

    final_eval = True  # evaluate at the last step too, besides every eval.every_steps
    continues_source_data = True  # an init_from run reading the source's data continues its stream

    def initial_state(self, setup: TrainSetup, ckpt: Checkpointer) -> tuple[int, dict, dict | None]:
        """(start step, state, the source's checkpointed state or None)."""
        return initial_state(setup, ckpt, self.continues_source_data)

    def source(self, setup: TrainSetup, state: dict | None) -> StepSource:
        """The loop's steps: the prepared step over this process's prefetched train batches."""
        batches = prefetch(self.train_batches(setup, state), setup.config.data.prefetch)
        return Batches(self.prepare(setup), batches)

    def train_batches(self, setup: TrainSetup, state: dict | None):
        """This process's train iterator (get_state() -> JSON), resumed from `state` when given."""
        config = setup.config
        return make_train_iterator(
            config.data,
            batch_size=config.train.batch_size // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            model_vocab_size=config.model.vocab_size,
            state=state,
        )

    def eval_sets(self, setup: TrainSetup) -> dict[str, list]:
        return make_eval_sets(setup)

    def merge(self, states: list[dict]) -> dict:
        """One state from every process's get_state() (what checkpoints hold)."""
        return merge_states(states)

    def prepare(self, setup: TrainSetup) -> TrainSetup:
        """The TrainSetup the loop steps (e.g. DPO adds the reference log-probs to each batch)."""
        return setup

    def ids_tokenizer(self, config: Config) -> TextTokenizer:
        """The tokenizer the run's ids come from (copied into the workdir)."""
        return dataset_tokenizer(first_dataset(config))

    def metrics_log(
        self, config: Config, writer: MetricsWriter, bar: tqdm, start: int, n_devices: int
    ) -> StepLog:
        return MetricsLog(config, writer, bar, start, n_devices)


def train(
    config: Config,
    devices: list | None = None,
    stop: threading.Event | None = None,
    *,
    objective: Objective = next_token_objective,
    data: RunData | None = None,
    model_fn: Callable[[ModelConfig], ParamsModel] = ParamsModel,
) -> dict:
    """Runs (or resumes) training to train.steps on `devices` (default: all), minimising `objective` over
    `data`'s steps (default: pre-training's batches) for the params of model_fn (build's); returns the last
    logged metrics and eval losses."""
    check_workdir(config.workdir)
    setup = build(config, devices, objective, model_fn)
    config = setup.config
    with job_lock(config.workdir):
        ckpt = Checkpointer(
            config.workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
        )
        try:
            return _run(setup, ckpt, stop or threading.Event(), data or RunData())
        finally:
            ckpt.close()


def keep_tokenizer(workdir: str, tokenizer: TextTokenizer) -> None:
    """Writes the run's tokenizer files into the workdir (process 0; each file whole or not at all, the main
    file last), so export and generate need no dataset."""
    if jax.process_index() != 0:
        return
    for name, data in tokenizer.files_in_save_order():
        target = pathlib.Path(workdir) / name
        target.with_name(name + ".tmp").write_bytes(data)
        target.with_name(name + ".tmp").rename(target)


def add_hooks(
    trainer: Trainer,
    config: Config,
    start: int,
    bar: tqdm,
    ckpt: Checkpointer,
    data: RunData,
    metrics: StepLog,
    evaluate: Callable,
    save: Callable,
) -> None:
    """Every run's hooks: progress, save-failure check, metrics, eval, checkpoints, tokenizer, profiler."""
    steps = config.train.steps
    trainer.add_hook(lambda info: bar.update(info.step - bar.n), every=1)
    trainer.add_hook(lambda _: ckpt.check_saves(), every=1)  # a failed async save stops the run at once
    if not has_tokenizer(config.workdir):  # a resumed run has it: its data's tokenizer is not read again
        trainer.add_hook(lambda _: keep_tokenizer(config.workdir, data.ids_tokenizer(config)), at=[start + 1])
    trainer.add_hook(metrics, every=config.train.log_every_steps, at=[steps])
    trainer.add_hook(
        evaluate, every=config.eval.every_steps, at=[steps] if data.final_eval else [], needs_state=True
    )
    save_hook = lambda info: save(info.step, info.state)
    trainer.add_hook(save_hook, every=config.checkpoint.every_steps, at=[steps], needs_state=True)
    if config.profile.steps:
        first, last = config.profile.steps
        trainer.add_hook(profile_hook(config.workdir, first, last), at=[first, last], needs_state=True)


def add_task_hook(
    trainer: Trainer, setup: TrainSetup, tokenizer: TextTokenizer, writer: MetricsWriter, final: bool
) -> None:
    """eval.tasks' hook: every eval.tasks_every_steps (else eval.every_steps) and, with `final`, at the last
    step; its task files are read and checked now, before the first step."""
    config = setup.config
    if not config.eval.tasks:
        return
    scorer = Scorer(
        setup.model, tokenizer, config.train.batch_size, config.data.seq_len, setup.batch_sharding
    )
    hook = task_hook(read_tasks(config.eval.tasks), scorer, config.model.max_position, writer)
    every = config.eval.tasks_every_steps or config.eval.every_steps
    trainer.add_hook(hook, every=every, at=[config.train.steps] if final else [], needs_state=True)


def _run(setup: TrainSetup, ckpt: Checkpointer, stop: threading.Event, data: RunData) -> dict:
    """The loop of one locked workdir, with its hooks; the final (or SIGTERM) save."""
    config, pid, steps = setup.config, jax.process_index(), setup.config.train.steps
    start, state, data_state = data.initial_state(setup, ckpt)
    source = data.source(setup, data_state)
    evaluate = Evaluator(setup.eval_fn, data.eval_sets(setup))

    def save(step: int, state: dict, force: bool = False) -> None:
        ckpt.save(
            step, state, data.merge(gather_json(source.get_state())), run_meta(config, step), force=force
        )

    writer = MetricsWriter(config.workdir, enabled=pid == 0, resume_step=start)
    bar = tqdm(total=steps, initial=start, desc="train", disable=pid != 0, dynamic_ncols=True)
    trainer = Trainer(setup, stop, ckpt)
    metrics = data.metrics_log(config, writer, bar, start, len(setup.mesh.devices.flat))
    add_hooks(
        trainer, config, start, bar, ckpt, data, metrics, evaluate.hook(writer, bar, metrics.last), save
    )
    add_task_hook(trainer, setup, data.ids_tokenizer(config), writer, data.final_eval)
    try:
        state, step = trainer.run(state, source, start, steps)
        if stop.is_set() and step not in ckpt.all_steps():
            log.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
            save(step, state, force=True)
    finally:
        source.close()
        bar.close()  # first: the error of a failed last save starts a line of its own, not the bar's line
        writer.close()
        ckpt.wait()
    result = metrics.last
    if start >= steps:  # resumed a finished run (e.g. a sweep trial re-queued after its worker died)
        result.update({k: v for k, v in logged_metrics(config.workdir).items() if k != "step"})
        result.update(evaluate(state["params"]), step=steps)
    return result | {"nonfinite_steps": trainer.nonfinite_total, "preempted": stop.is_set()}
