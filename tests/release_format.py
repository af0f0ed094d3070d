"""A tokenizer in the layout of OpenBMB's MiniCPM4 releases, built in the test: a SentencePiece BPE with byte
fallback (`<unk>` 0, `<s>` 1, `</s>` 2) trained with `sentencepiece`'s own trainer on embedded text, then the
release's 8 added tokens right after its pieces, described by tokenizer_config.json as the release does
(LlamaTokenizer, legacy, BOS added, ChatML template without BOS)."""

import io
import json
import pathlib

import sentencepiece

ADDED_TOKENS = (
    "<|im_end|>",
    "<|im_start|>",
    "<|tool_call|>",
    "<|execute_start|>",
    "<|execute_end|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
)
RELEASE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HARD_TEXTS = (
    "Hello world, the river model.",
    "你好，世界！机器学习模型。",
    "emoji 😀🎉 and ZWJ 👩‍💻",
    "tabs\tinside\t\tand  runs   of    spaces",
    "lines\n\nwith\r\nbreaks\n",
    "  leading and trailing  ",
    "control \x07 bell \x1b esc",
    "mixed 中文 text with digits 12345 and 3.14159",
)


def training_texts() -> list[str]:
    """Embedded text with code, prose, CJK and emoji, so the model has merges for each."""
    words = "the of and to in is was for on that with river model token data shard train loss state batch"
    prose = [" ".join(words.split()[i:] + words.split()[:i]) for i in range(20)]
    code = [pathlib.Path(__file__).read_text(encoding="utf-8")]
    cjk = ["机器学习是人工智能的一个分支。", "今天天气很好，我们去公园散步吧。", "模型训练需要大量的数据。"]
    return prose + code + cjk * 3 + ["emoji 😀🎉 party 🎂"] * 3


def write_release_tokenizer(
    directory: pathlib.Path, pieces: int = 400, texts: list[str] | None = None
) -> dict[str, int]:
    """Writes tokenizer.model, tokenizer_config.json and special_tokens_map.json into `directory` as the
    MiniCPM4 release lays them out, the model trained on `texts` (default training_texts()); returns the added
    tokens' ids (they follow the model's `pieces`)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts or training_texts()),
        model_writer=model,
        model_type="bpe",
        vocab_size=pieces,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        max_sentence_length=1 << 20,
        num_threads=1,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    added = {token: pieces + i for i, token in enumerate(ADDED_TOKENS)}
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, **added}
    decoder = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, i in specials.items()
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDED_TOKENS),
        "bos_token": "<s>",
        "chat_template": RELEASE_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return added
