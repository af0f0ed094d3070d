"""lm-evaluation-harness's `--model mct` (mct.evaluation.lm_eval_model): local YAML tasks on JSONL files, run
by lm-eval's own command line, give mct.eval's numbers on the same checkpoint; without lm-eval installed the
entry point says which extra to install."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mct.evaluation.harness import Options, evaluate
from mct.run.reader import RunCheckpoint
from mct.run.task_files import read_tasks
from tests.test_eval import WORDS, dataset, merging_split, run, write_jsonl  # noqa: F401
from tests.tiny_runs import REPO


def yaml_tasks(
    root: pathlib.Path, mc: pathlib.Path, text: pathlib.Path, gen: pathlib.Path, stop: str
) -> None:
    """Three lm-eval tasks over local JSON files: multiple choice, rolling perplexity and generation (greedy,
    4 tokens, cut before `stop`)."""
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    (root / "mct_mc.yaml").write_text(
        "task: mct_mc\n"
        + common.format(path=mc)
        + "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        + 'target_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    )
    (root / "mct_text.yaml").write_text(
        "task: mct_text\n"
        + common.format(path=text)
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\n'
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "mct_gen.yaml").write_text(
        "task: mct_gen\n"
        + common.format(path=gen)
        + "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        + f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: 4\n"
        + "metric_list:\n  - metric: exact_match\n"
    )


def test_lm_eval_runs_local_yaml_tasks_with_mct_evals_numbers(tmp_path, run):
    pytest.importorskip("lm_eval")
    workdir, _ = run
    checkpoint = RunCheckpoint(workdir)
    tokenizer = checkpoint.tokenizer()
    merge_context, merge_choice = merging_split(tokenizer)
    mc = [
        {"context": "the river", "choices": [" runs", " runs to the sea", " stone"], "gold": 1},
        {"context": merge_context, "choices": [merge_choice, " sea", " every stone remembers"], "gold": 0},
        {"context": "", "choices": ["the sea", "the"], "gold": 1},
        {"context": "every stone", "choices": [" remembers", " sea", " and"], "gold": 2},
    ]
    texts = [{"text": "the river runs to the sea"}, {"text": " ".join(WORDS * 9)}]  # the second: 3 windows
    gen = [{"prompt": "the river", "answer": "x"}, {"prompt": "every stone", "answer": "y"}]
    files = [
        write_jsonl(tmp_path / f"{n}.jsonl", rows) for n, rows in (("mc", mc), ("text", texts), ("gen", gen))
    ]
    ours = evaluate(
        checkpoint, tokenizer, read_tasks(",".join(map(str, files))), Options(batch_size=8, max_new_tokens=4)
    )
    mc_ours, text_ours, gen_ours = ours
    stop = gen_ours.samples[0]["prediction"][1]  # a stop string the first generation holds
    yaml_tasks(tmp_path, *files, stop)
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [
        *(sys.executable, "-m", "mct.lm_eval", "--model", "mct", "--model_args", f"workdir={workdir}"),
        *("--tasks", "mct_mc,mct_text,mct_gen", "--include_path", str(tmp_path), "--batch_size", "auto"),
        *("--output_path", str(tmp_path / "out"), "--log_samples"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    harness = json.loads(pathlib.Path(results_file).read_text())["results"]

    def samples(task: str) -> list[dict]:
        (path,) = glob.glob(str(tmp_path / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        return sorted(map(json.loads, pathlib.Path(path).read_text().splitlines()), key=lambda s: s["doc_id"])

    for metric in ("acc", "acc_norm"):
        assert harness["mct_mc"][f"{metric},none"] == mc_ours.metrics[metric]
        assert np.isclose(harness["mct_mc"][f"{metric}_stderr,none"], mc_ours.stderr[metric], rtol=1e-12)
    for theirs, mine in zip(samples("mct_mc"), mc_ours.samples):  # lm-eval logs responses as strings
        assert [float(r[0][0]) for r in theirs["resps"]] == mine["loglikelihoods"]  # one scorer: equal
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert harness["mct_text"][f"{metric},none"] == text_ours.metrics[metric]
    cut = [s["prediction"].split(stop)[0] for s in gen_ours.samples]  # the decode loop's text to the stop
    assert cut[0] != gen_ours.samples[0]["prediction"]
    assert [s["resps"][0][0] for s in samples("mct_gen")] == cut


def test_without_lm_eval_the_entry_point_names_the_extra():
    hide = "import sys; sys.modules['lm_eval'] = None; from mct.cli.lm_eval import entry; entry()"
    done = subprocess.run(
        [sys.executable, "-c", hide, "--model", "mct"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: lm_eval is not installed: it comes with mct's `eval` extra (pip install -e '.[eval]')"
    ]
