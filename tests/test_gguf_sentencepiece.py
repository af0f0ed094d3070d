"""GGUF export with a SentencePiece tokenizer in MiniCPM4's layout (a BPE model with byte fallback, `<unk>` 0, `<s>` 1,
`</s>` 2, then 8 added tokens in tokenizer_config.json), trained here with sentencepiece's trainer: the vocabulary
read back with gguf's reader is the model's pieces, scores and kinds typed as llama.cpp's converter types them;
llama.cpp (tests/llama_cpp_client.py) tokenizes hard text as sentencepiece does with BOS, stops at both eos ids, and
runs a tiny minicpm model on that vocabulary with mct's logits and greedy tokens. An InfLLM v2 run needs
allow_dense (--allow_dense on the CLI)."""

import io
import random
import subprocess
import sys

import gguf
import numpy as np
import pytest
import sentencepiece

from data_pipelines.tokenizer import load_tokenizer
from mct.errors import ConfigError
from mct.export.gguf_export import export_gguf
from mct.export.gguf_vocab import AddedToken, sentencepiece_vocab
from mct.infer.decoding import generate
from mct.run.reader import RunCheckpoint
from tests.data_fixtures import make_tiny_dataset
from tests.release_format import ADDED_TOKENS as ADDED
from tests.release_format import RELEASE_CHAT_TEMPLATE as TEMPLATE
from tests.release_format import write_release_tokenizer
from tests.test_export import save_random_run, tiny_run_config
from tests.test_llama_cpp import CTX, ask, mct_logits
from tests.tiny_runs import REPO

PIECES = 480
CJK = (
    "日本語のテキストと中文文本，还有一些汉字。",
    "今日は良い天気です。我们一起学习模型训练。",
    "데이터 샤드",
)
WORDS = "the river model token data shard train loss state batch packing of and a in to is it".split()
HARD_TEXTS = [
    "the  river\n\n  model\t  token",
    "\t\tindented\n    code  ",
    "日本語の模型训练 and 数据 😀🎉 emoji",
    " leading space, trailing  ",
    "zebra quiz: 12345 × ∑ 𝕏 ☃",  # letters and symbols the model never saw: byte fallback
    "\n",
    "x" * 40,
]
CHAT = "<|im_start|>user\n日本語 the river<|im_end|>\n"  # control tokens split the text; each part is encoded alone
PROMPTS = ["the river model", "日本語の data", "\tshard  train"]
MAX_NEW = 16


def corpus() -> list[str]:
    """Training text: random English word runs, CJK lines, emoji, tabs, runs of spaces and newlines."""
    r = random.Random(0)
    lines = [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 15))) for _ in range(400)]
    hard = ["emoji 😀🎉 and tabs\tand  double  spaces", "    indented:\n\tfor x in y:\n\t\tpass"]
    return lines + [*CJK, *hard] * 20


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    """tokenizer.model and tokenizer_config.json as the releases have them; the model's path."""
    directory = tmp_path_factory.mktemp("tokenizer")
    write_release_tokenizer(directory, PIECES, corpus())
    return directory / "tokenizer.model"


@pytest.fixture(scope="module")
def processor(tokenizer_model) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, dataset, tokenizer_model):
    """(run, params, GGUF path): a tiny random minicpm model over the pieces and the added tokens, in f32."""
    root = tmp_path_factory.mktemp("run")
    config = tiny_run_config(root / "wd", dataset, vocab_size=PIECES + len(ADDED), max_position=CTX)
    params = save_random_run(root / "wd", config)
    run = RunCheckpoint(root / "wd")
    return run, params, export_gguf(run, load_tokenizer(tokenizer_model), root / "m.gguf", "f32")


