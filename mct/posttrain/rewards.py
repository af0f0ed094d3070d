"""Verifiable rewards for RL (MiniCPM4 report section 3.2): math by rule and SymPy, code by unit tests.

Each reward maps (response text, the prompt's item) to a score in [0, 1]:
- `exact`: the response (stripped) equals the item's "answer".
- `numeric`: the final answer (the last `\\boxed{...}`, else the text after the last "answer:", else after the
  last "=", else the whole response) is a number or expression SymPy finds equal to "answer"; anything that
  does not parse as one (a format violation) scores 0. Only arithmetic characters are parsed, and powers are
  bounded, so a response never runs code or hangs the trainer.
- `python_tests`: the fraction of the item's "tests" (assert statements) that pass against the response's
  code (the last ```python block, else the whole response), run in a bubblewrap sandbox: its own user, pid,
  mount and network namespaces, a read-only view of the interpreter, a small tmpfs as its working dir, limits
  on wall-clock and CPU time, memory and what the trainer reads back, and no new process (seccomp). For
  `assert EXPR == LITERAL` (and the other comparisons with a literal) the sandbox sends EXPR's value and the
  trainer compares it, so a candidate never sees the expected value and cannot write a pass. Without bwrap the
  reward refuses (a UserError), never running candidate code unsandboxed. The threat model is in docs/posttrain.md.
"""

import ast
import dataclasses
import errno
import functools
import json
import operator
import os
import platform
import re
import select
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import sympy
from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, standard_transformations

from mct.errors import MctError, UserError

Reward = Callable[[str, dict], float]

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER = re.compile(r"answer\s*[:：]?\s*(?:is\s*)?(.*)$", re.IGNORECASE | re.DOTALL)
_EXPRESSION = re.compile(r"[0-9a-zA-Z+\-*/^().,\s]*")
_ALLOWED_NAMES = {"sqrt": sympy.sqrt, "pi": sympy.pi, "E": sympy.E, "I": sympy.I}
MAX_EXPRESSION_CHARS = 120
MAX_EXPONENT = 64


def exact(response: str, item: dict) -> float:
    """1 when the stripped response equals the stripped answer, else 0."""
    return float(response.strip() == str(item["answer"]).strip())


def final_answer(response: str) -> str:
    """The last \\boxed{...}, else what follows the last "answer:", else what follows the last "=" (as in
    "37 + 45 = 82."), else the whole response; stripped, without a final full stop."""
    boxed = _BOXED.findall(response)
    if boxed:
        return boxed[-1].strip()
    answers = [m.group(1) for m in _ANSWER.finditer(response)]
    text = answers[-1] if answers else response.rpartition("=")[2]
    return text.strip().rstrip(".")


def parse_math(text: str) -> sympy.Expr | None:
    """A SymPy expression of arithmetic text (digits, letters as symbols, + - * / ^ ( ) . ,) or None."""
    text = text.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text.strip()) else text
    if (
        not text.strip()
        or len(text) > MAX_EXPRESSION_CHARS
        or not _EXPRESSION.fullmatch(text)
        or "__" in text
    ):
        return None
    text = text.replace("^", "**")
    try:
        transformations = (*standard_transformations, implicit_multiplication)
        expr = parse_expr(
            text, local_dict=dict(_ALLOWED_NAMES), transformations=transformations, evaluate=False
        )
    except Exception:  # noqa: BLE001 - any parse failure is a format violation
        return None
    if not isinstance(expr, sympy.Expr):
        return None
    for power in expr.atoms(sympy.Pow):  # 9^9^9 would never finish evaluating
        exponent = power.exp
        if not exponent.is_number or abs(complex(exponent.evalf())) > MAX_EXPONENT:
            return None
    return expr


def equivalent(a: sympy.Expr, b: sympy.Expr) -> bool:
    """a == b as numbers (relative 1e-9) when both are numbers, else simplify(a - b) == 0."""
    try:
        if a.is_number and b.is_number:
            x, y = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
            return abs(x - y) <= 1e-9 * max(1.0, abs(y))
        return sympy.simplify(a - b) == 0
    except (TypeError, ValueError, ZeroDivisionError, ArithmeticError):
        return False


