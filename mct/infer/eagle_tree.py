"""EAGLE-2 dynamic draft trees (Li et al. 2024, EAGLE-2 section 4): the head expands, for `depth` steps, the
`top_k` nodes of the frontier with the highest cumulative draft log-probability, each into its top_k
children; the best `total_tokens` of all drafted nodes (a tree: a child never scores above its parent) are
verified in one target pass with tree attention (mct.model.tree_attention); the longest path the target agrees
with is accepted, and only its cache entries are kept: they move to the slots of their positions.

Greedy decoding walks the tree along the target's argmax, so the output is plain greedy decoding's. The state
and the head's window are mct.infer.eagle's (the window spans depth + 2 positions).

Slots: the target writes x_{N-1} and the T tree nodes at slots N-1 .. N-1+T (a node's RoPE position is
N-1 + its depth); after acceptance the path's entries move to slots N .. N+a-1. The head writes the frontier
of depth j (1-based) at slots N-1 + (j-1) * top_k + (0..top_k-1), RoPE position N-2+j.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mct.infer import decoding
from mct.infer.decoding import Sampling, sample, token_probs
from mct.infer.eagle import EagleState, Head, _put, window_logits
from mct.infer.loop import Proposal
from mct.infer.speculative import tally
from mct.model.attention import KVCache
from mct.model.eagle import draft_logits
from mct.model.rope import rope_tables
from mct.model.tree_attention import masked_cached_attend, tree_extend


class TreeShape(NamedTuple):
    """EAGLE-2's tree settings: children per expanded node and nodes expanded per depth, depth, nodes kept."""

    top_k: int
    depth: int
    total_tokens: int

    def check(self) -> None:
        """ValueError unless the tree can hold total_tokens nodes."""
        most = self.top_k + (self.depth - 1) * self.top_k**2
        if min(self) < 1 or self.total_tokens > most:
            raise ValueError(f"tree top_k, depth >= 1 and 1 <= total_tokens <= {most}, got {tuple(self)}")


class Tree(NamedTuple):
    """The drafted tree per row, nodes in depth order (a parent before its children)."""

    tokens: jnp.ndarray  # [batch, T] int32
    parents: jnp.ndarray  # [batch, T] int32: the parent's index in the tree, -1 under the root (x_{N-1})
    depth: jnp.ndarray  # [batch, T] int32 >= 1


def _slot_mask(base: jnp.ndarray, capacity: int) -> jnp.ndarray:
    """[batch, capacity] bool: slots below base [batch]."""
    return jnp.arange(capacity)[None, :] < base[:, None]


def _onehot(slots: jnp.ndarray, capacity: int) -> jnp.ndarray:
    """slots [...] -> [..., capacity] bool (a negative slot: none)."""
    return (slots[..., None] == jnp.arange(capacity)) & (slots[..., None] >= 0)


def _head_tree_pass(
    models: Head, target_params, head_params, cols, features, tokens, position, start, mask, cache
):
    """The head on frontier nodes: features [batch, K, d], tokens [batch, K] at RoPE position [batch], cached
    at slots start + (0..K-1), seeing mask [batch, K, capacity] -> (logits [batch, K, V'], features, cache)."""
    target, _ = decoding.bind(models.target, target_params)
    head = models.head.bind(head_params)
    cfg = head.cfg
    positions = jnp.broadcast_to(position[:, None], tokens.shape)
    rope = rope_tables(cfg.rope, cfg.head_dim, cache.k.shape[2], cfg.max_position)
    layer_cache = jax.tree.map(lambda c: c[0], cache)
    attention = lambda q, k, v: masked_cached_attend(q, k, v, start, mask, layer_cache)
    predicted, layer_cache = head.features(features, target.embed_tokens(tokens), positions, rope, attention)
    logits = draft_logits(target, predicted, cols)
    return logits, predicted, jax.tree.map(lambda c: c[None], layer_cache)


class Expanded(NamedTuple):
    """What sampling's verification needs of the drafting: the draft distribution of every expanded node."""

    ids: jnp.ndarray  # [batch, (depth-1) * top_k] node ids of the expanded nodes below the root, depth order
    q: jnp.ndarray  # [batch, 1 + (depth-1) * top_k, V'] their draft probabilities, the root's first


