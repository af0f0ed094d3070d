"""Data configuration: sequence length, the weighted mixture of prepared datasets, sharding and packing knobs.

A mixture component is MixtureComponent(path, weight, min_tokens, max_tokens). `path` is a prepared dataset
directory or "default" (the embedded default corpus); `weight` is its relative share of the mixture's tokens;
`min_tokens`/`max_tokens` keep only documents with min_tokens <= length <= max_tokens (max 0 = no limit; the
length counts BOS and EOS). Stage mixtures (pre-training, annealing, long context) are mixture dicts.
"""

import dataclasses

# Long-context buckets as fractions of the maximum length: 0-4K, 4-12K, 12-24K, 24-32K at 32K.
_LONG_CONTEXT_EDGES = (0.0, 1 / 8, 3 / 8, 3 / 4, 1.0)


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
    """One dataset in a mixture, optionally restricted to a document-length range."""

    path: str = "default"
    weight: float = 1.0
    min_tokens: int = 0
    max_tokens: int = 0


def _default_mixture() -> dict[str, MixtureComponent]:
    return {"default": MixtureComponent("default")}


@dataclasses.dataclass(frozen=True)
class ChatDataConfig:
    """SFT conversations (mct/posttrain/chat_data.py): JSONL files of {"messages": [{"role", "content"}, ...]} or
    "default" (generated offline), each prepared once into a masked dataset and mixed by `weights` (() = equal)."""

    path: tuple[str, ...] = ("default",)
    weights: tuple[float, ...] = ()
    eval_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the loader reads and how it cuts, mixes, packs and shards it."""

    seq_len: int = 4096
    mixture: dict[str, MixtureComponent] = dataclasses.field(default_factory=_default_mixture)
    seed: int = 0
    # Data is split into this many logical shards, each packed and positioned on its own (elastic resume);
    # global batch rows read fixed shards (batch_layout), so batches do not depend on the process count. Must
    # be a multiple of the process count and divide or be a multiple of the global train.batch_size: 8 fits
    # batches of 8, 16, ... on 1, 2, 4 or 8 processes; raise it for more hosts.
    num_logical_shards: int = 8
    packing_bins: int = 32  # first-fit packing bins per logical shard: more bins, less padding, more memory
    cache_dir: str = ""  # "" -> $MCT_CACHE or ~/.cache/mct; holds the prepared default corpus
    vocab_size: int = 8192  # only for training the default corpus tokenizer
    eval_batches: int = 8
    num_epochs: int = 0  # 0 = repeat forever (training); n = stop after n passes over every component
    prefetch: int = 2  # host batches prepared ahead on a background thread (0 = on the training thread)
    # Resuming with a mixture that lacks a component of the checkpoint's (or sets its weight to 0) is an error
    # unless this is set; changed weights and added components always continue (see loader.make_train_iterator).
    allow_component_removal: bool = False
    chat: ChatDataConfig = ChatDataConfig()  # SFT only: replaces the mixture (mct/posttrain/sft.py)


def long_context_mixture(path: str, max_tokens: int, weight: float = 1.0) -> dict[str, MixtureComponent]:
    """Length buckets of one dataset at equal weights: 0-4K, 4-12K, 12-24K, 24-32K tokens when max_tokens is
    32K, scaled proportionally for other maxima (tiny configs). Components: long{i}_{min}_{max}.
    """
    edges = [round(f * max_tokens) for f in _LONG_CONTEXT_EDGES]
    if len(set(edges)) != len(edges):
        raise ValueError(f"long_context_mixture: max_tokens {max_tokens} is too small for four buckets")
    mixture = {}
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        min_tokens = low + 1 if low else 0
        mixture[f"long{i}_{min_tokens}_{high}"] = MixtureComponent(path, weight / 4, min_tokens, high)
    return mixture