def numeric(response: str, item: dict) -> float:
    """1 when the response's final answer is SymPy-equivalent to item["answer"]; 0 otherwise or unparsable."""
    gold = parse_math(str(item["answer"]))
    if gold is None:
        raise ValueError(f"answer {item['answer']!r} is not a number or expression SymPy can read")
    predicted = parse_math(final_answer(response))
    return float(predicted is not None and equivalent(predicted, gold))


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)

SANDBOX_TMP_BYTES = 64 * 2**20  # the sandbox's /tmp (its working dir) is a tmpfs of this size
SANDBOX_OPEN_FILES = 64
MAX_RESULT_BYTES = 2**20  # what the trainer reads of the result channel; then the sandbox is killed

# The sandbox's program: its limits (set before any candidate code runs), the result channel (a copy of stdout;
# the candidate's own stdout and stderr go to /dev/null), an audit hook that refuses the network, subprocesses
# and ctypes (a second layer: the namespaces are the boundary), then the candidate, then each check in a copy of
# its namespace. A check sends `[index, ascii(value)]` on a line: "eval" the expression's value, "exec" True
# once the test statement ran through. The expected values never enter the sandbox.
_HARNESS = """
import json, os, resource, sys
_source, _checks, _memory, _cpu, _files = json.loads(sys.stdin.readline())
_LIMITS = {"AS": _memory, "CPU": _cpu, "NOFILE": _files, "FSIZE": 1 << 24, "CORE": 0}
for _name, _value in _LIMITS.items():
    resource.setrlimit(getattr(resource, "RLIMIT_" + _name), (_value, _value))
_results = os.fdopen(os.dup(1), "w", encoding="ascii")
_null = os.open("/dev/null", os.O_RDWR)
for _fd in (0, 1, 2):
    os.dup2(_null, _fd)
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "ctypes.", "pty.", "_posixsubprocess")
def _guard(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
sys.addaudithook(_guard)
try:
    _namespace = {"__name__": "__candidate__"}
    exec(compile(_source, "candidate.py", "exec"), _namespace)
    for _index, (_mode, _code) in enumerate(_checks):
        try:
            _scope = dict(_namespace)
            if _mode == "eval":
                _value = ascii(eval(compile(_code, "test.py", "eval"), _scope))
            else:
                exec(compile(_code, "test.py", "exec"), _scope)
                _value = "True"
            _results.write(json.dumps([_index, _value]) + "\\n")
            _results.flush()
        except BaseException:
            pass
except BaseException:
    pass
"""

