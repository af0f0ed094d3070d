"""EAGLE decoding's entry: a draft head run read for its target (checked to be its), and generation with it,
drafting a chain (mct.infer.eagle) or an EAGLE-2 tree (mct.infer.eagle_tree) over an FR-Spec subset.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.errors import UserError
from mct.infer import decoding
from mct.infer.decoding import DecodeWeights, Sampling
from mct.infer.eagle import Head, _prefill, _round, head_model
from mct.infer.eagle_tree import TreeShape, _tree_round
from mct.infer.loop import Bound, Strategy, Timings, TokenCallback, decode
from mct.infer.speculative import SpeculativeStats
from mct.model.eagle import EagleParams, head_config
from mct.run.reader import RunCheckpoint


def eagle_strategy(
    target: DecodeWeights,
    head_params: dict,
    vocab_ids: jnp.ndarray,
    sampling: Sampling,
    num_draft: int,
    tree: TreeShape | None,
    tokens: np.ndarray,
    lengths: np.ndarray,
    capacity: int,
) -> Strategy:
    """EAGLE decoding of right-padded prompts tokens [batch, P] (lengths [batch]) over the vocab_ids [V']
    columns of the target's head: num_draft chained drafts, or a `tree`, verified in one target pass."""
    cfg = target.model.cfg
    tokens, capacity = decoding.bucketed(cfg, tokens, capacity)
    models = Head(head_model(cfg), target.model)
    cols = target.head[:, vocab_ids]  # [d_model, V']: FR-Spec's cut LM head
    caches = lambda: (
        decoding.init_cache(cfg, len(lengths), capacity),
        decoding.init_cache(head_config(cfg), len(lengths), capacity),
    )
    prefill = lambda key: _prefill(
        models, sampling, target.params, target.head, head_params, cols, tokens, lengths, *caches(), key
    )
    step = (
        Bound(_round, (models, sampling, num_draft))
        if tree is None
        else Bound(_tree_round, (models, sampling, tree))
    )
    return Strategy(prefill, step, (target.params, target.head, head_params, cols, vocab_ids))


def subset_ids(vocab_size: int, draft_vocab: np.ndarray | None) -> jnp.ndarray:
    """The FR-Spec ids the head keeps ([V'] int32; all when None); ValueError when outside the vocabulary."""
    ids = (
        jnp.arange(vocab_size, dtype=jnp.int32)
        if draft_vocab is None
        else jnp.asarray(draft_vocab, jnp.int32)
    )
    if ids.size == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft_vocab ids must lie in [0, {vocab_size})")
    return ids


def eagle_generate(
    cfg: ModelConfig,
    params: dict,
    head_params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_draft: int = 4,
    tree: TreeShape | None = None,
    draft_vocab: np.ndarray | None = None,
    sampling: Sampling = decoding.GREEDY,
    eos_id: int | None = None,
    seed: int = 0,
    on_tokens: TokenCallback | None = None,
    timings: Timings | None = None,
    quant: str = "none",
) -> tuple[list[list[int]], SpeculativeStats]:
    """decoding.generate's output distribution (its exact tokens when greedy), drafted by the EAGLE head
    (head_params, for the target cfg / params) over its draft_vocab columns (FR-Spec; None: all): num_draft
    chained drafts per target pass, or an EAGLE-2 `tree` (sampling: the whole tree, unpruned)."""
    if num_draft < 1:
        raise ValueError(f"num_draft must be at least 1, got {num_draft}")
    if tree is not None:
        tree.check()
        full = tree.top_k + (tree.depth - 1) * tree.top_k**2
        if sampling.temperature != 0 and tree.total_tokens != full:
            raise ValueError(
                f"sampling verifies the whole drafted tree (pruning by the drafts' values would bias it): "
                f"tree total_tokens must be top_k + (depth - 1) * top_k^2 = {full}, got {tree.total_tokens}"
            )
    vocab_ids = subset_ids(cfg.vocab_size, draft_vocab)
    target = decoding.decode_weights(cfg, params, quant)
    tokens, lengths = decoding.pad_prompts(prompts)
    room = num_draft if tree is None else max(tree.total_tokens, (tree.depth - 1) * tree.top_k) + tree.depth
    capacity = tokens.shape[1] + max_new_tokens + 2 * room + 2
    strategy = eagle_strategy(
        target, head_params, vocab_ids, sampling, num_draft, tree, tokens, lengths, capacity
    )
    rule = decoding.eos_rule(len(prompts), max_new_tokens, eos_id)
    out, state = decode(strategy, rule, jax.random.key(seed), on_tokens, timings=timings)
    return out.tokens, SpeculativeStats.of(state.tally)


def read_head(draft_workdir: str, target: RunCheckpoint) -> dict:
    """The head params of a mct.eagle run for `target`; UserError naming both workdirs when it was trained
    for another target (model shape, vocabulary or tokenizer)."""
    try:
        draft = RunCheckpoint(draft_workdir)
    except (OSError, ValueError) as e:
        raise UserError(f"--draft_workdir {draft_workdir}: {e}") from None
    ours, theirs = draft.model_cfg, target.model_cfg
    keys = ("d_model", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "d_mlp")
    differ = [
        f"{k} {getattr(ours, k)} vs {getattr(theirs, k)}"
        for k in keys
        if getattr(ours, k) != getattr(theirs, k)
    ]
    if not differ and draft.tokenizer_sha256 and target.tokenizer_sha256:
        if not draft.tokenizer_sha256 & target.tokenizer_sha256:
            differ.append("tokenizer hash")
    if differ:
        raise UserError(
            f"--draft_workdir {draft_workdir} is a draft head for another target than {target.workdir} "
            f"({', '.join(differ)})"
        )
    return draft.checkpoint.read_params(EagleParams(ours).abstract())
