"""Model surgery: physically build a smaller model from kept or merged structured units.

Structured compression (parameter clustering, arXiv 2606.11836; L0 hard-concrete head
pruning, arXiv 2306.01385; structured magnitude pruning) ends with a model whose blocks have
fewer attention heads, narrower heads, or a narrower feed-forward network (FFN). This module
turns such a decision into a real, smaller `Wav2Vec2CTC`: the per-block sizes go into the
config (`ModelConfig.layer_num_heads`, `layer_intermediate_sizes`, and `layer_qk_head_dims` /
`layer_v_head_dims` when head widths differ), so the result saves, loads and evaluates like
any other model (`spg.save` / `spg.load`).

The units of one block, in the packed layout of `spg.wav2vec2.model.Attention` (head 0's dims, then
head 1's, ...):

  * attention head h: its query/key dims (rows of W_q and W_k, and their biases; shared by q
    and k because q·k sums over them), its value dims (rows of W_v and its bias, and the
    same-numbered columns of W_out);
  * FFN neuron n: row n of W_fc1 (and bias n) and column n of W_fc2.

The out_proj and fc2 biases are not part of any unit and are always kept, so a block with
zero heads (or zero FFN neurons) is valid: its attention (or FFN) output is that bias alone.

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

Only torch and `spg.wav2vec2.model` are imported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC

__all__ = [
    "AttentionWeights", "FeedForwardWeights", "BlockWeights", "block_weights", "rebuild",
    "keep_heads", "keep_ffn_units", "keep_head_dims", "keep_units",
]


def _offsets(widths: Sequence[int]) -> list[int]:
    """Start of every head's dims in the packed layout: [0, w0, w0 + w1, ...]."""
    starts = [0]
    for width in widths:
        starts.append(starts[-1] + width)
    return starts


def _check_unique_sorted_in_range(indices: Sequence[int], size: int, what: str) -> list[int]:
    indices = [int(i) for i in indices]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what}: duplicate indices {indices}")
    for i in indices:
        if not 0 <= i < size:
            raise ValueError(f"{what}: index {i} is out of range 0..{size - 1}")
    return sorted(indices)


@dataclass
class AttentionWeights:
    """The weights of one block's self-attention, heads packed along the head dimension.

    Shapes, with D the hidden size, Q = sum(qk_head_dims), V = sum(v_head_dims):
    q_weight, k_weight (Q, D); q_bias, k_bias (Q,); v_weight (V, D); v_bias (V,);
    out_weight (D, V); out_bias (D,). `out_bias` belongs to no head and is always kept."""

    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    v_weight: torch.Tensor
    v_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    qk_head_dims: list[int]
    v_head_dims: list[int]

    @property
    def num_heads(self) -> int:
        return len(self.qk_head_dims)

    def validate(self, hidden_size: int) -> None:
        """Raise ValueError unless the shapes agree with each other and with the head widths."""
        if len(self.qk_head_dims) != len(self.v_head_dims):
            raise ValueError(f"{len(self.qk_head_dims)} query/key head widths but {len(self.v_head_dims)} value widths")
        if any(w < 0 for w in self.qk_head_dims + self.v_head_dims):
            raise ValueError("head widths must be >= 0")
        q, v, d = sum(self.qk_head_dims), sum(self.v_head_dims), hidden_size
        expected = {"q_weight": (q, d), "q_bias": (q,), "k_weight": (q, d), "k_bias": (q,),
                    "v_weight": (v, d), "v_bias": (v,), "out_weight": (d, v), "out_bias": (d,)}
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"attention {name} has shape {actual}, expected {shape}")

    def keep_head_dims(self, qk_dims: Sequence[Sequence[int]], v_dims: Sequence[Sequence[int]]) -> "AttentionWeights":
        """Keep, for every head h, the query/key dims `qk_dims[h]` (rows of W_q and W_k and
        their biases) and the value dims `v_dims[h]` (rows of W_v and its bias, columns of
        W_out); indices are within the head (0 <= j < width of head h).

        A head left with no value dims contributes nothing to the output and is removed
        altogether. A head left with no query/key dims but some value dims is kept: its
        scores are all 0, so it averages the values uniformly (exactly what the masked full
        head computes)."""
        if len(qk_dims) != self.num_heads or len(v_dims) != self.num_heads:
            raise ValueError(f"need one list of kept dims per head ({self.num_heads} heads), got "
                             f"{len(qk_dims)} (query/key) and {len(v_dims)} (value)")
        qk_dims = [_check_unique_sorted_in_range(d, w, f"head {h} query/key dims")
                   for h, (d, w) in enumerate(zip(qk_dims, self.qk_head_dims))]
        v_dims = [_check_unique_sorted_in_range(d, w, f"head {h} value dims")
                  for h, (d, w) in enumerate(zip(v_dims, self.v_head_dims))]
        alive = [h for h in range(self.num_heads) if v_dims[h]]
        qk_dims = [qk_dims[h] for h in alive]
        v_dims = [v_dims[h] for h in alive]
        # Packed positions (rows of W_q/W_k, rows of W_v = columns of W_out) of the kept dims.
        qk_starts, v_starts = _offsets(self.qk_head_dims), _offsets(self.v_head_dims)
        device = self.q_weight.device
        qk_rows = torch.tensor([qk_starts[h] + j for h, dims in zip(alive, qk_dims) for j in dims],
                               dtype=torch.long, device=device)
        v_rows = torch.tensor([v_starts[h] + j for h, dims in zip(alive, v_dims) for j in dims],
                              dtype=torch.long, device=device)
        return AttentionWeights(
            q_weight=self.q_weight.index_select(0, qk_rows), q_bias=self.q_bias.index_select(0, qk_rows),
            k_weight=self.k_weight.index_select(0, qk_rows), k_bias=self.k_bias.index_select(0, qk_rows),
            v_weight=self.v_weight.index_select(0, v_rows), v_bias=self.v_bias.index_select(0, v_rows),
            out_weight=self.out_weight.index_select(1, v_rows), out_bias=self.out_bias.clone(),
            qk_head_dims=[len(d) for d in qk_dims], v_head_dims=[len(d) for d in v_dims])

    def keep_heads(self, heads: Sequence[int]) -> "AttentionWeights":
        """Keep whole heads (in increasing index order); all others are removed."""
        heads = set(_check_unique_sorted_in_range(heads, self.num_heads, "heads"))
        return self.keep_head_dims(
            [list(range(w)) if h in heads else [] for h, w in enumerate(self.qk_head_dims)],
            [list(range(w)) if h in heads else [] for h, w in enumerate(self.v_head_dims)])


