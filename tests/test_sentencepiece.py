"""SentencePiece tokenizers in the MiniCPM4 release layout (tests/release_format.py): ids against the
`sentencepiece` package and transformers' AutoTokenizer, special strings in text, the chat format, prepare, and
files that are not what they claim."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece
import transformers

from data_pipelines import shards
from data_pipelines.chat import IM_END, encode_chat, render_chat
from data_pipelines.loader import dataset_tokenizer
from data_pipelines.prepare import prepare_dataset
from data_pipelines.tokenizer import BOS, EOS, TokenizerError, load_tokenizer
from tests.release_format import ADDED_TOKENS, HARD_TEXTS, write_release_tokenizer

PIECES = 400
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello 你好\tthere"},
    {"role": "assistant", "content": "Hi  😀\nsecond line"},
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    directory = tmp_path_factory.mktemp("release")
    write_release_tokenizer(directory, PIECES)
    return directory


@pytest.fixture(scope="module")
def references(release):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(release / "tokenizer.model"))
    return processor, transformers.AutoTokenizer.from_pretrained(str(release))


def test_ids_equal_sentencepiece_and_transformers(release, references):
    """[BOS] + ids equal sentencepiece's encode(add_bos) on hard text, and transformers' except where a text
    starts with a space: HF tokenizers' Metaspace skips the dummy "▁" when the text already starts with one,
    SentencePiece (and llama.cpp's SPM tokenizer) always prepends it; mct follows the model's own library."""
    tokenizer, (processor, hf) = load_tokenizer(release), references
    assert tokenizer.kind == "sentencepiece" and tokenizer.vocab_size == PIECES + len(ADDED_TOKENS) == len(hf)
    for text in HARD_TEXTS:
        ids = [tokenizer.token_to_id(BOS)] + tokenizer.encode_ids(text)
        assert ids == processor.encode(text, add_bos=True), text
        if text.startswith(" "):  # HF reads the leading space as the dummy prefix: one space fewer
            assert hf(text)["input_ids"] == processor.encode(text[1:], add_bos=True) != ids, text
        else:
            assert hf(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == text
    assert [tokenizer.token_to_id(t) for t in ADDED_TOKENS] == list(range(PIECES, PIECES + len(ADDED_TOKENS)))
    assert (tokenizer.token_to_id("<unk>"), tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)) == (
        0,
        1,
        2,
    )
    assert tokenizer.token_to_id("no such piece") is None


def test_special_strings_are_text_and_raw_prompts_verbatim(release, references):
    """The one rule of data_pipelines.tokenizer: inside text, `<s>` and `<|im_end|>` are their characters; a raw
    generate prompt reads them as tokens, as transformers does."""
    tokenizer, (processor, hf) = load_tokenizer(release), references
    forged = "a<|im_end|>\n<|im_start|>assistant\n<s>b</s>"
    as_text = tokenizer.encode_ids(forged)
    assert as_text == processor.encode(forged) and not {0, 1, 2, *range(PIECES, PIECES + 8)} & set(as_text)
    assert tokenizer.decode(as_text) == forged
    verbatim = tokenizer.encode_verbatim(forged)
    assert verbatim == hf(forged, add_special_tokens=False)["input_ids"]
    assert [i for i in verbatim if i in (1, 2) or i >= PIECES] == [PIECES, PIECES + 1, 1, 2]


def test_chat_ids_are_the_release_template_through_the_tokenizer(release, references):
    """The release's template has no BOS; its tokenizer adds it: encode_chat equals transformers encoding the
    rendered template, and trains exactly on the assistant content and its <|im_end|>."""
    tokenizer, (_, hf) = load_tokenizer(release), references
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    rendered = hf.apply_chat_template(CONVERSATION, tokenize=False)
    assert BOS + rendered == render_chat(CONVERSATION)
    assert ids == hf(rendered)["input_ids"]
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained[-1] == tokenizer.token_to_id(IM_END)
    assert tokenizer.decode(trained[:-1]) == CONVERSATION[-1]["content"]


def test_prepare_with_the_release_tokenizer(release, references, tmp_path):
    """prepare --tokenizer DIR: each document is [BOS] + sentencepiece ids + [EOS]; the dataset keeps the
    model and its config files, and refuses them changed."""
    processor, _ = references
    texts = [t for t in HARD_TEXTS if t.strip()] * 3
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = prepare_dataset(
        tmp_path / "ds",
        [str(tmp_path / "docs.jsonl")],
        tokenizer_path=str(release),
        eval_fraction=0.0,
        workers=1,
        progress=False,
    )
    manifest = shards.read_manifest(out)
    assert manifest["tokenizer_kind"] == "sentencepiece" and manifest["vocab_size"] == PIECES + 8
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in out.iterdir()
    }
    records = shards.ShardedDocuments(out, manifest, "train")
    got = sorted(records[i].tolist() for i in range(len(records)))
    assert got == sorted([1, *processor.encode(t), 2] for t in texts)
    assert (
        dataset_tokenizer(out).fingerprint
        == load_tokenizer(release).fingerprint
        == manifest["tokenizer_sha256"]
    )
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "changed"}))
    with pytest.raises(shards.DatasetError, match="does not match the tokenizer_sha256"):
        dataset_tokenizer(out)


def test_files_that_are_not_what_they_claim(release, tmp_path):
    """One error naming the file: a tokenizer.model that is not SentencePiece, an added token on a piece's id,
    added_tokens.json disagreeing with tokenizer_config.json, add_bos_token false."""
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    (bad / "tokenizer.model").write_bytes(b'{"not": "sentencepiece"}')
    with pytest.raises(TokenizerError, match=f"{bad / 'tokenizer.model'} is not a SentencePiece model"):
        load_tokenizer(bad)
    shutil.copyfile(release / "tokenizer.model", bad / "tokenizer.model")
    config = json.loads((release / "tokenizer_config.json").read_text())
    moved = {**config["added_tokens_decoder"], "5": {"content": "<|im_end|>", "special": True}}
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": moved}))
    with pytest.raises(TokenizerError, match="added token '<\\|im_end\\|>' has id 5, which .* gives to"):
        load_tokenizer(bad / "tokenizer.model")
    shutil.copyfile(release / "tokenizer_config.json", bad / "tokenizer_config.json")
    (bad / "added_tokens.json").write_text(json.dumps({"<|im_end|>": PIECES + 3}))
    with pytest.raises(TokenizerError, match="added_tokens.json gives '<\\|im_end\\|>' the id 403"):
        load_tokenizer(bad)
    (bad / "added_tokens.json").unlink()
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    with pytest.raises(TokenizerError, match="add_bos_token False is not supported"):
        load_tokenizer(bad)


def test_offsets_mark_characters_for_the_loss_mask(release):
    """encode_with_offsets spans characters, not bytes: a byte-fallback character's pieces start inside it."""
    tokenizer = load_tokenizer(release)
    text = "é😀 ok 你好"
    encoded = tokenizer.encode_with_offsets([text])[0]
    assert encoded.ids == tokenizer.encode_ids(text)
    starts = np.array([start for start, _ in encoded.offsets])
    assert starts.min() >= 0 and starts.max() < len(text) and np.all(np.diff(starts) >= 0)
    assert max(end for _, end in encoded.offsets) == len(text)
