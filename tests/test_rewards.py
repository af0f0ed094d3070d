"""Rewards (mct/posttrain/rewards.py): SymPy equivalence and format violations; the python_tests sandbox's limits."""

import os
import pathlib
import socket
import struct
import threading
import time
import tracemalloc

import pytest

from experiments.probes.hostile_code import BOMB, SPAWN
from mct.config.posttrain import RLRunConfig
from mct.errors import UserError
from mct.posttrain import rewards, rl
from mct.posttrain.rewards import (
    count_passed,
    exact,
    final_answer,
    numeric,
    parse_test,
    python_tests,
    run_tests,
    safe_reward,
    sandbox_bwrap,
)


@pytest.mark.parametrize(
    "response, answer, score",
    [
        ("1/2", "0.5", 1),
        ("The answer is 12.", "12", 1),
        ("37 + 45 = 82.", "82", 1),  # SFT's arithmetic answers
        ("so \\boxed{2x + x}", "3*x", 1),
        ("(x+1)^2", "x^2 + 2x + 1", 1),
        ("sqrt(8)", "2*sqrt(2)", 1),
        ("1,000", "1000", 1),
        ("-7", "3-10", 1),
        ("13", "12", 0),
        ("x^2 + 1", "x^2 + 2", 0),
        ("twelve", "12", 0),  # letters parse as symbols: not equal to a number
        ("12 apples!", "12", 0),  # format violation: not an expression
        ("", "0", 0),
        ("9^9^9^9", "1", 0),  # a power too large to evaluate is refused, not computed
        ("__import__('os').system('true')", "0", 0),  # never evaluated as Python
    ],
)
def test_numeric_reward_is_sympy_equivalence(response, answer, score):
    assert numeric(response, {"answer": answer}) == score


def test_final_answer_and_exact():
    assert final_answer("work... \\boxed{1} then \\boxed{42}") == "42"
    assert final_answer("Answer: 3/4.") == "3/4"
    assert exact(" 42\n", {"answer": "42"}) == 1 and exact("42.0", {"answer": "42"}) == 0


ADD = "```python\ndef add(a, b):\n    return a + b\n```"


def test_python_tests_scores_the_fraction_passed():
    tests = [
        "assert add(1, 2) == 3",
        "assert add(2, 2) == 5",
        "assert add(-1, 1) == 0",
        "assert add('a', 'b') == 'ab'",
    ]
    assert python_tests(ADD, {"tests": tests}) == 0.75
    assert python_tests("def add(a, b) return", {"tests": tests}) == 0  # a syntax error passes nothing


def test_a_candidate_that_loops_forever_scores_zero_within_its_time_limit():
    start = time.monotonic()
    assert run_tests("while True:\n    pass", ["assert True"], timeout_s=2) == 0
    assert time.monotonic() - start < 10  # killed at the limit (generous for a loaded machine), not waited on


def test_a_candidate_that_allocates_10_gb_scores_zero():
    assert run_tests("big = bytearray(10 * 2**30)", ["assert len(big) > 0"], memory_mb=512) == 0
    assert run_tests("small = bytearray(2**20)", ["assert len(small) > 0"], memory_mb=512) == 1  # the control


def test_a_candidate_cannot_reach_the_network():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    code = f"import socket\nconnection = socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    namespace: dict = {}
    exec(code, namespace)  # outside the sandbox the connection succeeds
    namespace["connection"].close()
    assert run_tests(code, ["assert connection"]) == 0
    server.close()


def test_crashing_candidates_and_failing_rewards_score_zero():
    assert run_tests("import os\nos._exit(3)", ["assert True"]) == 0
    assert run_tests("import subprocess\nsubprocess.run(['true'])", ["assert True"]) == 0  # no processes
    assert run_tests("print('fake result line')\nraise SystemExit(0)", ["assert True"]) == 0

    def broken(response, item):
        raise RuntimeError("reward bug")

    assert safe_reward(broken, "x", {}) == 0.0
    assert safe_reward(lambda r, i: 7.0, "x", {}) == 1.0  # clipped to [0, 1]


# --- the sandbox (issue 26): each case below scored more than it passed, or hurt the trainer, before bwrap ---

TWO = ["assert add(1, 2) == 3", "assert add(2, 5) == 7"]  # a candidate without `add` passes neither