@dataclass
class FeedForwardWeights:
    """The weights of one block's FFN: fc1_weight (F, D), fc1_bias (F,), fc2_weight (D, F),
    fc2_bias (D,) with F the number of neurons. `fc2_bias` belongs to no neuron and is kept."""

    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor

    @property
    def num_units(self) -> int:
        return self.fc1_weight.shape[0]

    def validate(self, hidden_size: int) -> None:
        f, d = self.num_units, hidden_size
        expected = {"fc1_weight": (f, d), "fc1_bias": (f,), "fc2_weight": (d, f), "fc2_bias": (d,)}
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"feed-forward {name} has shape {actual}, expected {shape}")

    def keep_units(self, units: Sequence[int]) -> "FeedForwardWeights":
        """Keep the given neurons (in increasing index order)."""
        units = _check_unique_sorted_in_range(units, self.num_units, "FFN neurons")
        rows = torch.tensor(units, dtype=torch.long, device=self.fc1_weight.device)
        return FeedForwardWeights(fc1_weight=self.fc1_weight.index_select(0, rows),
                                  fc1_bias=self.fc1_bias.index_select(0, rows),
                                  fc2_weight=self.fc2_weight.index_select(1, rows),
                                  fc2_bias=self.fc2_bias.clone())


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


@torch.no_grad()
def block_weights(model: Wav2Vec2CTC, block: int) -> BlockWeights:
    """Copies (detached clones) of the attention and FFN weights of one block."""
    layer = model.encoder.layers[_check_block(model, block)]
    attention, ffn = layer.attention, layer.feed_forward
    return BlockWeights(
        attention=AttentionWeights(
            q_weight=attention.q_proj.weight.detach().clone(), q_bias=attention.q_proj.bias.detach().clone(),
            k_weight=attention.k_proj.weight.detach().clone(), k_bias=attention.k_proj.bias.detach().clone(),
            v_weight=attention.v_proj.weight.detach().clone(), v_bias=attention.v_proj.bias.detach().clone(),
            out_weight=attention.out_proj.weight.detach().clone(),
            out_bias=attention.out_proj.bias.detach().clone(),
            qk_head_dims=list(attention.qk_head_dims), v_head_dims=list(attention.v_head_dims)),
        feed_forward=FeedForwardWeights(
            fc1_weight=ffn.intermediate_dense.weight.detach().clone(),
            fc1_bias=ffn.intermediate_dense.bias.detach().clone(),
            fc2_weight=ffn.output_dense.weight.detach().clone(),
            fc2_bias=ffn.output_dense.bias.detach().clone()))


