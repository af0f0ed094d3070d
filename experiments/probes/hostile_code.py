"""Hostile candidate programs for the RL code reward's sandbox, shared by the probe and tests/test_rewards.py."""

SPAWN = (  # starts `python -c CHILD ARGS...` with every open fd inherited, in a session of its own
    "import _posixsubprocess, os, sys\n"
    "def spawn(child, *args):\n"
    "    fds = []\n"
    "    for fd in range(3, 64):\n"
    "        try:\n"
    "            os.fstat(fd)\n"
    "            fds.append(fd)\n"
    "        except OSError:\n"
    "            pass\n"
    "    errors = os.pipe()\n"
    "    _posixsubprocess.fork_exec(\n"
    "        [sys.executable, '-c', child, *args], [os.fsencode(sys.executable)], True,\n"
    "        tuple(sorted(fds + [errors[1]])), None, None, -1, -1, -1, -1, -1, -1, errors[0], errors[1],\n"
    "        False, True, -1, None, None, None, -1, None, False)\n"
)
BOMB = SPAWN + (  # each copy starts copies of itself (its source and the marker in its argv)
    "import sys\nwhile True:\n    try:\n"
    "        spawn(sys.argv[1], sys.argv[1], sys.argv[2])\n    except OSError:\n        pass"
)
