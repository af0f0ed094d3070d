"""The core install runs without the optional extras, and a command that needs a missing one names it."""

import pathlib
import subprocess
import sys

import pytest

from data_pipelines.extras import MissingExtra, import_extra

REPO = pathlib.Path(__file__).resolve().parents[1]
# What each extra brings (pyproject.toml); blocked below as if not installed.
EXTRA_MODULES = {
    "tpu": ["libtpu"],
    "gguf": ["gguf", "llama_cpp"],
    "beam": ["apache_beam", "pyarrow"],
    "quality": ["fasttext", "datasketch"],
    "hf": ["torch", "transformers"],
    "eval": ["lm_eval"],
}
BLOCK_ALL = "import sys\n" + "".join(
    f"sys.modules[{m!r}] = None\n" for modules in EXTRA_MODULES.values() for m in modules
)


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python where importing any extra's module fails, as on a core-only install."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK_ALL + code], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_import_extra_names_the_extra_to_install():
    assert import_extra("json", "none").dumps(1) == "1"
    with pytest.raises(
        MissingExtra, match=r"^no_such_module is not installed: .*`quality` extra .*\[quality\]"
    ):
        import_extra("no_such_module", "quality")


def test_core_entry_points_import_without_any_extra():
    modules = [
        "mct.cli.train",
        "mct.cli.export",
        "mct.cli.generate",
        "mct.cli.sft",
        "mct.cli.eval",
        "mct.cli.aot",
        "data_pipelines.prepare",
        "data_pipelines.quality",
        "data_pipelines.dedup",
    ]
    r = run_without_extras("".join(f"import {m}\n" for m in modules))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "program, extra",
    [
        (
            "sys.argv = ['x', '--workdir=/nonexistent', '--format=gguf', '--out=/tmp/x.gguf']\n"
            "from mct.cli import export\nexport.entry()",
            "gguf",
        ),
        (
            "import runpy\nsys.argv = ['x', '--input=/nonexistent', '--out=/tmp/x']\n"
            "runpy.run_module('data_pipelines.beam_prepare', run_name='__main__')",
            "beam",
        ),
        (
            "sys.argv = ['x', '--config=experiments/configs/tiny_cpu.py', '--topology=v5e-4']\n"
            "from mct.cli import aot\naot.entry()",
            "tpu",
        ),
    ],
    ids=["gguf_export", "beam_prepare", "aot"],
)
def test_a_command_without_its_extra_exits_2_with_one_line(program, extra):
    r = run_without_extras(program)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert f"`{extra}` extra" in r.stderr and r.stderr.startswith("error: ")
