"""Rewards (mct/posttrain/rewards.py): SymPy equivalence and format violations; the python_tests sandbox's limits."""

import socket
import threading
import time

import pytest

from mct.posttrain.rewards import exact, final_answer, numeric, python_tests, run_tests, safe_reward


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