def test_vocabulary_reads_back_as_the_model_typed_as_llama_cpp_converts_it(exported, processor):
    reader = gguf.GGUFReader(exported[2])
    field = {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}
    tokens, scores, types = (field[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == PIECES + len(ADDED)
    assert tokens[:PIECES] == [processor.id_to_piece(i) for i in range(PIECES)]
    assert tokens[PIECES:] == list(ADDED)
    T = gguf.TokenType
    # <unk>, <s>, </s> are listed special in added_tokens_decoder: control tokens with score -1000, as llama.cpp's
    # converter makes them; the byte pieces follow in id order, then the normal pieces with their own scores
    assert types[:3] == [T.CONTROL] * 3 and scores[:3] == [-1000.0] * 3
    assert types[3:259] == [T.BYTE] * 256 and tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[259:PIECES]) == {T.NORMAL}
    np.testing.assert_array_equal(
        scores[3:PIECES], np.float32([processor.get_score(i) for i in range(3, PIECES)])
    )
    assert types[PIECES:] == [T.CONTROL] * len(ADDED) and scores[PIECES:] == [-1000.0] * len(ADDED)
    assert {k: field[f"tokenizer.ggml.{k}"] for k in ("model", "pre", "add_bos_token", "add_eos_token")} == {
        "model": "llama",
        "pre": "default",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    K = gguf.Keys.Tokenizer
    special = {
        k: field[key]
        for k, key in (("bos", K.BOS_ID), ("eos", K.EOS_ID), ("unk", K.UNK_ID), ("eot", K.EOT_ID))
    }
    assert special == {"bos": 1, "eos": 2, "unk": 0, "eot": PIECES}  # eot: <|im_end|>, the second eos id
    assert K.PAD_ID not in field and field[K.ADD_PREFIX] is True
    assert field["tokenizer.chat_template"] == TEMPLATE


def test_llama_cpp_tokenizes_as_sentencepiece_and_runs_mct_s_model(exported, processor):
    run, params, path = exported
    prompts = [[1, *processor.encode(text)] for text in PROMPTS]
    ids = prompts[0] + processor.encode(" and the model of data")
    eog, logits, chat, *answers = ask(  # one llama.cpp process
        path,
        {"op": "eog"},
        {"op": "logits", "ids": ids},
        {"op": "tokenize", "text": CHAT},
        *({"op": "tokenize", "text": text} for text in HARD_TEXTS),
        *({"op": "greedy", "prompt": p, "max_new": MAX_NEW} for p in prompts),
    )
    tokenized, greedy = answers[: len(HARD_TEXTS)], answers[len(HARD_TEXTS) :]
    for text, got in zip(HARD_TEXTS, tokenized, strict=True):
        assert got == [1, *processor.encode(text)], text
    assert any(processor.is_byte(i) for ids in tokenized for i in ids)  # byte fallback was exercised
    assert eog == [2, PIECES]  # </s> and <|im_end|>
    # as HF's LlamaTokenizer with legacy true (the releases'): each text part gets sentencepiece's dummy prefix
    im_start, im_end = PIECES + 1, PIECES
    assert chat == [1, im_start, *processor.encode("user\n日本語 the river"), im_end, *processor.encode("\n")]
    expected = mct_logits(run, params, ids)
    # both sides in f32 (llama.cpp's KV cache too): measured max |difference| 1.7e-5 with logits up to 10.9, i.e.
    # 1.5e-6 of the largest (summation order); 2e-5 of it leaves ~13x room for other CPUs' kernels
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5 * np.abs(expected).max())
    assert greedy == generate(run.model_cfg, params, prompts, max_new_tokens=MAX_NEW)


def test_added_tokens_follow_llama_cpp_s_converter(tokenizer_model):
    """Marked special or looking special (<|...|>): control; else user-defined with U+2581 as a space; pads last."""
    n, proto = PIECES, tokenizer_model.read_bytes()
    added = {
        n: AddedToken("<|x|>", False),
        n + 1: AddedToken("\u2581word", False),
        n + 2: AddedToken("[y]", True),
    }
    vocab = sentencepiece_vocab(proto, added, n + 4)
    T = gguf.TokenType
    assert vocab.tokens[n:] == ["<|x|>", " word", "[y]", f"[PAD{n + 3}]"]
    assert vocab.types[n:] == [T.CONTROL, T.USER_DEFINED, T.CONTROL, T.UNUSED]
    assert vocab.scores[n:] == [-1000.0] * 3 + [-10000.0]
    assert "eot" not in vocab.special_ids  # no <|im_end|>
    with pytest.raises(ValueError, match=f"ids up to {n + 2}, past the model's vocab_size {n + 2}"):
        sentencepiece_vocab(proto, added, n + 2)
    default = io.BytesIO()  # sentencepiece's default normalizer: NFKC, whitespace runs collapsed
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=default, vocab_size=90, minloglevel=2
    )
    with pytest.raises(ValueError, match="without a normalizer"):
        sentencepiece_vocab(default.getvalue(), {}, 90)


def test_an_infllm_v2_run_needs_allow_dense(tmp_path, dataset, tokenizer_model):
    workdir = tmp_path / "wd"
    config = tiny_run_config(workdir, dataset, attention="infllm_v2", max_position=CTX)
    save_random_run(workdir, config)
    run = RunCheckpoint(workdir)
    with pytest.raises(ConfigError, match="the gguf format has no InfLLM v2 sparse attention.*--allow_dense"):
        export_gguf(run, run.tokenizer(), tmp_path / "a.gguf", "f16")
    assert not (tmp_path / "a.gguf").exists()
    export = [sys.executable, "-m", "mct.export", "--workdir", str(workdir), "--format", "gguf"]
    result = subprocess.run(
        [*export, "--out", str(tmp_path / "b.gguf")], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--allow_dense" in result.stderr.strip().splitlines()[-1] and not (tmp_path / "b.gguf").exists()
    assert export_gguf(run, run.tokenizer(), tmp_path / "c.gguf", "f16", allow_dense=True).is_file()


def test_a_yarn_run_is_refused_in_one_line(tmp_path, dataset):
    """llama.cpp's yarn scales attention otherwise than transformers' YaRN, which mct imports: refused."""
    rope = {"type": "yarn", "factor": 4.0, "original_max_position": 64}
    config = tiny_run_config(tmp_path / "wd", dataset, max_position=CTX, rope=rope)
    save_random_run(tmp_path / "wd", config)
    run = RunCheckpoint(tmp_path / "wd")
    with pytest.raises(ConfigError, match="model.rope.type='yarn': GGUF export writes"):
        export_gguf(run, run.tokenizer(), tmp_path / "y.gguf", "f32")
    assert not (tmp_path / "y.gguf").exists()
