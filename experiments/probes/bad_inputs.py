"""Bad-input and fault probe: runs the real CLIs the way a user would, in a temp dir, and tabulates what happened.

    python -m experiments.probes.bad_inputs [--only NAME,...] [--keep] [--json]

Each case is Case(name, setup, command, expect): setup builds the case's files in its own directory (and may run
earlier commands), command is the argv under test, expect returns None (PASS) or why it did not hold. A case
that runs past its timeout is a FAIL, never a hang. --only takes case names or their numbers ("7" = 7a, 7b, 7c).
It exits 0 whatever the cases do: it is a probe, not a test.
"""

import argparse
import dataclasses
import gzip
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable

from experiments.probes.hostile_code import BOMB, SPAWN

REPO = pathlib.Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
TIMEOUT = 180
ABSL_PREFIX = re.compile(
    r"^[IWEF]\d{4} [\d:.]+\s+\d+\s+\S+:\d+\]\s*"
)  # absl / glog: "E1201 12:00:00.1 42 f.py:9] "
TINY = {
    "model.n_layers": 2,
    "model.d_model": 64,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.head_dim": 16,
    "model.d_mlp": 128,
    "data.seq_len": 32,
    "data.eval_batches": 1,
    "train.batch_size": 8,
    "train.steps": 10,
    "train.log_every_steps": 1,
    "eval.every_steps": 5,
    "checkpoint.every_steps": 5,
    "checkpoint.max_to_keep": 10,
    "mesh.data": 1,
}
# a model whose checkpoints (~0.25 MB: params and two Adam moments) fill a 600 KB disk after two saves
TINIER = ("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_mlp=64")


class Skip(Exception):
    """The case cannot run here (e.g. no permission to mount a tmpfs)."""


class SetupError(Exception):
    """The case's preparation failed; the case is a FAIL."""


@dataclasses.dataclass
class Run:
    rc: int | None  # None: killed at the timeout
    out: str
    err: str
    wall: float
    timeout: int

    def first_line(self) -> str:
        """The first non-empty stderr line (stdout's when stderr is empty), without an absl log prefix."""
        for text in (self.err, self.out):
            lines = [ABSL_PREFIX.sub("", line).strip() for line in text.splitlines()]
            if any(lines):
                return next(line for line in lines if line)
        return ""


@dataclasses.dataclass
class Case:
    name: str
    setup: Callable  # (ctx) -> None
    command: Callable  # (ctx) -> argv
    expect: list  # checks (run, ctx) -> None or the reason it failed
    timeout: int = TIMEOUT
    during: Callable | None = None  # (proc, ctx) -> True once done; polled while the command runs


# --- running commands ---------------------------------------------------------------------------------------


