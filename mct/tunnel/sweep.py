"""Wind-tunnel sweeps: Optuna studies whose trials are real `mct.train` runs of small muP proxies.

A study file (experiments/tunnel/*.py) gives a ConfigDict: the proxy family (widths, layers), the search space
(lists of values per hyperparameter), the token budget per trial, the WSD shape and the target metric. Trials
live in an Optuna RDB storage (SQLite in the workdir by default, PostgreSQL on a cluster) so that many workers
on many machines can share one study and an interrupted sweep resumes: a trial whose worker died stops
heartbeating, is marked failed and re-queued with the same parameters, and its training resumes from its
workdir's checkpoint (trial workdirs are keyed by their parameters).
"""

import hashlib
import importlib.util
import itertools
import json
import logging
import math
import pathlib
import re
import subprocess
import sys
import time

import ml_collections
import optuna
import sqlalchemy

from mct.config.run import Config
from mct.errors import TrainingDiverged, UserError
from mct.model.flops import matmul_params, train_flops_per_token
from mct.run.scalingbench_tasks import write_tasks
from mct.run.training_run import train
from mct.train.metrics import logged_metrics

log = logging.getLogger(__name__)

# search-space name -> training config key it sets
PARAM_KEYS = {
    "lr": "optimizer.lr",
    "init_std": "model.init_std",
    "scale_emb": "model.scale_emb",
    "scale_depth": "model.scale_depth",
    "batch_size": "train.batch_size",
    "parametrization": "model.parametrization",
    "weight_decay": "optimizer.weight_decay",
    "decay_shape": "schedule.decay_shape",
    "seed": "seed",  # the initialisation's seed (a repeat of a grid point)
}
# the model width, the token budget, the decay's share of it, and the budgets of decay branches from one stable run
SHAPE_PARAMS = ("width", "tokens", "decay_frac", "decay_tokens")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)


def default_study() -> ml_collections.ConfigDict:
    """Every field a study file may set (study files override these)."""
    return ml_collections.ConfigDict(
        dict(
            name="study",
            workdir="/tmp/mct-tunnel/study",
            storage="",  # Optuna RDB URL; "" -> sqlite:///WORKDIR/study.db
            base_config="",  # the training config file the proxies start from (study files name it)
            width=256,  # d_model when "width" is not swept
            n_layers=4,
            head_dim=32,
            mlp_ratio=2.5,
            space={"lr": [0.01]},  # name -> values; names: SHAPE_PARAMS and the keys of PARAM_KEYS
            grids=None,  # grid studies: a list of such dicts instead, the union of their products (in order)
            repeat_top=0,  # grid studies: rerun the repeat_top best lrs of every group of the other params ...
            repeat_seeds=(1,),  # ... once per seed here (their spread is the seed noise)
            tokens=1_000_000,  # per trial, when "tokens" is not swept
            decay_tokens=(),  # token budgets D of decay branches from one stable run per trial (L(N, D) fits)
            warmup_frac=0.1,
            warmup_steps=0,  # > 0: the same warmup for every run of the study (runs of different lengths)
            decay_frac=0.2,
            metric="eval_loss",  # eval_loss | scalingbench_loss | train_loss
            scalingbench="default",
            scalingbench_tasks=0,  # > 0: problems per ScalingBench task scored at each run's end (accuracy)
            sampler="grid",  # grid | tpe
            n_trials=0,  # TPE studies: trials to run (0 -> the size of the space's product)
            seed=0,
            heartbeat_s=30,
            checkpoint_every=0,  # 0 -> only at the end of a trial
            overrides={},  # nested training-config fields, e.g. {"data": {"seq_len": 128}}
        )
    )


def study_from_storage(name: str, url: str) -> ml_collections.ConfigDict:
    """The config a study was created with (what a worker on another machine needs)."""
    s = optuna.load_study(study_name=name, storage=connect_storage(url))
    if "study_config" not in s.user_attrs:
        raise ValueError(f"study {name!r} in {url} has no stored config; start it with `mct.tunnel sweep`")
    return ml_collections.ConfigDict(json.loads(s.user_attrs["study_config"]))


