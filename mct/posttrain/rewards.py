"""Verifiable rewards for RL (MiniCPM4 report section 3.2): math by rule and SymPy, code by unit tests.

Each reward maps (response text, the prompt's item) to a score in [0, 1]:
- `exact`: the response (stripped) equals the item's "answer".
- `numeric`: the final answer (the last `\\boxed{...}`, else the text after the last "answer:", else after the
  last "=", else the whole response) is a number or expression SymPy finds equal to "answer"; anything that
  does not parse as one (a format violation) scores 0. Only arithmetic characters are parsed, and powers are
  bounded, so a response never runs code or hangs the trainer.
- `python_tests`: the fraction of the item's "tests" (assert statements) that pass against the response's
  code (the last ```python block, else the whole response), run in a child process with a wall-clock and CPU
  limit, an address-space limit (RLIMIT_AS), a temporary working directory and no network: a network
  namespace of its own (`unshare -rn`) where the host allows it, and always an audit hook that refuses
  sockets, subprocesses and ctypes. A hung, crashing or memory-hungry candidate scores 0.
"""

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import sympy
from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, standard_transformations

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

# The child: its limits (set before any candidate code runs), an audit hook that refuses the network,
# subprocesses and ctypes (it cannot be removed), then the candidate, then each test in its own try; the count
# goes out on a line tagged with a nonce.
_HARNESS = """
import json, resource, sys
_source, _tests, _nonce, _memory, _cpu = json.loads(sys.stdin.readline())
resource.setrlimit(resource.RLIMIT_AS, (_memory, _memory))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "ctypes.", "pty.", "_posixsubprocess")
def _guard(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
sys.addaudithook(_guard)
_passed = 0
try:
    _namespace = {"__name__": "__candidate__"}
    exec(compile(_source, "candidate.py", "exec"), _namespace)
    for _test in _tests:
        try:
            exec(compile(_test, "test.py", "exec"), dict(_namespace))
            _passed += 1
        except BaseException:
            pass
except BaseException:
    pass
sys.stdout.write("\\n" + _nonce + json.dumps(_passed) + "\\n")
sys.stdout.flush()
"""


def candidate_code(response: str) -> str:
    """The last fenced Python block of the response, else the whole response."""
    blocks = _CODE_BLOCK.findall(response)
    return blocks[-1] if blocks else response


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """("unshare", "-rn") when this host lets an unprivileged child take a network namespace of its own."""
    if shutil.which("unshare") is None:
        return ()
    try:
        probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return ("unshare", "-rn") if probe.returncode == 0 else ()


def run_tests(code: str, tests: list[str], *, timeout_s: float = 5.0, memory_mb: int = 512) -> int:
    """How many of `tests` pass against `code` in the sandbox; 0 when the child hangs, crashes or is killed."""
    nonce = secrets.token_hex(16)
    request = json.dumps([code, tests, nonce, memory_mb * 2**20, int(timeout_s) + 1]).encode() + b"\n"
    with tempfile.TemporaryDirectory(prefix="mct-sandbox-") as tmp:
        command = [*network_namespace_prefix(), sys.executable, "-I", "-S", "-c", _HARNESS]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0"}
        try:
            proc = subprocess.Popen(
                command,
                cwd=tmp,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            return 0
        try:
            out, _ = proc.communicate(request, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and anything it started
            proc.communicate()
            return 0
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith(nonce):
            return int(json.loads(line[len(nonce) :]))
    return 0


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
    function must never stop training)."""
    try:
        return min(max(float(reward(response, item)), 0.0), 1.0)
    except Exception:  # noqa: BLE001 - e.g. SymPy failing on an odd expression
        return 0.0