def in_stand_in_trainer(code: str, tests: list[str]) -> tuple[bool, int | None]:
    """run_tests in a forked child in a process group of its own, a stand-in for the trainer that a candidate
    escaping the sandbox would kill instead of pytest: (whether it lived to report, what it scored)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the stand-in: never returns into pytest
        try:
            os.setpgid(0, 0)
            os.write(write, str(run_tests(code, tests)).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as report:
        score = report.read()
    return os.WIFEXITED(status), int(score) if score else None


def require_pid_namespace() -> None:
    """Fails the test unless candidates run in a pid namespace of their own (their parent is its init, pid 1):
    what the dangerous cases (kill(-1), a fork bomb) would otherwise hit is every process of this machine."""
    if run_tests("import os", ["assert os.getppid() == 1"]) != 1:
        pytest.fail("candidates do not run in a pid namespace of their own: not running this case")


def live_processes_with(marker: str) -> list[int]:
    """The pids (seen from here) whose command line holds `marker`."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def gone(marker: str, within_s: float = 3.0) -> bool:
    """Whether every process holding `marker` has exited within `within_s` (reaping takes a moment)."""
    end = time.monotonic() + within_s
    while live_processes_with(marker):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize(
    "attack", ["os.kill(os.getppid(), 9)", "os.killpg(os.getpgid(os.getppid()), 9)"], ids=["kill", "killpg"]
)
def test_a_candidate_cannot_kill_its_caller(attack):
    assert in_stand_in_trainer(f"import os\n{attack}", TWO) == (True, 0)


def test_kill_minus_one_stays_inside_the_sandbox():
    require_pid_namespace()
    code = "import os\ntry:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\ndef add(a, b):\n    return a + b"
    assert in_stand_in_trainer(code, TWO) == (True, 2)  # no one to signal (ESRCH): the candidate goes on


FORGERIES = {
    "nonce line": (  # the result line of the harness before the sandbox, written by the candidate
        "import __main__, os, sys\n"
        "sys.stdout.write('\\n' + getattr(__main__, '_nonce', '') + '1000\\n')\nsys.stdout.flush()\nos._exit(0)"
    ),
    "records on every fd": (
        "import os\nfor fd in range(1, 64):\n    for i in range(2):\n        try:\n"
        "            os.write(fd, b'[%d, \"True\"]\\n' % i)\n        except OSError:\n            pass\nos._exit(0)"
    ),
    "always equal": (
        "class Equal:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Equal()"
    ),
}