def load_study_config(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a study file, or `get_config(arg)` for "FILE:arg" (a variant of the study)."""
    path, _, arg = path.partition(":") if not pathlib.Path(path).is_file() else (path, "", "")
    spec = importlib.util.spec_from_file_location("study_config", path)
    if spec is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"study config {path!r} does not exist")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def storage_url(study: ml_collections.ConfigDict) -> str:
    return study.storage or f"sqlite:///{pathlib.Path(study.workdir).absolute() / 'study.db'}"


def study_storage(study: ml_collections.ConfigDict, url: str | None = None) -> optuna.storages.RDBStorage:
    """The database at `url` (default: the study's own, in its workdir, made here)."""
    pathlib.Path(study.workdir).mkdir(parents=True, exist_ok=True)
    return connect_storage(url or storage_url(study), study)


def connect_storage(
    url: str, study: ml_collections.ConfigDict | None = None, retries: int = 8
) -> optuna.storages.RDBStorage:
    """The study database; retried while another process (a worker, a report) is creating its schema."""
    heartbeat = study.heartbeat_s if study is not None else 60

    def connect() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )

    for attempt in range(retries):
        try:
            return connect()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            time.sleep(0.25 * (attempt + 1))  # two processes stamped the schema version at once
    return connect()


def grid_points(study: ml_collections.ConfigDict) -> list[dict]:
    """Every point of a grid study: the product of `space`, or the union of the products of `grids`."""
    spaces = study.grids or [study.space]
    points = []
    for space in spaces:
        names = list(space)
        for values in itertools.product(*(space[name] for name in names)):
            point = dict(zip(names, values))
            if point not in points:
                points.append(point)
    return points


def repeat_points(study: ml_collections.ConfigDict, records: list[dict]) -> list[dict]:
    """The seed repeats: in every group of grid points that differ only in lr and whose trials have all
    finished, the `repeat_top` lrs with the lowest metric, once per seed in `repeat_seeds`."""
    if not study.repeat_top:
        return []
    done = {_key(r["point"]): r.get(study.metric) for r in records if "point" in r}
    groups: dict[str, list[dict]] = {}
    for point in grid_points(study):
        groups.setdefault(_key({k: v for k, v in point.items() if k != "lr"}), []).append(point)
    repeats = []
    for members in groups.values():
        if any(_key(p) not in done for p in members):
            continue  # the group's grid is not finished yet
        ranked = sorted(members, key=lambda p: _metric_or_inf(done[_key(p)]))
        repeats += [{**p, "seed": seed} for p in ranked[: study.repeat_top] for seed in study.repeat_seeds]
    return repeats


def _key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def _metric_or_inf(value) -> float:
    return value if value is not None and math.isfinite(value) else float("inf")


def trial_config(study: ml_collections.ConfigDict, params: dict, workdir: str) -> ml_collections.ConfigDict:
    """The training config of one trial: the study's base config at the trial's width, hyperparameters and
    token budget, with a WSD schedule (warmup/decay fractions of the steps) and one eval at the end."""
    if not study.base_config:
        raise UserError(
            f"study {study.name}: base_config is empty; name the training config file of the proxies"
        )
    spec = importlib.util.spec_from_file_location("base_config", study.base_config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    width = params.get("width", study.width)
    heads = width // study.head_dim
    c.model.update(
        dict(
            n_layers=study.n_layers,
            d_model=width,
            n_heads=heads,
            n_kv_heads=heads,
            head_dim=study.head_dim,
            d_mlp=int(study.mlp_ratio * width),
        )
    )
    for name, value in params.items():
        if name in SHAPE_PARAMS:
            continue
        *sections, key = PARAM_KEYS[name].split(".")
        target = c
        for section in sections:
            target = target[section]
        target[key] = value
    _merge(c, study.overrides)
    tokens = params.get("tokens", study.tokens)
    steps = max(1, round(tokens / (c.train.batch_size * c.data.seq_len)))
    c.train.steps = steps
    c.schedule.warmup_steps = study.warmup_steps or max(1, round(study.warmup_frac * steps))
    decay_steps = round(params.get("decay_frac", study.decay_frac) * steps)  # 1.0: all steps after the warmup
    c.schedule.decay_steps = max(1, min(decay_steps, steps - c.schedule.warmup_steps))
    c.eval.every_steps = steps
    c.eval.scalingbench = study.scalingbench
    if study.scalingbench_tasks:  # the task files go in the trial's workdir (no two workers write one file)
        c.eval.tasks = write_tasks(pathlib.Path(workdir) / "scalingbench_tasks", study.scalingbench_tasks)
    c.checkpoint.every_steps = study.checkpoint_every or steps
    c.train.log_every_steps = max(1, steps // 10)
    c.workdir = workdir
    return c


def _merge(config: ml_collections.ConfigDict, overrides) -> None:
    """Sets every leaf of the nested `overrides` in `config` (unknown keys are errors)."""
    for key, value in overrides.items():
        if key not in config:
            raise KeyError(f"study overrides: the training config has no field {key!r}")
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            _merge(config[key], value)
        else:
            config[key] = value


def _trial_workdir(study: ml_collections.ConfigDict, params: dict) -> str:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return str(pathlib.Path(study.workdir).absolute() / "trials" / key)


def _trial_params(trial: optuna.Trial, study: ml_collections.ConfigDict) -> dict:
    """A grid trial's point (enqueued with it), or the TPE sampler's suggestion."""
    if study.sampler != "grid":
        return {name: trial.suggest_categorical(name, list(values)) for name, values in study.space.items()}
    if "point" not in trial.user_attrs:  # asked for while another worker took the last queued point
        raise optuna.TrialPruned("no grid point left")
    return dict(trial.user_attrs["point"])


def decay_branch_configs(
    config: ml_collections.ConfigDict,
    decay_tokens,
    decay_frac: float,
    warmup_frac: float,
    warmup_steps: int = 0,
):
    """WSD's cheap data axis: one stable run (no decay) checkpointed at every branch start, and one decay
    branch per token budget D that restores the stable checkpoint at (1 - decay_frac) * D and decays to D.
    The warmup is `warmup_steps`, or warmup_frac of the first branch's start, so that every branch starts in
    the stable phase."""
    tokens_per_step = config.train.batch_size * config.data.seq_len
    ends = sorted({max(2, round(d / tokens_per_step)) for d in decay_tokens})
    starts = [end - max(1, round(decay_frac * end)) for end in ends]
    stable = ml_collections.ConfigDict(config.to_dict())
    stable.workdir = f"{config.workdir}/stable"
    stable.train.steps = max(starts)
    stable.schedule.decay_steps = 0
    stable.schedule.warmup_steps = warmup_steps or max(1, round(warmup_frac * starts[0]))
    if stable.schedule.warmup_steps >= starts[0]:
        raise ValueError(
            f"warmup ({stable.schedule.warmup_steps} steps) must end before the first decay branch "
            f"starts (step {starts[0]})"
        )
    stable.checkpoint.every_steps = math.gcd(*starts)
    stable.checkpoint.max_to_keep = max(starts) // stable.checkpoint.every_steps + 1
    stable.eval.every_steps = max(starts)
    branches = []
    for start, end in zip(starts, ends):
        branch = ml_collections.ConfigDict(config.to_dict())
        branch.workdir = f"{config.workdir}/decay-{end}"
        branch.schedule.branch_from = stable.workdir
        branch.schedule.branch_step = start
        branch.schedule.decay_steps = end - start
        branch.train.steps = end
        branch.eval.every_steps = end
        branch.checkpoint.every_steps = end
        branches.append(branch)
    return stable, branches


def _train_record(config: ml_collections.ConfigDict, base: dict) -> dict:
    """Trains one run and describes it: tokens, FLOPs, losses, wall time (TrainingDiverged propagates)."""
    tokens = config.train.steps * config.train.batch_size * config.data.seq_len
    start = time.time()
    record = {
        **base,
        "config": config.to_dict(),
        "tokens": tokens,
        "flops": train_flops_per_token(config.model, config.data.seq_len) * tokens,
    }
    try:
        result = train(Config.from_dict(config.to_dict()))
    except Exception as e:
        e.record = {**record, "wall_s": time.time() - start}
        raise
    return record | {
        "state": "complete",
        "wall_s": time.time() - start,
        "train_loss": result.get("loss"),
        "eval_loss": result.get("eval_loss"),
        "scalingbench_loss": result.get("scalingbench_loss"),
        "scalingbench_accuracy": scalingbench_accuracy(logged_metrics(config.workdir)),
    }


def scalingbench_accuracy(metrics: dict) -> float | None:
    """The mean acc of a run's ScalingBench tasks (`task/scalingbench_*/acc` as logged), None without them."""
    accs = [v for k, v in metrics.items() if re.fullmatch(r"task/scalingbench_\w+/acc", k)]
    return sum(accs) / len(accs) if accs else None


def run_trial(study: ml_collections.ConfigDict, trial: optuna.Trial) -> float:
    """Trains one proxy (or, with study.decay_tokens, one stable run and its decay branches) and stores
    each run's record on the trial; the objective is the metric of the run with the most tokens."""
    params = _trial_params(trial, study)
    config = trial_config(study, params, _trial_workdir(study, params))
    base = {
        "trial": trial.number,
        "point": params,
        "params": {**params, "width": config.model.d_model},
        "n_params": matmul_params(config.model),
    }
    records = []
    try:
        decay_tokens = params.get("decay_tokens", study.decay_tokens)
        if decay_tokens:
            stable, branches = decay_branch_configs(
                config, decay_tokens, study.decay_frac, study.warmup_frac, study.warmup_steps
            )
            train(Config.from_dict(stable.to_dict()))
            records = [_train_record(branch, base) for branch in branches]
        else:
            records = [_train_record(config, base)]
    except TrainingDiverged as e:
        trial.set_user_attr(
            "records", [*records, {**getattr(e, "record", base), "state": "diverged", "error": str(e)}]
        )
        return float("inf")  # never a good loss; the record says why
    except Exception as e:
        trial.set_user_attr(
            "records", [*records, {**getattr(e, "record", base), "state": "failed", "error": repr(e)}]
        )
        raise
    trial.set_user_attr("records", records)
    return _metric_or_inf(records[-1][study.metric])


def open_study(
    study: ml_collections.ConfigDict, storage: optuna.storages.RDBStorage | None = None
) -> optuna.Study:
    """Creates the study (or loads it to resume) in `storage` (default: the study's own database), remembering
    the study config for workers."""
    sampler = (  # a grid study's trials are all enqueued points: its sampler never draws
        optuna.samplers.RandomSampler(seed=study.seed)
        if study.sampler == "grid"
        else optuna.samplers.TPESampler(seed=study.seed)
    )
    s = optuna.create_study(
        study_name=study.name,
        storage=storage or study_storage(study),
        sampler=sampler,
        direction="minimize",
        load_if_exists=True,
    )
    s.set_user_attr("study_config", study.to_json())
    return s


def finished_trials(s: optuna.Study) -> int:
    """Trials that ended by themselves (completed, diverged or crashed), not those whose worker died."""
    return sum(
        1
        for t in s.get_trials(deepcopy=False, states=FINISHED)
        if t.state == optuna.trial.TrialState.COMPLETE or "records" in t.user_attrs
    )


def _waiting(s: optuna.Study) -> int:
    return len(s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def enqueue_new_points(s: optuna.Study, study: ml_collections.ConfigDict) -> None:
    """Queues every grid point (and seed repeat now due) that no trial holds yet, in the study's order; points
    added to the study file since the last sitting join the queue."""
    trials = s.get_trials(deepcopy=False)
    held = {_key(t.user_attrs["point"]) for t in trials if "point" in t.user_attrs}
    records = [r for t in trials for r in t.user_attrs.get("records", [])[-1:]]
    for point in grid_points(study) + repeat_points(study, records):
        if _key(point) not in held:
            s.enqueue_trial({}, user_attrs={"point": point})
            held.add(_key(point))


def _beat_running_trials(storage: optuna.storages.RDBStorage, s: optuna.Study) -> None:
    """Optuna never calls a running trial stale before its first heartbeat, so a worker killed between taking
    a trial and that beat leaves it running forever; one beat now lets it go stale after the grace period."""
    study_id = storage.get_study_id_from_name(s.study_name)
    for t in s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, t.number))


def work(study: ml_collections.ConfigDict, url: str | None = None) -> optuna.Study:
    """Runs trials in this process until the study is done: every grid point (and seed repeat) has a finished
    trial, or a TPE study has its n_trials. A trial whose worker died is retried (Optuna's heartbeat)."""
    storage = study_storage(study, url)
    s = open_study(study, storage)
    run = lambda t: run_trial(study, t)
    if study.sampler != "grid":
        target = study.n_trials or math.prod(len(v) for v in study.space.values())
        if finished_trials(s) < target:
            stop_when_done = lambda st, _: st.stop() if finished_trials(st) >= target else None
            s.optimize(run, callbacks=[stop_when_done], catch=(Exception,))
        return s
    optuna.storages.fail_stale_trials(s)  # a dead worker's trial goes back to the queue
    _beat_running_trials(storage, s)  # after: a beat would keep an already stale trial from its retry
    while True:
        enqueue_new_points(s, study)
        if _waiting(s):
            s.optimize(
                run, callbacks=[lambda st, _: st.stop() if not _waiting(st) else None], catch=(Exception,)
            )
        elif s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            time.sleep(study.heartbeat_s)  # another worker's trial, or a dead one going stale
        else:
            return s
        optuna.storages.fail_stale_trials(s)


def sweep(study: ml_collections.ConfigDict, workers: int = 1) -> optuna.Study:
    """The study to completion with `workers` local processes (1: in this process)."""
    if workers <= 1:
        return work(study)
    open_study(study)  # create it once, before the workers race to
    command = [
        sys.executable,
        "-m",
        "mct.tunnel",
        "worker",
        "--study",
        study.name,
        "--storage",
        storage_url(study),
    ]
    procs = [subprocess.Popen(command) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        log.warning("sweep workers exited with %s", codes)
    return open_study(study)


def records(study_name: str, url: str) -> list[dict]:
    """Every trial's record (complete, diverged, failed), for mct.tunnel.report, with the trial's whole wall
    time as `trial_wall_s` (a branched trial's stable run is in no record's own `wall_s`)."""
    s = optuna.load_study(study_name=study_name, storage=connect_storage(url))
    return [
        r | ({"trial_wall_s": t.duration.total_seconds()} if t.duration else {})
        for t in s.get_trials(deepcopy=False)
        for r in t.user_attrs.get("records", [])
    ]