def _children(logits, sampling: Sampling, k: int, key) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Each node's k children from its draft logits [..., V']: (log-probabilities [..., k], subset indices
    [..., k], draft probabilities [..., V']). Greedy: the top k. Sampling: k draws without replacement from q
    (Gumbel top-k), in draw order, as recursive rejection sampling needs (Jeon et al. 2024, section 3)."""
    q = token_probs(logits, sampling)
    if sampling.temperature == 0:
        score, index = jax.lax.top_k(jax.nn.log_softmax(logits, -1), k)
        return score, index, q
    log_q = jnp.log(q)
    _, index = jax.lax.top_k(log_q + jax.random.gumbel(key, q.shape), k)
    return jnp.take_along_axis(log_q, index, axis=-1), index, q


def draft_tree(
    models: Head,
    sampling: Sampling,
    shape: TreeShape,
    target_params,
    head_params,
    cols,
    vocab_ids,
    state: EagleState,
    key,
) -> tuple[Tree, Expanded, KVCache]:
    """EAGLE-2's dynamic tree of every row (see the module docstring), its expanded nodes, the head's cache."""
    k, n = shape.top_k, state.n
    batch = n.shape[0]
    keys = jax.random.split(key, shape.depth)
    logits, feature, cache = window_logits(models, shape.depth + 2, target_params, head_params, cols, state)
    capacity = cache.k.shape[2]
    score, index, q = _children(logits, sampling, k, keys[0])  # [batch, K]
    tokens, scores, parents = [vocab_ids[index]], [score], [jnp.full((batch, k), -1, jnp.int32)]
    ids = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, k))  # frontier node ids
    frontier = (vocab_ids[index], score, ids, jnp.repeat(feature, k, axis=1))
    seen = jnp.zeros((batch, k, capacity), bool)  # each frontier node's ancestors' head slots
    expanded, qs = [], [q[:, None]]
    for j in range(1, shape.depth):
        token, score, ids, features = frontier
        start = n - 1 + (j - 1) * k
        own = _onehot(start[:, None] + jnp.arange(k), capacity)  # [batch, K, capacity]
        mask = _slot_mask(n - 1, capacity)[:, None, :] | seen | own
        logits, predicted, cache = _head_tree_pass(
            models, target_params, head_params, cols, features, token, n - 2 + j, start, mask, cache
        )
        child_score, child, q = _children(logits, sampling, k, keys[j])  # [batch, K, K]
        expanded.append(ids)
        qs.append(q)
        child_score = (score[:, :, None] + child_score).reshape(batch, k * k)
        offset = k + (j - 1) * k * k  # the id of this depth's first child
        tokens.append(vocab_ids[child].reshape(batch, k * k))
        scores.append(child_score)
        parents.append(jnp.repeat(ids, k, axis=1))
        best, pick = jax.lax.top_k(child_score, k)  # the next frontier: indices into the K*K children
        parent = pick // k
        take = lambda x, i=parent: jnp.take_along_axis(x, i.reshape(i.shape + (1,) * (x.ndim - 2)), axis=1)
        frontier = (
            jnp.take_along_axis(tokens[-1], pick, axis=1),
            best,
            offset + pick.astype(jnp.int32),
            take(predicted),
        )
        seen = take(seen | own)
    tokens, scores, parents = (jnp.concatenate(x, axis=1) for x in (tokens, scores, parents))
    _, keep = jax.lax.top_k(scores, shape.total_tokens)  # ties: the lower id, so parents before children
    keep = jnp.sort(keep, axis=1)  # [batch, T] depth order
    rows = jnp.arange(batch)[:, None]
    where = jnp.full(scores.shape, -1, jnp.int32).at[rows, keep].set(jnp.arange(shape.total_tokens))
    kept_parents = jnp.take_along_axis(parents, keep, axis=1)
    tree_parents = jnp.where(
        kept_parents < 0, -1, jnp.take_along_axis(where, jnp.maximum(kept_parents, 0), 1)
    )
    depth = _depths(tree_parents, shape.depth)
    tree = Tree(jnp.take_along_axis(tokens, keep, axis=1), tree_parents, depth)
    ids = jnp.concatenate(expanded, axis=1) if expanded else jnp.zeros((batch, 0), jnp.int32)
    return tree, Expanded(ids, jnp.concatenate(qs, axis=1)), cache


def ancestors(parents: jnp.ndarray, depth: int) -> jnp.ndarray:
    """[batch, T, T] bool: node j is node i or an ancestor of it, from parents [batch, T] (-1: the root)."""
    t = parents.shape[1]
    node = jnp.broadcast_to(jnp.arange(t), parents.shape)
    seen = _onehot(node, t)
    for _ in range(depth - 1):
        node = jnp.where(node >= 0, jnp.take_along_axis(parents, jnp.maximum(node, 0), axis=1), -1)
        seen = seen | _onehot(node, t)
    return seen


def _depths(parents: jnp.ndarray, depth: int) -> jnp.ndarray:
    """Each node's depth [batch, T] (children of the root: 1)."""
    return ancestors(parents, depth).sum(-1).astype(jnp.int32)


def verify_tree(models: Head, target_params, target_head, tree: Tree, depth: int, pending, n, cache: KVCache):
    """The target over [x_{N-1}, tree] in one pass: (logits [batch, 1+T, vocab], residual [batch, 1+T, d],
    cache with the block at slots N-1 .. N-1+T)."""
    batch, t = tree.tokens.shape
    capacity = cache.k.shape[2]
    within = ancestors(tree.parents, depth)  # [batch, T, T]
    block_mask = jnp.zeros((batch, 1 + t, capacity), bool)
    block_mask = block_mask | _slot_mask(n, capacity)[:, None, :]  # the prefix and x_{N-1}
    tree_slots = jnp.zeros((batch, t, capacity), bool).at[:, :, :t].set(within)
    shift = jax.vmap(lambda m, s: jnp.roll(m, s, axis=-1))(tree_slots, n)  # node j's slot is N + j
    block_mask = block_mask.at[:, 1:].set(block_mask[:, 1:] | shift)
    tokens = jnp.concatenate([pending, tree.tokens], axis=1)
    positions = n[:, None] - 1 + jnp.concatenate([jnp.zeros_like(pending), tree.depth], axis=1)
    m, layers = decoding.bind(models.target, target_params)
    hidden, cache, residual = tree_extend(m, tokens, positions, n - 1, block_mask, cache, layers)
    return jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), target_head), residual, cache