def start(argv: list[str], log: pathlib.Path, cwd: pathlib.Path = REPO) -> subprocess.Popen:
    """argv in the background, in its own process group, stdout and stderr to log.out / log.err."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
        )
    proc.log, proc.began = log, time.monotonic()
    return proc


def finish(proc: subprocess.Popen, timeout: int, during: Callable | None = None, ctx=None) -> Run:
    """Waits for proc (polling `during` until it reports done); kills its process group at the timeout."""
    timed_out = False
    while proc.poll() is None:
        if during is not None and during(proc, ctx):
            during = None
        if time.monotonic() - proc.began > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        time.sleep(0.2)
    wall = time.monotonic() - proc.began
    rc = None if timed_out else proc.returncode
    read = lambda suffix: pathlib.Path(f"{proc.log}.{suffix}").read_text(errors="replace")
    return Run(rc, read("out"), read("err"), wall, timeout)


def sh(argv: list[str], log: pathlib.Path, timeout: int = TIMEOUT, cwd: pathlib.Path = REPO) -> Run:
    return finish(start(argv, log, cwd), timeout)


def train(workdir: pathlib.Path, *overrides: str) -> list[str]:
    """mct.train on the tiny config; overrides ("key=value") replace TINY's values."""
    flags = {**TINY, **dict(o.split("=", 1) for o in overrides)}
    return [
        PY,
        "-m",
        "mct.train",
        "--config",
        "experiments/configs/tiny_cpu.py",
        f"--config.workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]


def module(name: str, *args) -> list[str]:
    return [PY, "-m", name, *map(str, args)]


def must(run: Run, what: str) -> Run:
    if run.rc != 0:
        raise SetupError(f"{what}: exit {run.rc}: {run.first_line()[:120]}")
    return run


# --- shared fixtures (built once per probe, copied by the cases that change them) ------------------------------

ROOT = pathlib.Path()  # the probe's temp dir (main sets it)
FIXTURES: dict[str, pathlib.Path] = {}


def fixture(build: Callable) -> Callable[[], pathlib.Path]:
    def get() -> pathlib.Path:
        if build.__name__ not in FIXTURES:
            path = ROOT / "fixtures" / build.__name__
            path.parent.mkdir(parents=True, exist_ok=True)
            build(path)
            FIXTURES[build.__name__] = path
        return FIXTURES[build.__name__]

    return get


@fixture
def finished(w: pathlib.Path) -> None:
    """A finished 10-step run on the default corpus, checkpoints at 5 and 10."""
    must(sh(train(w), w.with_suffix(".log")), "fixture: 10-step run")


@fixture
def small_dataset(out: pathlib.Path) -> None:
    """A prepared dataset of 64 small documents (pieces of a stdlib source, 32 KB), vocab 300."""
    text = (pathlib.Path(shutil.__file__)).read_text()
    raw = out.with_name("small-raw")
    raw.mkdir()
    for i in range(64):
        (raw / f"doc{i:02d}.txt").write_text(text[i * 500 : (i + 1) * 500])
    # documents go to eval by a hash of their input path: relative paths (from raw/) make the split the same
    # on every probe run, and a quarter of 64 makes some eval documents certain
    argv = module(
        "data_pipelines.prepare",
        "--input",
        "*.txt",
        "--out",
        out,
        "--vocab_size",
        300,
        "--eval_fraction",
        0.25,
    )
    must(sh(argv, out.with_suffix(".log"), cwd=raw), "fixture: prepare the small dataset")


def small(path=None) -> tuple[str, ...]:
    """Overrides that train on the small dataset (or a damaged copy at `path`)."""
    return (
        "model.vocab_size=320",
        "data.vocab_size=300",
        f"data.mixture.default.path={path or small_dataset()}",
    )


# --- setups -------------------------------------------------------------------------------------------------


def nothing(c) -> None:
    pass


def steps(*setups: Callable) -> Callable:
    def run(c) -> None:
        for s in setups:
            s(c)

    return run


def copy_finished(c) -> None:
    shutil.copytree(finished(), c.w)


def drop_markers(c) -> None:
    for step_dir in (c.w / "checkpoints").iterdir():
        (step_dir / "commit_success.txt").unlink()


def rerun(c) -> None:
    sh(train(c.w), c.dir / f"earlier-{time.monotonic_ns()}")  # its outcome is what the case runs again


def truncate_state(c) -> None:
    for f in (c.w / "checkpoints/10/state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:7])


def copy_dataset(damage: Callable[[pathlib.Path], None]) -> Callable:
    def run(c) -> None:
        c.ds = c.dir / "ds"
        shutil.copytree(small_dataset(), c.ds)
        damage(c.ds)

    return run


def truncate_shard(ds: pathlib.Path) -> None:
    shard = sorted(ds.glob("train-*.arrayrecord"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def edit_manifest(ds: pathlib.Path) -> None:
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["documents"] += 1
    (ds / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def tmpfs(size: str = "600k", fill: bool = False) -> Callable:
    """Mounts a tmpfs of `size` at c.disk (Skip if mounting is not allowed), unmounted after the case."""

    def run(c) -> None:
        c.disk = c.dir / "disk"
        c.disk.mkdir()
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(c.disk)],
            capture_output=True,
            text=True,
        )
        if mount.returncode:
            raise Skip(f"cannot mount a tmpfs: {(mount.stderr or mount.stdout).strip()[:100]}")
        c.cleanups.append(lambda: subprocess.run(["umount", str(c.disk)], capture_output=True))
        if fill:
            fd = os.open(c.disk / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:  # ENOSPC: the disk is full
                pass
            finally:
                os.close(fd)

    return run


def holder(c) -> None:
    """A first trainer on c.w, running (training has begun: metrics.jsonl exists) when the case starts."""
    c.holder = start(train(c.w, "train.steps=2000"), c.dir / "holder")
    c.cleanups.append(lambda: c.holder.poll() is None and os.killpg(c.holder.pid, signal.SIGKILL))
    while not (c.w / "metrics.jsonl").exists():
        if c.holder.poll() is not None or time.monotonic() - c.holder.began > TIMEOUT:
            raise SetupError(f"the first trainer never wrote metrics.jsonl (exit {c.holder.poll()})")
        time.sleep(0.5)


def big_text(c) -> None:
    """A 20 MB document on one line (words of a small random vocabulary)."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    block = " ".join(rng.choices(words, k=200_000))  # ~1.2 MB
    (c.dir / "big.txt").write_text((block + " ") * (20_000_000 // (len(block) + 1) + 1))


def fake_tpu_worker(c) -> None:
    """c.dir/bin: a `gcloud` that runs its --command in bash in c.dir (a TPU worker), a `python3` that does
    nothing; and the repo dir of case 14h, whose name holds a shell command."""
    (c.dir / "bin").mkdir()
    (c.dir / "x; touch pwned").mkdir()
    stubs = {
        "gcloud": '#!/bin/sh\nfor last; do :; done\ncd "$(dirname "$0")/.." && exec bash -c "${last#--command=}"\n',
        "python3": "#!/bin/sh\nexit 0\n",
    }
    for name, text in stubs.items():
        (c.dir / "bin" / name).write_text(text)
        (c.dir / "bin" / name).chmod(0o755)


def on_fake_path(c, argv: list[str]) -> list[str]:
    """argv with c.dir/bin first on PATH."""
    return ["env", f"PATH={c.dir / 'bin'}:{os.environ['PATH']}", *argv]


# --- while running ------------------------------------------------------------------------------------------


def logged_steps(w: pathlib.Path) -> list[int]:
    """The steps metrics.jsonl logged a train loss for, in file order (torn lines skipped)."""
    path, out = w / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if "loss" in m:
            out.append(m["step"])
    return out


def sigterm_after(n: int) -> Callable:
    def during(proc, c) -> bool:
        if len(logged_steps(c.w)) < n:
            return False
        proc.send_signal(signal.SIGTERM)
        return True

    return during


# --- expectations: each (run, ctx) -> None when it holds, else the reason ---------------------------------------


def exit_code(want) -> Callable:
    def check(r: Run, c):
        ok = r.rc != 0 if want == "non-zero" else r.rc == want
        return None if ok else f"exit {r.rc}, expected {want}"

    return check


def error_line(*needles: str) -> Callable:
    """stderr has exactly one `error: ...` line, holding every needle, and no traceback."""

    def check(r: Run, c):
        if "Traceback" in r.err:
            return "traceback: " + r.err.strip().splitlines()[-1][:160]
        lines = [line for line in r.err.splitlines() if line.startswith("error:")]
        if len(lines) != 1:
            return f"{len(lines)} 'error:' lines on stderr"
        missing = [n for n in needles if n not in lines[0]]
        return f"error line lacks {missing}" if missing else None

    return check


def says(*needles: str) -> Callable:
    def check(r: Run, c):
        missing = [n for n in needles if n not in r.out + r.err]
        return f"output lacks {missing}" if missing else None

    return check


def holds(predicate: Callable, why: str) -> Callable:
    return lambda r, c: None if predicate(r, c) else why


def no_tmp_dirs(r: Run, c):
    left = [p.name for p in c.w.rglob("*orbax-checkpoint-tmp*")] if c.w.exists() else []
    return f"left {left}" if left else None


def failed_save_line(r: Run, c):
    """`checkpoint save at step N failed: No space left on device ...; last good checkpoint: step M`, M < N."""
    m = re.search(
        r"checkpoint save at step (\d+) failed: No space left on device.*; last good checkpoint: step (\d+)",
        r.err,
    )
    if not m:
        return (
            "no 'checkpoint save at step N failed: No space left on device ...; last good checkpoint: step M'"
        )
    return (
        None if int(m.group(2)) < int(m.group(1)) else f"last good step {m.group(2)} >= failed {m.group(1)}"
    )


def holder_stops_on_sigterm(r: Run, c):
    if c.holder.poll() is not None:
        return f"the first trainer had already exited ({c.holder.returncode})"
    c.holder.send_signal(signal.SIGTERM)
    first = finish(c.holder, TIMEOUT)
    return (
        None
        if first.rc == 0
        else f"the first trainer exited {first.rc} on SIGTERM: {first.first_line()[:100]}"
    )


def saved_where_stopped(r: Run, c):
    ckpt = [int(p.name) for p in (c.w / "checkpoints").iterdir() if p.name.isdigit()]
    logged = logged_steps(c.w)
    if not logged or max(ckpt, default=-1) != max(logged):
        return f"checkpoints {sorted(ckpt)}, last logged step {max(logged, default=None)}"
    if max(logged) >= 2000:
        return "the run finished before SIGTERM"
    return None


def peak_rss_under(limit_mb: int) -> Callable:
    def check(r: Run, c):
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.err)
        if not m:
            return "no peak RSS reported"
        mb = int(m.group(1)) / 1024
        return None if mb < limit_mb else f"peak RSS {mb:.0f} MB >= {limit_mb} MB"

    return check


def measured(argv: list[str]) -> list[str]:
    """argv with its peak RSS on stderr: /usr/bin/time -v, else getrusage(RUSAGE_CHILDREN) in a wrapper."""
    if os.path.exists("/usr/bin/time"):
        return ["/usr/bin/time", "-v", *argv]
    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); print('Maximum resident set "
        "size (kbytes):', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(rc)"
    )
    return [PY, "-c", wrapper, *argv]


def exits_2_naming(*needles: str) -> list:
    return [exit_code(2), error_line(*needles)]


def nothing_left_in(c) -> list[str]:
    return sorted(p.name for p in c.disk.iterdir() if p.name != "filler")


# --- reward sandbox (issue 26): a stand-in trainer scoring one hostile candidate ------------------------------

ADD_TEST = ("assert add(1, 2) == 3",)  # the hostile candidates below define no `add`: honest score 0
SANDBOXED = 'run_tests("import os", ["assert os.getppid() == 1"]) == 1'  # candidates have a pid namespace


def reward(code: str | Callable, timeout_s: float = 5, guard: bool = False) -> Callable:
    """A command: this Python as a stand-in trainer scoring `code` (or code(ctx)) on ADD_TEST with run_tests,
    printing `score N/1 in T s`. With `guard` it refuses (exit 1) unless candidates run in a pid namespace of
    their own: what kill(-1) or a fork bomb would otherwise hit is every process of this machine."""

    def command(c) -> list[str]:
        text = code(c) if callable(code) else code
        lines = ["import sys, time", "from mct.posttrain.rewards import run_tests"]
        if guard:
            lines.append(f"if not {SANDBOXED}:\n    sys.exit('no pid namespace around candidates: not run')")
        lines += [
            "began = time.monotonic()",
            f"score = run_tests({text!r}, {list(ADD_TEST)!r}, timeout_s={timeout_s})",
            "print(f'score {score}/1 in {time.monotonic() - began:.1f} s')",
        ]
        return [PY, "-c", "\n".join(lines)]

    return command


def scored(n: int, within_s: float) -> Callable:
    """The stand-in trainer lived (exit 0) and scored n within `within_s` seconds."""

    def check(r: Run, c):
        m = re.search(r"score (\d+)/1 in ([\d.]+) s", r.out)
        if r.rc != 0 or not m:
            return f"the stand-in trainer exited {r.rc} without a score"
        if int(m.group(1)) != n:
            return f"scored {m.group(1)}, expected {n}"
        return None if float(m.group(2)) < within_s else f"took {m.group(2)} s, limit {within_s} s"


# --- text inputs and chat tokens (issue 26): helpers ------------------------------------------------------------

NOT_TEXT = {  # a JSONL line that is no text, by what is wrong with it
    "surrogate": b'{"note": "\\ud800"}',
    "not-utf8": b'{"note": "caf\xe9"}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


def posttrain(entry: str, config: str, workdir: pathlib.Path, *overrides: str) -> list[str]:
    """mct.<entry> (sft, dpo, rl) on experiments/configs/<config>.py from the finished tiny run."""
    argv = train(workdir, f"init_from={finished()}", *overrides)  # [PY, -m, mct.train, --config, FILE, flags]
    return [PY, "-m", f"mct.{entry}", "--config", f"experiments/configs/{config}.py", *argv[5:]]


def jsonl_file(name: str, *lines: bytes) -> Callable:
    """Writes c.dir/name holding `lines`."""
    return lambda c: (c.dir / name).write_bytes(b"".join(line + b"\n" for line in lines))


@fixture
def hf_checkpoint(out: pathlib.Path) -> None:
    """The finished tiny run exported in the MiniCPM layout (one model.safetensors)."""
    argv = module("mct.export", "--workdir", finished(), "--format", "minicpm", "--out", out)
    must(sh(argv, out.with_suffix(".log")), "fixture: export the finished run")


def copy_hf(damage: Callable[[pathlib.Path], None]) -> Callable:
    def run(c) -> None:
        c.hf = c.dir / "hf"
        shutil.copytree(hf_checkpoint(), c.hf)
        damage(c.hf)

    return run


# --- faults (issue 26): setups, hooks and checks -------------------------------------------------------------


def checkpoints_on_tmpfs(c) -> None:
    """c.w/checkpoints links to a tmpfs of its own (Skip where mounting is not allowed) that can turn read-only."""
    tmpfs("64m")(c)
    c.w.mkdir()
    (c.w / "checkpoints").symlink_to(c.disk)


def read_only_after_first_checkpoint(proc, c) -> bool:
    """Remounts the checkpoints' tmpfs read-only once it holds a committed step (root ignores chmod)."""
    if not any((p / "commit_success.txt").exists() for p in c.disk.iterdir() if p.name.isdigit()):
        return False
    remount = subprocess.run(["mount", "-o", "remount,ro", str(c.disk)], capture_output=True, text=True)
    c.remount_error = (remount.stderr or remount.stdout).strip()[:100] if remount.returncode else None
    return True


FORTY_DOCUMENTS = b"".join(b'{"text": "document %d: the river model reads data"}\n' % i for i in range(40))


def prepare_ds(inputs: str) -> Callable:
    """The prepare command of c.dir/inputs (a name or glob) into c.dir/ds."""
    return lambda c: module(
        "data_pipelines.prepare", "--input", c.dir / inputs, "--out", c.dir / "ds", "--vocab_size", 300
    )


def small_jsonl(c) -> None:
    (c.dir / "small.jsonl").write_bytes(FORTY_DOCUMENTS)


def damaged_gzip(c) -> None:
    """bad.jsonl.gz: FORTY_DOCUMENTS gzipped in stored blocks with the "river"s of the middle third turned to
    "xxxxx", so the stream decodes (to garbage documents) until its CRC fails at the end."""
    stored = gzip.compress(FORTY_DOCUMENTS, compresslevel=0)
    third = len(stored) // 3
    damaged = stored[:third] + stored[third : 2 * third].replace(b"river", b"xxxxx") + stored[2 * third :]
    (c.dir / "bad.jsonl.gz").write_bytes(damaged)


def killed_prepare(c) -> None:
    """A prepare of c.dir/ds (of a 20 MB document) SIGKILLed once its temporary sibling exists."""
    big_text(c)
    proc = start(prepare_ds("big.txt")(c), c.dir / "killed")
    while not list(c.dir.glob(".ds.tmp-*")):
        if proc.poll() is not None or time.monotonic() - proc.began > TIMEOUT:
            raise SetupError(f"the prepare to kill never made its temporary directory (exit {proc.poll()})")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def sibling(c, out: str, pid: int, tail: str) -> pathlib.Path:
    """A temporary sibling of c.dir/out, holding a partial file, named for its maker: process `pid` here."""
    path = c.dir / f".{out}.tmp-{socket.gethostname()}-{pid}-{tail}"
    path.mkdir()
    (path / "partial").write_bytes(b"half")
    return path


def dead_writer(out: str) -> Callable:
    """The sibling of a writer of c.dir/out that was killed: its pid is a process that has ended."""

    def run(c) -> None:
        ended = subprocess.Popen(["true"])
        ended.wait()
        sibling(c, out, ended.pid, "deadwrit")

    return run


def edit_hf_config(edit: Callable[[dict], object]) -> Callable[[pathlib.Path], None]:
    def damage(hf: pathlib.Path) -> None:
        (hf / "config.json").write_text(json.dumps(edit(json.loads((hf / "config.json").read_text()))))

    return damage


def truncate_weights(hf: pathlib.Path) -> None:
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def import_command(c) -> list[str]:
    return module("mct.import_hf", "--hf_dir", c.hf, "--out", c.dir / "imported")


def skip_examples(*sources: str) -> Callable:
    """The dataset's manifest lists a skip example for each of `sources` (names relative to the case dir)."""

    def check(r: Run, c):
        path = c.dir / "ds" / "manifest.json"
        listed = (
            {e["source"] for e in json.loads(path.read_text())["skipped"]["examples"]}
            if path.exists()
            else set()
        )
        missing = [s for s in sources if str(c.dir / s) not in listed]
        return f"manifest.json lists no skip of {missing}" if missing else None


def live_writer(out: str) -> Callable:
    """The sibling of another writer of c.dir/out, alive (a sleeping process) while the case runs."""

    def run(c) -> None:
        sleeper = subprocess.Popen(["sleep", "600"])
        c.cleanups.append(lambda: (sleeper.kill(), sleeper.wait()))
        c.live = sibling(c, out, sleeper.pid, "livewrit")

    return run


def remounted(r: Run, c):
    why = getattr(c, "remount_error", "the checkpoints never held a committed step")
    return None if why is None else f"not made read-only: {why}"


def ended_within(seconds: int) -> Callable:
    def check(r: Run, c):
        return None if r.wall < seconds else f"the process took {r.wall:.0f} s to end"

    return check


def escape_attempt(c) -> str:
    """A candidate that writes a file into the case's dir and reads /etc/hostname, and says so in `add`."""
    return (
        f"open({str(c.dir / 'escaped')!r}, 'w').write('x')\nhost = open('/etc/hostname').read()\n"
        "def add(a, b):\n    return a + b"
    )


def kept_only(documents: int, skipped_source: str) -> Callable:
    """c.dir/ds holds `documents` documents, and one file skipped as unreadable: c.dir/skipped_source."""

    def check(r: Run, c):
        if not (c.dir / "ds/manifest.json").exists():
            return "no ds/manifest.json"
        manifest = json.loads((c.dir / "ds/manifest.json").read_text())
        skipped = manifest["skipped"]["examples"]
        want = [{"source": str(c.dir / skipped_source), "reason": "unreadable file"}]
        if manifest["documents"] != documents or skipped != want:
            return f"{manifest['documents']} documents (want {documents}), skipped {skipped}"
        return None

    return check


def only_the_live_sibling_left(out: str) -> Callable:
    def check(r: Run, c):
        left = sorted(p.name for p in c.dir.glob(f".{out}.tmp-*"))
        return None if left == [c.live.name] else f"temporary siblings left: {left}, want [{c.live.name}]"

    return check


# --- the cases ----------------------------------------------------------------------------------------------

GEN = ("--prompt", "def f(", "--max_new_tokens")
CASES = [
    Case(
        "1-unknown-key",
        nothing,
        lambda c: train(c.w, "train.stepz=10"),
        [
            exit_code(2),
            error_line("error: unknown config key train.stepz (did you mean train.steps?)"),
            holds(lambda r, c: not c.w.exists(), "the workdir was created"),
        ],
    ),
    Case("2-seq-len-0", nothing, lambda c: train(c.w, "data.seq_len=0"), exits_2_naming("data.seq_len")),
    Case("3a-lr-0", nothing, lambda c: train(c.w, "optimizer.lr=0"), exits_2_naming("optimizer.lr")),
    Case("3b-steps-negative", nothing, lambda c: train(c.w, "train.steps=-5"), exits_2_naming("train.steps")),
    Case(
        "3c-seq-len-over-max-position",
        nothing,
        lambda c: train(c.w, "data.seq_len=100000"),
        exits_2_naming("data.seq_len", "max_position"),
    ),
    Case("4-unwritable-workdir", nothing, lambda c: train("/proc/mct-probe"), exits_2_naming("workdir")),
    Case(
        "5-second-trainer-same-workdir",
        holder,
        lambda c: train(c.w),
        [*exits_2_naming("pid", socket.gethostname()), holder_stops_on_sigterm],
    ),
    Case(
        "6-metrics-not-duplicated-on-resume",
        steps(copy_finished, lambda c: shutil.rmtree(c.w / "checkpoints/10")),
        lambda c: train(c.w),
        [
            exit_code(0),
            holds(
                lambda r, c: sorted(logged_steps(c.w)) == list(range(1, 11)),
                "metrics.jsonl loss steps are not exactly 1..10 once each",
            ),
        ],
    ),
    Case(
        "7a-every-checkpoint-unreadable",
        steps(copy_finished, drop_markers),
        lambda c: train(c.w),
        [exit_code("non-zero"), says("no readable checkpoint left")],
    ),
    Case(
        "7b-rerun-after-all-moved-aside",
        steps(copy_finished, drop_markers, rerun),
        lambda c: train(c.w),
        exits_2_naming("10.corrupt-", "5.corrupt-", "allow_fresh_start"),
    ),
    Case(
        "7c-allow-fresh-start",
        steps(copy_finished, drop_markers, rerun, rerun),
        lambda c: train(c.w, "checkpoint.allow_fresh_start=true"),
        [exit_code(0)],
    ),
    Case(
        "8-resume-changed-seq-len",
        copy_finished,
        lambda c: train(c.w, "train.steps=15", "data.seq_len=64"),
        exits_2_naming("saved with different data settings", "seq_len"),
    ),
    Case(
        "9a-generate-0-tokens",
        nothing,
        lambda c: module("mct.generate", "--workdir", finished(), *GEN, 0),
        exits_2_naming("max_new_tokens"),
    ),
    Case(
        "9b-generate-past-max-position",
        nothing,
        lambda c: module("mct.generate", "--workdir", finished(), *GEN, 40000),
        exits_2_naming("max_position"),
        timeout=120,
    ),
    Case(
        "10a-save-on-full-disk",
        steps(tmpfs(), lambda c: setattr(c, "w", c.disk / "w")),
        lambda c: train(c.w, *small(), *TINIER, "train.steps=40"),
        [exit_code("non-zero"), failed_save_line, no_tmp_dirs],
    ),
    Case(
        "10b-export-onto-full-disk",
        tmpfs(fill=True),
        lambda c: module("mct.export", "--workdir", finished(), "--format", "llama", "--out", c.disk / "out"),
        [*exits_2_naming(), holds(lambda r, c: not nothing_left_in(c), "partial output left on the disk")],
    ),
    Case(
        "11-prepare-20mb-one-line",
        big_text,
        lambda c: measured(
            module(
                "data_pipelines.prepare",
                "--input",
                c.dir / "big.txt",
                "--out",
                c.dir / "ds",
                "--vocab_size",
                300,
            )
        ),
        [
            exit_code(0),
            peak_rss_under(1024),
            holds(
                lambda r, c: any(line.startswith("skipped") for line in r.out.splitlines()),
                "stdout has no line starting 'skipped'",
            ),
        ],
        timeout=400,
    ),
    Case(
        "12a-corrupt-checkpoint",
        steps(copy_finished, truncate_state),
        lambda c: train(c.w),
        [
            exit_code(0),
            says("resumed from", "step 5"),
            holds(
                lambda r, c: list(c.w.glob("checkpoints/10.corrupt-*")), "no checkpoints/10.corrupt-* kept"
            ),
            holds(
                lambda r, c: (c.w / "checkpoints/10/commit_success.txt").exists(), "step 10 not saved again"
            ),
        ],
    ),
    Case(
        "12b-truncated-shard",
        copy_dataset(truncate_shard),
        lambda c: train(c.w, *small(c.ds)),
        exits_2_naming("train-00000.arrayrecord"),
    ),
    Case(
        "12c-edited-manifest",
        copy_dataset(edit_manifest),
        lambda c: train(c.w, *small(c.ds)),
        exits_2_naming("manifest.json"),
    ),
    Case(
        "12d-sigterm-during-training",
        nothing,
        lambda c: train(c.w, "train.steps=2000"),
        [exit_code(0), saved_where_stopped],
        during=sigterm_after(3),
    ),
    Case(
        "13-tensorboard-installed",
        nothing,
        lambda c: [str(REPO / ".venv/bin/tensorboard"), "--version"],
        [exit_code(0)],
    ),
    # config ranges and launchers (issue 26)
    Case(
        "14a-max-to-keep-0",
        nothing,
        lambda c: train(c.w, "checkpoint.max_to_keep=0"),
        exits_2_naming("checkpoint.max_to_keep"),
    ),
    Case(
        "14b-grad-clip-negative",
        nothing,
        lambda c: train(c.w, "optimizer.grad_clip=-1"),
        exits_2_naming("optimizer.grad_clip"),
    ),
    Case(
        "14c-eval-batches-0",
        nothing,
        lambda c: train(c.w, "data.eval_batches=0"),
        exits_2_naming("eval_batches"),
    ),
    Case(
        "14d-generate-temperature-nan",
        nothing,
        lambda c: module("mct.generate", "--workdir", finished(), *GEN, 8, "--temperature=nan"),
        exits_2_naming("temperature"),
    ),
    Case(
        "14e-generate-temperature-inf",
        nothing,
        lambda c: module("mct.generate", "--workdir", finished(), *GEN, 8, "--temperature=inf"),
        exits_2_naming("temperature"),
    ),
    Case(
        "14f-generate-top-p-negative",
        nothing,
        lambda c: module("mct.generate", "--workdir", finished(), *GEN, 8, "--temperature=1", "--top_p=-0.5"),
        exits_2_naming("top_p"),
    ),
    Case(
        "14g-beam-prepare-misspelt-flag",
        nothing,
        lambda c: module("data_pipelines.beam_prepare", "--out", c.dir / "ds", "--dedupe", "exact"),
        [
            *exits_2_naming("--dedupe"),
            holds(lambda r, c: not (c.dir / "ds").exists(), "a dataset was written"),
        ],
    ),
    Case(
        "14h-tpu-repo-dir-injection",
        fake_tpu_worker,
        lambda c: on_fake_path(
            c,
            module(
                "mct.launch",
                "tpu",
                "--name=v5e",
                "--zone=z",
                "--repo_dir=x; touch pwned",
                "--",
                "--config=x.py",
            ),
        ),
        [exit_code(0), holds(lambda r, c: not (c.dir / "pwned").exists(), "the injected `touch pwned` ran")],
    ),
    Case(
        "14i-slurm-partition-newline",
        nothing,
        lambda c: module(
            "mct.launch",
            "slurm",
            "--nodes=1",
            "--gpus_per_node=8",
            "--partition=gpu\ntouch pwned",
            f"--out={c.dir / 'job.sbatch'}",
            "--",
            "--config=x.py",
        ),
        [
            *exits_2_naming("--partition"),
            holds(lambda r, c: not (c.dir / "job.sbatch").exists(), "script written"),
        ],
    ),
    # reward sandbox (issue 26)
    Case("26a-reward-kills-caller", nothing, reward("import os\nos.kill(os.getppid(), 9)"), [scored(0, 30)]),
    Case(
        "26b-reward-killpg-caller",
        nothing,
        reward("import os\nos.killpg(os.getpgid(os.getppid()), 9)"),
        [scored(0, 30)],
    ),
    Case("26c-reward-kill-all", nothing, reward("import os\nos.kill(-1, 9)", guard=True), [scored(0, 30)]),
    Case(
        "26d-reward-forged-result",
        nothing,
        reward(
            "import __main__, os, sys\n"
            "sys.stdout.write('\\n' + getattr(__main__, '_nonce', '') + '1000\\n')\nsys.stdout.flush()\nos._exit(0)"
        ),
        [scored(0, 30)],
    ),
    Case(
        "26e-reward-setsid-child",
        nothing,
        reward(SPAWN + "spawn('import time; time.sleep(20)')", timeout_s=1),
        [scored(0, 5)],
    ),
    Case(
        "26f-reward-fork-bomb",
        nothing,
        reward(f"import sys\nsys.argv[1:] = [{BOMB!r}, 'mct-probe-bomb']\nexec(sys.argv[1])", 1, guard=True),
        [scored(0, 5)],
    ),
    Case(
        "26g-reward-host-files",
        nothing,
        reward(escape_attempt),
        [
            scored(0, 30),
            holds(lambda r, c: not (c.dir / "escaped").exists(), "the candidate wrote a host file"),
        ],
    ),
    Case(
        "26h-reward-200mb-stdout",
        nothing,
        lambda c: measured(reward("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 2**20)")(c)),
        [scored(0, 30), peak_rss_under(200)],
    ),
    # text inputs and chat tokens (issue 26)
    Case(
        "26i-sft-lone-surrogate",
        jsonl_file("sft.jsonl", NOT_TEXT["surrogate"]),
        lambda c: posttrain("sft", "tiny_cpu_sft", c.w, f"data.chat.path=('{c.dir / 'sft.jsonl'}',)"),
        exits_2_naming("sft.jsonl:1", "lone surrogate"),
    ),
    Case(
        "26j-dpo-not-utf8",
        jsonl_file("dpo.jsonl", NOT_TEXT["not-utf8"]),
        lambda c: posttrain("dpo", "tiny_cpu_dpo", c.w, f"dpo.path=('{c.dir / 'dpo.jsonl'}',)"),
        exits_2_naming("dpo.jsonl:1", "not UTF-8"),
    ),
    Case(
        "26k-rl-deeply-nested-json",
        jsonl_file("prompts.jsonl", NOT_TEXT["deep"]),
        lambda c: posttrain(
            "rl", "tiny_cpu_rl", c.w, "data.seq_len=64", f"rl.prompts={c.dir / 'prompts.jsonl'}"
        ),
        exits_2_naming("prompts.jsonl:1", "nested too deeply"),
    ),
    Case(
        "26l-rl-answer-never-scores",
        jsonl_file("prompts.jsonl", b'{"prompt": "What is 4!?", "answer": "4!"}'),
        lambda c: posttrain(
            "rl", "tiny_cpu_rl", c.w, "data.seq_len=64", f"rl.prompts={c.dir / 'prompts.jsonl'}"
        ),
        exits_2_naming("prompts.jsonl:1", "numeric reward"),
    ),
    Case(
        "26m-prepare-skips-non-text-lines",
        jsonl_file("docs.jsonl", b'{"text": "the one document"}', *NOT_TEXT.values()),
        lambda c: module(
            "data_pipelines.prepare",
            "--input",
            c.dir / "docs.jsonl",
            "--out",
            c.dir / "ds",
            "--vocab_size",
            300,
            "--workers",
            1,
        ),
        [exit_code(0), says("skipped 3"), skip_examples("docs.jsonl:2", "docs.jsonl:3", "docs.jsonl:4")],
    ),
    Case(
        "26n-import-truncated-safetensors",
        copy_hf(truncate_weights),
        import_command,
        exits_2_naming("model.safetensors"),
    ),
    Case(
        "26o-import-config-is-a-list",
        copy_hf(edit_hf_config(lambda cfg: [cfg])),
        import_command,
        exits_2_naming("config.json"),
    ),
    Case(
        "26p-import-zero-heads",
        copy_hf(edit_hf_config(lambda cfg: {**cfg, "num_attention_heads": 0})),
        import_command,
        exits_2_naming("num_attention_heads"),
    ),
    # released tokenizers (issue 25)
    Case(
        "25a-prepare-tokenizer-model-not-sentencepiece",
        steps(small_jsonl, jsonl_file("tokenizer.model", b'{"not": "a sentencepiece model"}')),
        lambda c: module(
            "data_pipelines.prepare",
            "--input",
            c.dir / "small.jsonl",
            "--out",
            c.dir / "ds",
            "--tokenizer",
            c.dir / "tokenizer.model",
            "--workers",
            1,
        ),
        [
            *exits_2_naming("tokenizer.model", "not a SentencePiece model"),
            holds(lambda r, c: not (c.dir / "ds").exists(), "a dataset was written"),
        ],
    ),
    Case(
        "25b-import-special-ids-disagree",
        copy_hf(edit_hf_config(lambda cfg: {**cfg, "bos_token_id": 5})),
        import_command,
        exits_2_naming("config.json", "bos_token_id 5", "tokenizer"),
    ),
    # faults (issue 26)
    Case(
        "14j-checkpoints-read-only-mid-run",
        checkpoints_on_tmpfs,
        lambda c: train(c.w, "train.steps=2000", "checkpoint.every_steps=50"),
        [
            remounted,
            *exits_2_naming("Read-only file system", "last good checkpoint: step"),
            ended_within(120),
        ],
        during=read_only_after_first_checkpoint,
    ),
    Case(
        "14k-prepare-damaged-gzip",
        steps(small_jsonl, damaged_gzip),
        prepare_ds("*.jsonl*"),
        [exit_code(0), kept_only(40, "bad.jsonl.gz")],
    ),
    Case(
        "14l-prepare-after-killed-prepare",
        steps(killed_prepare, live_writer("ds"), small_jsonl),
        prepare_ds("small.jsonl"),
        [exit_code(0), only_the_live_sibling_left("ds")],
    ),
    Case(
        "14m-export-after-killed-export",
        steps(dead_writer("out"), live_writer("out")),
        lambda c: module("mct.export", "--workdir", finished(), "--format", "llama", "--out", c.dir / "out"),
        [exit_code(0), only_the_live_sibling_left("out")],
    ),
]


# --- the probe ----------------------------------------------------------------------------------------------


def run_case(case: Case) -> tuple[Run | None, str]:
    """(the command's run, "PASS" / "FAIL: why" / "SKIP: why")."""
    c = types.SimpleNamespace(dir=ROOT / case.name, cleanups=[])
    c.dir.mkdir(parents=True)
    c.w = c.dir / "w"
    run = None
    try:
        case.setup(c)
        run = finish(start(case.command(c), c.dir / "command"), case.timeout, case.during, c)
        if run.rc is None:
            return run, f"FAIL: timeout after {case.timeout} s"
        reasons = [why for check in case.expect if (why := check(run, c))]
        return run, "PASS" if not reasons else "FAIL: " + "; ".join(reasons)
    except Skip as e:
        return run, f"SKIP: {e}"
    except SetupError as e:
        return run, f"FAIL: setup: {e}"
    except Exception as e:  # noqa: BLE001 - a probe bug is reported, not raised
        return run, f"FAIL: probe error {type(e).__name__}: {e}"
    finally:
        for cleanup in reversed(c.cleanups):
            cleanup()


def selected(only: str | None) -> list[Case]:
    if not only:
        return CASES
    tokens = only.split(",")
    picked = [
        c for c in CASES if any(c.name == t or re.match(rf"{re.escape(t)}[a-z]?-", c.name) for t in tokens)
    ]
    if not picked:
        sys.exit(f"--only {only}: no such case; cases: {', '.join(c.name for c in CASES)}")
    return picked


def main() -> None:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case names or numbers")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--json", action="store_true", help="print {case: verdict} as JSON on the last line")
    args = parser.parse_args()
    cases = selected(args.only)
    ROOT = pathlib.Path(tempfile.mkdtemp(prefix="mct-bad-inputs-"))
    began, results = time.monotonic(), {}
    print(f"{'case':34} | {'exit':>7} | {'first line of output':72} | result", flush=True)
    print("-" * 150, flush=True)
    try:
        for case in cases:
            run, verdict = run_case(case)
            results[case.name] = verdict
            code = "-" if run is None else "timeout" if run.rc is None else str(run.rc)
            line = "" if run is None else run.first_line()
            line = line if len(line) <= 72 else line[:69] + "..."
            print(f"{case.name:34} | {code:>7} | {line:72} | {verdict}", flush=True)
    finally:
        if args.keep:
            print(f"kept {ROOT}")
        else:
            shutil.rmtree(ROOT, ignore_errors=True)
    ran = [r for r in results.values() if not r.startswith("SKIP")]
    passed = sum(r == "PASS" for r in ran)
    skipped = len(results) - len(ran)
    print(
        f"{passed}/{len(ran)} passed"
        + (f", {skipped} skipped" if skipped else "")
        + f" ({time.monotonic() - began:.0f} s)"
    )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