@pytest.mark.parametrize("code", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_candidate_cannot_forge_its_result(code):
    assert run_tests(code, TWO) == 0


def test_printing_and_exiting_early_score_what_really_passed():
    code = "import os\nprint('1000')\ndef add(a, b):\n    if a == 2:\n        os._exit(0)\n    return a + b"
    assert run_tests(code, TWO + ["assert add(0, 0) == 0"]) == 1  # the 2nd test ends the program: no 3rd


@pytest.fixture(params=["seccomp", "namespace only"])
def layers(request, monkeypatch):
    """The sandbox as it is, then without its seccomp filter: the pid namespace alone must still contain what a
    candidate starts (never with a fork bomb: without the filter nothing bounds its process count)."""
    if request.param == "namespace only":
        allow_all = struct.pack("HBBI", 0x06, 0, 0, 0x7FFF0000)  # BPF: return SECCOMP_RET_ALLOW
        monkeypatch.setattr(rewards, "seccomp_filter", lambda: allow_all)
    return request.param


def test_a_child_in_its_own_session_dies_at_the_time_limit(layers):
    marker = f"mct-escape-{os.getpid()}-{time.monotonic_ns()}"
    code = SPAWN + f"spawn('import time; time.sleep(6)', {marker!r})\nwhile True:\n    pass"
    start = time.monotonic()
    assert run_tests(code, TWO, timeout_s=1) == 0
    assert time.monotonic() - start < 4  # not the 6 s the child holding the result pipe lives
    assert gone(marker)


def test_a_candidate_starts_threads_but_no_process():
    marker = f"mct-spawn-{os.getpid()}-{time.monotonic_ns()}"
    code = SPAWN + (
        "import threading\n"
        "started = 0\n"
        "for _ in range(5):\n"
        "    try:\n"
        f"        spawn('import time; time.sleep(3)', {marker!r})\n"
        "        started += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "box = []\n"
        "thread = threading.Thread(target=lambda: box.append(42))\n"
        "thread.start()\n"
        "thread.join()"
    )
    assert run_tests(code, ["assert started == 0", "assert box == [42]"]) == 2
    assert gone(marker)


def test_a_fork_bomb_starts_nothing_and_ends_at_the_limit():
    require_pid_namespace()
    marker = f"mct-bomb-{os.getpid()}-{time.monotonic_ns()}"
    code = f"import sys\nsys.argv[1:] = [{BOMB!r}, {marker!r}]\nexec(sys.argv[1])"
    start = time.monotonic()
    assert run_tests(code, TWO, timeout_s=1) == 0
    assert time.monotonic() - start < 4
    assert gone(marker)


def test_a_candidate_sees_no_host_files(tmp_path):
    outside = tmp_path / "escaped"
    host_file = next(p for p in map(pathlib.Path, ("/etc/hostname", "/etc/passwd")) if p.exists())
    code = (
        f"def write_outside():\n    return open({str(outside)!r}, 'w').write('x')\n"
        f"def host_file():\n    return open({str(host_file)!r}).read()\n"
        "def scratch():\n    open('scratch.txt', 'w').write('x')\n    return open('scratch.txt').read()"
    )
    tests = [
        "assert write_outside() == 1",
        f"assert host_file() == {host_file.read_text()!r}",
        "assert scratch() == 'x'",  # the control: the working dir is writable
    ]
    assert run_tests(code, tests) == 1
    assert not outside.exists()


def test_what_the_trainer_reads_back_is_capped():
    code = (
        "import os, sys\nfor _ in range(200):\n    sys.stdout.write('x' * 2**20)\n"  # 200 MB printed
        "for _ in range(200):\n    for fd in range(1, 64):\n        try:\n"  # and written to every fd
        "            os.write(fd, b'x' * 2**20)\n        except OSError:\n            pass"
    )
    tracemalloc.start()
    try:
        assert run_tests(code, TWO, timeout_s=10) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


@pytest.fixture
def fresh_sandbox_check():
    """sandbox_bwrap() checked again in the test and again after it (it is cached per process)."""
    sandbox_bwrap.cache_clear()
    yield
    sandbox_bwrap.cache_clear()


def test_without_bwrap_the_reward_refuses_in_one_line(monkeypatch, tmp_path, fresh_sandbox_check):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"needs bubblewrap.*no `bwrap` on PATH") as refusal:
        safe_reward(python_tests, ADD, {"tests": TWO})  # a refusal is not a 0: it stops the run
    assert "\n" not in str(refusal.value)
    fake = tmp_path / "bwrap"  # a bwrap that cannot create namespaces here
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(UserError, match="cannot start its sandbox here: bwrap: No permissions"):
        python_tests(ADD, {"tests": TWO})


def test_an_rl_run_with_the_code_reward_refuses_before_it_builds_anything(
    monkeypatch, tmp_path, fresh_sandbox_check
):
    """The refusal comes at the run's start (no model, data or checkpoint is touched), not at its first reward."""
    monkeypatch.setenv("PATH", str(tmp_path))
    config = RLRunConfig.from_dict({"workdir": str(tmp_path / "w"), "rl": {"reward": "python_tests"}})
    with pytest.raises(UserError, match="needs bubblewrap"):
        rl.train(config)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "test, mode, code",
    [
        ("assert add(1, 2) == 3", "eval", "add(1, 2)"),
        ("assert f('a') in ('a', 'b')", "eval", "f('a')"),
        ("assert f() is None", "eval", "f()"),
        ("assert f() is 5", "exec", "assert f() is 5"),  # `is` only with None, True, False
        ("assert f(3) == g(3)", "exec", "assert f(3) == g(3)"),  # not a literal: run whole in the sandbox
        ("assert 0 < f() < 2", "exec", "assert 0 < f() < 2"),
        ("x = f()\nassert x == 1", "exec", "x = f()\nassert x == 1"),
    ],
)
def test_tests_with_a_literal_expected_value_are_judged_by_the_trainer(test, mode, code):
    check = parse_test(test)
    assert (check.mode, check.code) == (mode, code)


def test_each_check_needs_exactly_one_literal_line():
    checks = [parse_test("assert f() == 3"), parse_test("assert f() == [1]"), parse_test("assert g()")]
    assert count_passed(b'[0, "3"]\n[1, "[1]"]\n[2, "True"]\n', checks) == 3
    assert (
        count_passed(b'[0, "3"]\n[0, "3"]\n[1, "<Equal object>"]\n[2, "1"]', checks) == 0
    )  # twice; not a literal; cut