def greedy_walk(logits: jnp.ndarray, tree: Tree, depth: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The longest path the target's argmax follows: (path [batch, depth] block indices (1 + tree index; 0 past
    its end), n_accepted [batch], the target's token after it [batch])."""
    batch = logits.shape[0]
    want = jnp.argmax(logits, axis=-1)  # [batch, 1+T]
    cur = jnp.zeros(batch, jnp.int32)  # block index: 0 is x_{N-1}
    alive = jnp.ones(batch, bool)
    path = []
    for _ in range(depth):
        target_token = jnp.take_along_axis(want, cur[:, None], axis=1)
        match = (tree.parents + 1 == cur[:, None]) & (tree.tokens == target_token)  # [batch, T]
        alive = alive & match.any(axis=1)
        cur = jnp.where(alive, jnp.argmax(match, axis=1).astype(jnp.int32) + 1, cur)
        path.append(jnp.where(alive, cur, 0))
    path = jnp.stack(path, axis=1)
    n_accepted = (path > 0).sum(axis=1).astype(jnp.int32)
    return path, n_accepted, jnp.take_along_axis(want, cur[:, None], axis=1)[:, 0].astype(jnp.int32)


def _renormalise(x: jnp.ndarray) -> jnp.ndarray:
    """x [batch, vocab] >= 0 scaled to sum 1 (rows summing to 0 stay 0)."""
    total = x.sum(-1, keepdims=True)
    return jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), 0.0)


