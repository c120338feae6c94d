"""Model surgery: physically build a smaller model from kept or merged structured units.

Structured compression (parameter clustering, arXiv 2606.11836; L0 hard-concrete head
pruning, arXiv 2306.01385; structured magnitude pruning) ends with a model whose blocks have
fewer attention heads, narrower heads, or a narrower feed-forward network (FFN). This module
turns such a decision into a real, smaller `Wav2Vec2CTC`: the per-block sizes go into the
config (`ModelConfig.layer_num_heads`, `layer_intermediate_sizes`, and `layer_qk_head_dims` /
`layer_v_head_dims` when head widths differ), so the result saves, loads and evaluates like
any other model (`spg.save` / `spg.load`).

The units (heads with their q/k/v/out slices, FFN neurons with their fc1/fc2 slices) and the
weight containers `AttentionWeights` / `FeedForwardWeights` are those of
`spg.compress.interface`, and the rebuilding itself is `Wav2Vec2CTC.rebuild` (the model's side
of that interface, keyed by module name). This module is the block-indexed view of the same
operations that wav2vec2 code and tests find natural: block i's attention and FFN.

API, from general to specific (every function returns a NEW model and leaves its argument
untouched; the new model is on the same device, in the same dtype and train/eval mode, and
carries a copy of `model.compression`; see `rebuild`):

  * `block_weights(model, block)` -> `BlockWeights`: copies of one block's unit weights.
    `AttentionWeights.keep_heads / keep_head_dims` and `FeedForwardWeights.keep_units` select
    units from them; callers that merge units (clustering) build the weights themselves.
  * `rebuild(model, {block: BlockWeights})`: the smaller model with those weights installed.
  * `keep_heads(model, {block: heads})`, `keep_ffn_units(model, {block: neurons})`,
    `keep_head_dims(model, {block: (qk_dims, v_dims)})`, and `keep_units(...)` for heads and
    neurons in one rebuild.

Only torch, `spg.compress.interface` and `spg.wav2vec2.model` are imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from spg.compress.interface import AttentionWeights, FeedForwardWeights
from spg.wav2vec2.model import Wav2Vec2CTC

__all__ = [
    "AttentionWeights", "FeedForwardWeights", "BlockWeights", "block_weights", "rebuild",
    "keep_heads", "keep_ffn_units", "keep_head_dims", "keep_units",
]


@dataclass
class BlockWeights:
    """New weights for one transformer block; None keeps that part of the block as it is."""

    attention: Optional[AttentionWeights] = None
    feed_forward: Optional[FeedForwardWeights] = None


def _check_block(model: Wav2Vec2CTC, block: int) -> int:
    block = int(block)
    if not 0 <= block < model.config.num_hidden_layers:
        raise ValueError(f"block {block} does not exist (the model has {model.config.num_hidden_layers} blocks)")
    return block


def _attention(block: int) -> str:
    return f"encoder.layers.{block}.attention"


def _feed_forward(block: int) -> str:
    return f"encoder.layers.{block}.feed_forward"


@torch.no_grad()
def block_weights(model: Wav2Vec2CTC, block: int) -> BlockWeights:
    """Copies (detached clones) of the attention and FFN weights of one block."""
    block = _check_block(model, block)
    units = {u.name: u for u in model.structured_units()}
    return BlockWeights(attention=units[_attention(block)].weights(),
                        feed_forward=units[_feed_forward(block)].weights())


@torch.no_grad()
def rebuild(model: Wav2Vec2CTC, new_block_weights: Mapping[int, BlockWeights]) -> Wav2Vec2CTC:
    """Return a new model in which the given blocks have the given attention / FFN weights
    (`Wav2Vec2CTC.rebuild`, which says what the new config holds and what is copied).

    `new_block_weights` maps a block index to `BlockWeights`; its sizes (number of heads,
    per-head query/key and value widths, number of FFN neurons) may be anything, zero
    included. Parts given as None and blocks not in the mapping are copied unchanged."""
    weights = {}
    for block, new in new_block_weights.items():
        block = _check_block(model, block)
        if new.attention is not None:
            weights[_attention(block)] = new.attention
        if new.feed_forward is not None:
            weights[_feed_forward(block)] = new.feed_forward
    return model.rebuild(weights)


def keep_units(model: Wav2Vec2CTC, *, heads: Optional[Mapping[int, Sequence[int]]] = None,
               ffn_units: Optional[Mapping[int, Sequence[int]]] = None) -> Wav2Vec2CTC:
    """New model that keeps, in each listed block, only the given whole heads and/or FFN
    neurons (original indices; order does not matter). Unlisted blocks are unchanged."""
    heads = dict(heads or {})
    ffn_units = dict(ffn_units or {})
    updates = {}
    for block in set(heads) | set(ffn_units):
        current = block_weights(model, block)
        updates[block] = BlockWeights(
            attention=current.attention.keep_heads(heads[block]) if block in heads else None,
            feed_forward=current.feed_forward.keep_units(ffn_units[block]) if block in ffn_units else None)
    return rebuild(model, updates)


def keep_heads(model: Wav2Vec2CTC, heads: Mapping[int, Sequence[int]]) -> Wav2Vec2CTC:
    """New model keeping only `heads[block]` in each listed block (e.g. {0: [1, 3], 2: []})."""
    return keep_units(model, heads=heads)


def keep_ffn_units(model: Wav2Vec2CTC, units: Mapping[int, Sequence[int]]) -> Wav2Vec2CTC:
    """New model keeping only the FFN neurons `units[block]` in each listed block."""
    return keep_units(model, ffn_units=units)


def keep_head_dims(model: Wav2Vec2CTC,
                   dims: Mapping[int, tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]]) -> Wav2Vec2CTC:
    """Fine-grained head pruning: `dims[block] = (qk_dims, v_dims)`, one list of kept
    within-head dims per head (see `AttentionWeights.keep_head_dims`, which also says what
    happens to heads left with no dims). This is our reading of the per-head query/key and
    value gates of arXiv 2306.01385, whose exact scheme is not public."""
    updates = {block: BlockWeights(attention=block_weights(model, block).attention.keep_head_dims(qk, v))
               for block, (qk, v) in dims.items()}
    return rebuild(model, updates)