# `assert VALUE <op> LITERAL`: the sandbox sends VALUE, the trainer applies <op> with LITERAL
_COMPARISONS: dict[type, Callable[[object, object], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda value, expected: value in expected,
    ast.NotIn: lambda value, expected: value not in expected,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_SINGLETONS = (None, True, False)  # the only literals `is` compares meaningfully


@dataclasses.dataclass(frozen=True)
class Check:
    """One test as the trainer judges it. The sandbox runs `code` ("eval": an expression, whose value's ascii()
    it sends back; "exec": the whole test statement, True once it runs through) and `judge` decides on the
    literal it sent. An expected value lives only in `judge`, in the trainer: a candidate cannot read it, and
    what it can write to the channel is no more than a value its own code could have returned."""

    mode: str
    code: str
    judge: Callable[[object], bool]


def parse_test(test: str) -> Check:
    """`assert EXPR <op> LITERAL` (one comparison: == != < <= > >= in, not in; is, is not with None, True or
    False) becomes an "eval" of EXPR judged against the literal; any other test is an "exec" of the test, which
    holds no secret from the candidate (its pass is only as good as evaluating it next to the candidate)."""
    whole = Check("exec", test, functools.partial(operator.is_, True))
    try:
        (statement,) = ast.parse(test).body
    except (
        SyntaxError,
        ValueError,
    ):  # not one statement: the sandbox runs it (and a syntax error fails there)
        return whole
    compare = statement.test if isinstance(statement, ast.Assert) else None
    if (
        not isinstance(compare, ast.Compare)
        or len(compare.ops) != 1
        or type(compare.ops[0]) not in _COMPARISONS
    ):
        return whole
    try:
        expected = ast.literal_eval(compare.comparators[0])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # not a literal
        return whole
    op = compare.ops[0]
    if isinstance(op, ast.Is | ast.IsNot) and not any(expected is s for s in _SINGLETONS):
        return whole
    compare_with = _COMPARISONS[type(op)]
    return Check("eval", ast.unparse(compare.left), lambda value: compare_with(value, expected))


def accepts(check: Check, text: str) -> bool:
    """Whether the literal `text` the sandbox sent passes `check`; text that is not a literal fails."""
    try:
        return bool(check.judge(ast.literal_eval(text)))
    except Exception:  # noqa: BLE001 - not a literal, or not comparable with the expected value: a failed test
        return False


def count_passed(channel: bytes, checks: list[Check]) -> int:
    """How many checks pass on what the sandbox wrote to its result channel: a check needs exactly one complete
    `[index, literal]` line, which it accepts; lines that do not parse, and checks with several lines, fail."""
    sent: dict[int, list[str]] = {}
    for line in channel.split(b"\n")[:-1]:  # the last piece is empty or cut off
        try:
            index, text = json.loads(line)
        except (ValueError, TypeError, RecursionError):
            continue
        if isinstance(index, int) and isinstance(text, str):
            sent.setdefault(index, []).append(text)
    return sum(len(sent.get(i, ())) == 1 and accepts(check, sent[i][0]) for i, check in enumerate(checks))


def candidate_code(response: str) -> str:
    """The last fenced Python block of the response, else the whole response."""
    blocks = _CODE_BLOCK.findall(response)
    return blocks[-1] if blocks else response


def sandbox_flags() -> list[str]:
    """bwrap's flags: new user, pid, mount, network, ipc, uts and cgroup namespaces, no capabilities, no nested
    user namespaces, killed with the trainer; a read-only root holding only /usr (with the host's /bin, /lib...
    links), the interpreter's prefix read-only and /dev/null; a size-capped tmpfs /tmp as the working dir; an
    empty environment."""
    flags = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
    flags += ["--cap-drop", "ALL", "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin"]
    flags += ["--setenv", "HOME", "/tmp", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            flags += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            flags += ["--ro-bind", top, top]
    prefix = os.path.realpath(sys.base_prefix)  # the stdlib; a venv's site-packages stay outside
    if os.path.commonpath([prefix, "/usr"]) != "/usr":
        flags += ["--ro-bind", prefix, prefix]
    flags += ["--dev-bind", "/dev/null", "/dev/null", "--size", str(SANDBOX_TMP_BYTES), "--tmpfs", "/tmp"]
    return [*flags, "--remount-ro", "/", "--chdir", "/tmp"]


# seccomp: (AUDIT_ARCH, clone, clone3, fork-like syscalls) per machine; see seccomp_filter
_SYSCALLS = {"x86_64": (0xC000003E, 56, 435, (57, 58)), "aarch64": (0xC00000B7, 220, 435, ())}
_BPF_LOAD, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06  # classic BPF opcodes
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000  # seccomp return actions
_CLONE_THREAD = 0x00010000


def _bpf(code: int, k: int, jump_true: int = 0, jump_false: int = 0) -> bytes:
    return struct.pack("HBBI", code, jump_true, jump_false, k)


@functools.cache
def seccomp_filter() -> bytes:
    """A seccomp program that lets the sandboxed interpreter start threads but no process: fork, vfork and clone
    without CLONE_THREAD fail with EPERM, clone3 with ENOSYS (glibc then makes threads with clone), and a
    syscall of another ABI (i386, x32) kills the process. RLIMIT_NPROC would not do: the kernel does not
    enforce it on processes whose real uid is root outside their user namespace, as a root trainer's sandbox."""
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise UserError(
            f"reward python_tests has no seccomp filter for this machine ({machine}): x86_64 or aarch64"
        )
    arch, clone, clone3, forks = _SYSCALLS[machine]
    deny = _bpf(_BPF_RET, _ERRNO | errno.EPERM)
    program = [_bpf(_BPF_LOAD, 4), _bpf(_BPF_JEQ, arch, 1, 0), _bpf(_BPF_RET, _KILL), _bpf(_BPF_LOAD, 0)]
    program += [_bpf(_BPF_JGE, 0x40000000, 0, 1), _bpf(_BPF_RET, _KILL)]  # x32's numbers
    program += [_bpf(_BPF_JEQ, clone3, 0, 1), _bpf(_BPF_RET, _ERRNO | errno.ENOSYS)]
    for number in forks:
        program += [_bpf(_BPF_JEQ, number, 0, 1), deny]
    program += [_bpf(_BPF_JEQ, clone, 0, 3), _bpf(_BPF_LOAD, 16), _bpf(_BPF_JSET, _CLONE_THREAD, 1, 0), deny]
    return b"".join([*program, _bpf(_BPF_RET, _ALLOW)])


def start_sandbox(bwrap: str, args: list[str], **popen) -> subprocess.Popen:
    """`python -I -S ARGS...` (this interpreter, no site-packages) in a bwrap sandbox: sandbox_flags and
    seccomp_filter (handed to bwrap in a memfd)."""
    fd = os.memfd_create("mct-seccomp")
    try:
        os.write(fd, seccomp_filter())
        os.lseek(fd, 0, os.SEEK_SET)
        python = os.path.realpath(sys.executable)
        argv = [bwrap, *sandbox_flags(), "--seccomp", str(fd), "--", python, "-I", "-S", *args]
        return subprocess.Popen(argv, pass_fds=(fd,), **popen)
    finally:
        os.close(fd)


@functools.cache
def sandbox_bwrap() -> str:
    """The bwrap that sandboxes candidates, checked once by starting a sandbox. Raises UserError, one line naming
    what is missing, where this machine cannot sandbox: candidate code never runs unsandboxed."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise UserError(
            "reward python_tests needs bubblewrap to sandbox candidate code: no `bwrap` on PATH "
            "(Debian: apt-get install bubblewrap)"
        )
    with start_sandbox(bwrap, ["-c", "pass"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as probe:
        try:
            _, err = probe.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            probe.kill()
            raise UserError("reward python_tests: `bwrap` did not start a sandbox within 60 s") from None
    if probe.returncode != 0:
        why = err.decode(errors="replace").strip().splitlines() or [f"exit {probe.returncode}"]
        raise UserError(f"reward python_tests: `bwrap` cannot start its sandbox here: {why[-1]}")
    return bwrap


def read_results(proc: subprocess.Popen, request: bytes, deadline: float) -> bytes:
    """Sends the request, then reads the result channel until it closes, the deadline passes or
    MAX_RESULT_BYTES have come (a candidate may flood it)."""
    try:
        with proc.stdin:  # closed even when it fails
            proc.stdin.write(request)
    except BrokenPipeError:  # the sandbox is gone already
        return b""
    chunks, size, fd = [], 0, proc.stdout.fileno()
    while size < MAX_RESULT_BYTES:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, min(2**16, MAX_RESULT_BYTES - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def run_tests(code: str, tests: list[str], *, timeout_s: float = 5.0, memory_mb: int = 512) -> int:
    """How many of `tests` pass against `code` in the sandbox (docs/posttrain.md, "The python_tests sandbox");
    what the candidate has not sent by the wall-clock limit counts for nothing."""
    checks = [parse_test(test) for test in tests]
    limits = [memory_mb * 2**20, int(timeout_s) + 1, SANDBOX_OPEN_FILES]
    request = json.dumps([code, [[c.mode, c.code] for c in checks], *limits]).encode() + b"\n"
    bwrap = sandbox_bwrap()
    deadline = time.monotonic() + timeout_s
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
    with start_sandbox(bwrap, ["-c", _HARNESS], **pipes) as proc:
        try:
            channel = read_results(proc, request, deadline)
        finally:
            proc.kill()  # bwrap: its pid-namespace init dies with it, and with that init everything inside
    return count_passed(channel, checks)


def python_tests(response: str, item: dict) -> float:
    """The fraction of item["tests"] (assert statements) the response's code passes in the sandbox."""
    tests = item["tests"]
    tests = [tests] if isinstance(tests, str) else list(tests)
    if not tests:
        raise ValueError("an item of reward python_tests has an empty 'tests' list")
    return run_tests(candidate_code(response), tests) / len(tests)


REWARDS: dict[str, Reward] = {"exact": exact, "numeric": numeric, "python_tests": python_tests}
ANSWER_KEYS = {"exact": "answer", "numeric": "answer", "python_tests": "tests"}


def safe_reward(reward: Reward, response: str, item: dict) -> float:
    """reward(response, item) clipped to [0, 1]; a reward that fails on this response scores 0 (a reward
    function must never stop training), but a refusal (an MctError: e.g. no sandbox on this machine) stops
    the run with its one line."""
    try:
        return min(max(float(reward(response, item)), 0.0), 1.0)
    except MctError:
        raise
    except Exception:  # noqa: BLE001 - e.g. SymPy failing on an odd expression
        return 0.0