def sampling_walk(
    probs: jnp.ndarray, tree: Tree, expanded: Expanded, vocab_ids, shape: TreeShape, key
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Recursive rejection sampling down the full (unpruned) tree: at a node, its children in draw order are
    each kept with probability min(1, p(c) / q(c)); after a rejection p <- norm(max(0, p - q)) and q loses c
    (renormalised). A kept child continues the walk; otherwise the next token is drawn from p. probs: the
    target's [batch, 1+T, vocab]. Returns greedy_walk's (path, n_accepted, following)."""
    batch, vocab = probs.shape[0], probs.shape[-1]
    k = shape.top_k
    rows = jnp.arange(batch)
    q_full = jnp.zeros(expanded.q.shape[:2] + (vocab,), jnp.float32).at[:, :, vocab_ids].set(expanded.q)
    keys = jax.random.split(key, shape.depth * k + 1)
    cur = jnp.zeros(batch, jnp.int32)  # block index
    node = jnp.zeros(batch, jnp.int32)  # expanded index: 0 the root, -1 a node never expanded
    alive = jnp.ones(batch, bool)
    p = probs[:, 0]
    path = []
    for d in range(shape.depth):
        q = q_full[rows, jnp.maximum(node, 0)]
        depth_of = (node - 1) // k + 1  # the expanded node's depth (root: 0)
        first = jnp.where(node == 0, 0, k + (depth_of - 1) * k * k + ((node - 1) % k) * k)
        open_ = alive & (node >= 0)
        chosen = jnp.full(batch, -1, jnp.int32)
        for i in range(k):
            child = jnp.minimum(first + i, tree.tokens.shape[1] - 1)
            token = tree.tokens[rows, child]
            q_c, p_c = q[rows, token], p[rows, token]
            tried = open_ & (chosen < 0) & (q_c > 0)
            kept = tried & (jax.random.uniform(keys[d * k + i], (batch,)) * q_c < p_c)
            chosen = jnp.where(kept, child, chosen)
            rejected = (tried & ~kept)[:, None]
            p = jnp.where(rejected, _renormalise(jnp.maximum(p - q, 0.0)), p)
            q = jnp.where(rejected, _renormalise(q.at[rows, token].set(0.0)), q)
        moved = chosen >= 0
        alive = alive & moved
        cur = jnp.where(moved, chosen + 1, cur)
        path.append(jnp.where(moved, cur, 0))
        match = expanded.ids == chosen[:, None]  # [batch, (depth-1) * K]
        node = jnp.where(moved, jnp.where(match.any(1), jnp.argmax(match, 1) + 1, -1), node)
        p = jnp.where(moved[:, None], probs[rows, cur], p)
    path = jnp.stack(path, axis=1)
    following = sample(p, keys[-1])
    return path, (path > 0).sum(axis=1).astype(jnp.int32), following


def keep_path(cache: KVCache, path: jnp.ndarray, n: jnp.ndarray) -> KVCache:
    """The cache with the accepted path's entries (block indices path [batch, depth], 0 past the end: at
    slots N-1+path) moved to slots N .. N+depth-1; entries past the path are left where they are."""
    capacity = cache.k.shape[2]
    rows = jnp.arange(path.shape[0])[:, None]
    source = n[:, None] - 1 + path
    dest = jnp.where(path > 0, n[:, None] + jnp.arange(path.shape[1]), capacity)  # capacity: dropped
    move = lambda c: c.at[:, rows, dest].set(c[:, rows, source], mode="drop")
    return KVCache(move(cache.k), move(cache.v), cache.k_sums)


def _tree_round(
    models, sampling, shape, target_params, target_head, head_params, cols, vocab_ids, state, active, key
):
    """One EAGLE-2 round: up to depth + 1 committed tokens per row; the new state."""
    key_draft, key_accept = jax.random.split(key)
    tree, expanded, draft_cache = draft_tree(
        models, sampling, shape, target_params, head_params, cols, vocab_ids, state, key_draft
    )
    n = state.n
    pending = jnp.take_along_axis(state.tokens, (n - 1)[:, None], axis=1)
    logits, residual, target_cache = verify_tree(
        models, target_params, target_head, tree, shape.depth, pending, n, state.target_cache
    )
    if sampling.temperature == 0:
        path, n_accepted, following = greedy_walk(logits, tree, shape.depth)
    else:
        probs = token_probs(logits, sampling)
        path, n_accepted, following = sampling_walk(probs, tree, expanded, vocab_ids, shape, key_accept)
    target_cache = keep_path(target_cache, path, n)
    block = jnp.concatenate([pending, tree.tokens], axis=1)
    path_tokens = jnp.take_along_axis(block, path, axis=1)  # [batch, depth]
    j = jnp.arange(shape.depth + 1)
    candidates = jnp.where(
        j < n_accepted[:, None], jnp.pad(path_tokens, ((0, 0), (0, 1))), following[:, None]
    )
    proposal = Proposal(candidates, n_accepted + 1)
    on_path = jnp.concatenate([jnp.zeros_like(path[:, :1]), path], axis=1)  # x_{N-1}, then the path
    features = _put(state.features, jnp.take_along_axis(residual, on_path[..., None], axis=1), n - 1)
    tokens = _put(state.tokens, candidates, n)
    n = jnp.where(active, n + proposal.counts, n)
    return proposal, EagleState(
        target_cache, draft_cache, tokens, features, n, tally(state.tally, active, proposal)
    )