def _config_with_block_sizes(config: ModelConfig, qk_dims: list[list[int]], v_dims: list[list[int]],
                             ffn_sizes: list[int]) -> ModelConfig:
    """A copy of `config` describing the given per-block head widths and FFN sizes.

    `layer_num_heads` and `layer_intermediate_sizes` are always written (one entry per block).
    `layer_qk_head_dims` / `layer_v_head_dims` are written only when some head is not of the
    original width `config.head_dim`, so whole-head pruning keeps the simpler config. The
    attention scale stays 1/sqrt(config.head_dim) because `num_attention_heads` is unchanged."""
    new = copy.deepcopy(config)
    new.layer_num_heads = [len(dims) for dims in qk_dims]
    new.layer_intermediate_sizes = list(ffn_sizes)
    full = config.head_dim
    if all(d == full for dims in qk_dims + v_dims for d in dims):
        new.layer_qk_head_dims = new.layer_v_head_dims = None
    else:
        new.layer_qk_head_dims = [list(dims) for dims in qk_dims]
        new.layer_v_head_dims = [list(dims) for dims in v_dims]
    new.validate()
    return new


@torch.no_grad()
def rebuild(model: Wav2Vec2CTC, new_block_weights: Mapping[int, BlockWeights]) -> Wav2Vec2CTC:
    """Return a new model in which the given blocks have the given attention / FFN weights.

    `new_block_weights` maps a block index to `BlockWeights`; its sizes (number of heads,
    per-head query/key and value widths, number of FFN neurons) may be anything, zero
    included, and become that block's sizes in the new config. Parts given as None, blocks
    not in the mapping, and everything outside the six prunable matrices and their biases
    (feature extractor, projections, layer norms, positional conv, CTC head) are copied
    unchanged. The argument model is not modified.

    The new model has the old model's device and floating-point dtype (those of its CTC
    head), vocabulary, train/eval mode and a deep copy of `model.compression` (callers add
    their own record to it)."""
    config = model.config
    hidden = config.hidden_size
    updates: dict[int, BlockWeights] = {}
    for block, weights in new_block_weights.items():
        block = _check_block(model, block)
        if weights.attention is not None:
            weights.attention.validate(hidden)
        if weights.feed_forward is not None:
            weights.feed_forward.validate(hidden)
        updates[block] = weights

    qk_dims, v_dims, ffn_sizes = [], [], []
    for block, layer in enumerate(model.encoder.layers):
        weights = updates.get(block, BlockWeights())
        attention = weights.attention
        qk_dims.append(list(attention.qk_head_dims if attention else layer.attention.qk_head_dims))
        v_dims.append(list(attention.v_head_dims if attention else layer.attention.v_head_dims))
        ffn = weights.feed_forward
        ffn_sizes.append(ffn.num_units if ffn else layer.feed_forward.intermediate_dense.out_features)
    new_config = _config_with_block_sizes(config, qk_dims, v_dims, ffn_sizes)

    state = model.state_dict()
    for block, weights in updates.items():
        prefix = f"encoder.layers.{block}."
        if weights.attention is not None:
            a = weights.attention
            for name, tensor in [("q_proj.weight", a.q_weight), ("q_proj.bias", a.q_bias),
                                 ("k_proj.weight", a.k_weight), ("k_proj.bias", a.k_bias),
                                 ("v_proj.weight", a.v_weight), ("v_proj.bias", a.v_bias),
                                 ("out_proj.weight", a.out_weight), ("out_proj.bias", a.out_bias)]:
                key = prefix + "attention." + name
                state[key] = tensor.detach().to(dtype=state[key].dtype, device=state[key].device)
        if weights.feed_forward is not None:
            f = weights.feed_forward
            for name, tensor in [("intermediate_dense.weight", f.fc1_weight), ("intermediate_dense.bias", f.fc1_bias),
                                 ("output_dense.weight", f.fc2_weight), ("output_dense.bias", f.fc2_bias)]:
                key = prefix + "feed_forward." + name
                state[key] = tensor.detach().to(dtype=state[key].dtype, device=state[key].device)

    new_model = Wav2Vec2CTC(new_config, model.vocab)
    # Match device and dtype first (load_state_dict copies values, it keeps the target's dtype).
    reference = model.lm_head.weight
    new_model.to(device=reference.device, dtype=reference.dtype)
    new_model.load_state_dict(state, strict=True)
    new_model.compression = copy.deepcopy(model.compression)
    new_model.train(model.training)
    return new_model


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
