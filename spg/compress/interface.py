"""What a compression method plugs into: the training loop and the model it compresses.

The one module that the method modules (`self_pinching`, `magnitude`, `hardconcrete`, `l0`,
`clustering`) share with the models and the loop (`spg.training`); it imports only torch, so
a method module copied out of spg needs this file and nothing else.

1. **What every method needs** (all an unstructured method such as SPG uses):
     * `Method`: the training loop's hooks, which a method overrides;
     * `OptimizerSettings`: the optimiser settings `Method.parameter_groups` may read;
     * `PrunableModel`: what a model offers, first of all `prunable_linears()`, every weight
       matrix the unstructured methods prune, by name.
   (`spg.wav2vec2.model.Wav2Vec2CTC`, `spg.whisper.model.Whisper` and `spg.whisper.ctc.WhisperCTC`
   implement `PrunableModel`.)

2. **Structured units**, for the methods that remove heads and neurons (L0, clustering,
   structured magnitude):
     * `structured_units()`: every attention module (`AttentionUnits`: its q/k/v/out
       projections and the per-head widths, so head h is a known slice of each) and every
       feed-forward network (`FeedForwardUnits`: fc1/fc2, one unit per hidden neuron), each
       with a stable name, its stack and role ("encoder.self_attn", "decoder.cross_attn",
       "encoder.ffn", ...), its layer index, and the report group its per-layer sizes are
       listed under;
     * `rebuild({name: AttentionWeights | FeedForwardWeights})`: a NEW model whose listed
       modules hold the given weights, at whatever sizes they have (fewer heads, narrower
       heads where the family allows it, fewer FFN neurons); everything else is copied.

   The units, in the packed layout both families use (head 0's dims, then head 1's, ...):
     * attention head h: its query/key dims (rows of W_q and W_k and their biases; shared by
       q and k because q·k sums over them), its value dims (rows of W_v and its bias, and the
       same-numbered columns of W_out);
     * FFN neuron n: row n of W_fc1 (and bias n) and column n of W_fc2.
   The out_proj and fc2 biases belong to no unit and are always kept, so a module with zero
   heads (or neurons) is valid: its output is that bias alone.

3. `keep_units` and `keep_head_dims`: a model keeping chosen heads / head dims / neurons,
   built on `structured_units()` and `rebuild()`.

4. `DistillableModel`, for L0's optional layer-to-layer distillation: the encoder blocks
   whose outputs are compared and the frame count of each input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, Sequence, Union

import torch
from torch import nn

__all__ = ["Method", "OptimizerSettings", "PrunableModel", "AttentionWeights", "FeedForwardWeights",
           "AttentionUnits", "FeedForwardUnits", "StructuredUnits", "ModuleWeights", "head_slices", "keep_units",
           "keep_head_dims", "DistillableModel"]


# ========================================================================================
# 1. What every method needs: the training loop's hooks and the prunable model
# ========================================================================================

class OptimizerSettings(Protocol):
    """The optimiser settings a method may read (`spg.training.TrainConfig` has them)."""
    lr: float
    weight_decay: float


class Method:
    """Plain fine-tuning, no compression. Compression methods subclass this.

    The loop calls, in order: `attach` once (before a resumed checkpoint is loaded, so that
    gates/masks exist and their state is restored into them), `parameter_groups` once, then
    per step `before_step` -> forward -> `extra_loss` -> backward/optimiser step ->
    `after_step`, and `finish` once when the last step is done (not when a run stops early
    to be resumed). A parameter group may carry "clip_grad": False to be left out of the
    gradient-norm clipping."""

    name = "dense"

    def attach(self, model: nn.Module) -> None:
        """Prepare `model` before training (add gates, prune and fix masks, ...)."""

    def parameter_groups(self, model: nn.Module, config: OptimizerSettings) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [{"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def before_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called before the forward pass of step `step` (0-based), e.g. to set a temperature."""

    def extra_loss(self, model: nn.Module, step: int, total_steps: int) -> Optional[torch.Tensor]:
        return None

    def after_step(self, model: nn.Module, step: int, total_steps: int,
                   optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Called after every optimiser step (`step` = steps done); returns figures for the
        progress bar. `optimizer` is the loop's, for methods that must touch its state."""
        return {}

    def finish(self, model: nn.Module) -> None:
        """Called once after the last step: turn the trained model into the deliverable."""

    def trainable_modules(self) -> list[nn.Module]:
        """Trainable modules the method keeps outside the model (e.g. L0 gates applied by hooks).
        Data-parallel training wraps them with the model so DDP broadcasts and averages them too."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PrunableModel(Protocol):
    """What a model family offers the compression methods. The unstructured methods (SPG,
    UMP, GMP, mixed) use only `prunable_linears()` and `compression`; the structured ones (L0,
    clustering, structured magnitude) also `structured_units()` and `rebuild()`, whose types
    are section 2's."""

    compression: dict           # free-form record of how the model was compressed (saved with it)

    def prunable_linears(self) -> list[tuple[str, nn.Linear]]:
        """Every prunable weight matrix as (name, module), layer by layer."""

    def num_parameters(self, nonzero_only: bool = False) -> int:
        """Number of parameters (or of non-zero ones)."""

    def structured_units(self) -> list[StructuredUnits]:
        """Every attention module and FFN, layer by layer (within a layer: attention
        modules first, then the FFN)."""

    def rebuild(self, weights: Mapping[str, ModuleWeights]) -> "PrunableModel":
        """A new model whose modules named in `weights` hold those weights at their sizes
        (heads, per-head widths, neurons; zero included); all else copied, the argument
        untouched; same device, dtype, train/eval mode and a copy of `compression`."""


# ========================================================================================
# 2. Structured units: attention heads and FFN neurons
# ========================================================================================

def head_slices(widths: Sequence[int]) -> list[slice]:
    """The slice of every head in the packed layout: [0:w0], [w0:w0 + w1], ..."""
    slices, start = [], 0
    for width in widths:
        slices.append(slice(start, start + int(width)))
        start += int(width)
    return slices


def _check_unique_sorted_in_range(indices: Sequence[int], size: int, what: str) -> list[int]:
    indices = [int(i) for i in indices]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what}: duplicate indices {indices} (kept units must be distinct)")
    for i in indices:
        if not 0 <= i < size:
            raise ValueError(f"{what}: index {i} is out of range 0..{size - 1}")
    return sorted(indices)


@dataclass
class AttentionWeights:
    """The weights of one attention module, heads packed along the head dimension.

    Shapes, with D the hidden size, Q = sum(qk_head_dims), V = sum(v_head_dims):
    q_weight, k_weight (Q, D); q_bias, k_bias (Q,); v_weight (V, D); v_bias (V,);
    out_weight (D, V); out_bias (D,). `k_bias` is None for models whose k_proj has no bias
    (Whisper). `out_bias` belongs to no head and is always kept."""

    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: Optional[torch.Tensor]
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
            tensor = getattr(self, name)
            if tensor is None and name == "k_bias":
                continue
            actual = tuple(tensor.shape)
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
        qk_starts = [s.start for s in head_slices(self.qk_head_dims)]
        v_starts = [s.start for s in head_slices(self.v_head_dims)]
        device = self.q_weight.device
        qk_rows = torch.tensor([qk_starts[h] + j for h, dims in zip(alive, qk_dims) for j in dims],
                               dtype=torch.long, device=device)
        v_rows = torch.tensor([v_starts[h] + j for h, dims in zip(alive, v_dims) for j in dims],
                              dtype=torch.long, device=device)
        return AttentionWeights(
            q_weight=self.q_weight.index_select(0, qk_rows), q_bias=self.q_bias.index_select(0, qk_rows),
            k_weight=self.k_weight.index_select(0, qk_rows),
            k_bias=None if self.k_bias is None else self.k_bias.index_select(0, qk_rows),
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
    """The weights of one FFN: fc1_weight (F, D), fc1_bias (F,), fc2_weight (D, F),
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


def _copy(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().clone()


@dataclass(frozen=True, eq=False)
class AttentionUnits:
    """One multi-head attention module of a model, as prunable units (its heads).

    name: stable identifier, the module's path, e.g. "encoder.layers.0.attention" (wav2vec2)
        or "decoder.layers.1.encoder_attn" (Whisper);
    stack, role: where it sits and what it attends to: stack "encoder" or "decoder", role
        "self_attn" or "cross_attn" (`kind` = "encoder.self_attn", ...);
    group: the report entry its per-layer head counts are listed under ("heads" for
        wav2vec2, "decoder_cross_heads", ... for Whisper);
    layer: the layer's index within its stack;
    q_proj, k_proj, v_proj, out_proj: the live projections (the model's own modules);
    qk_head_dims, v_head_dims: per head, its query/key and value widths: head h is the
        rows `qk_slices()[h]` of W_q, W_k (and their biases), the rows `v_slices()[h]` of
        W_v (and its bias) and the same columns of W_out;
    head_dim: the width of an unpruned head (the attention scale is 1/sqrt(head_dim));
    head_dims_prunable: whether `rebuild` accepts heads of other widths than head_dim
        (wav2vec2: yes; Whisper: whole heads only)."""

    name: str
    stack: str
    role: str
    group: str
    layer: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear
    qk_head_dims: tuple[int, ...]
    v_head_dims: tuple[int, ...]
    head_dim: int
    head_dims_prunable: bool

    @property
    def kind(self) -> str:
        return f"{self.stack}.{self.role}"

    @property
    def num_heads(self) -> int:
        return len(self.qk_head_dims)

    @property
    def hidden_size(self) -> int:
        return self.q_proj.in_features

    def qk_slices(self) -> list[slice]:
        return head_slices(self.qk_head_dims)

    def v_slices(self) -> list[slice]:
        return head_slices(self.v_head_dims)

    def linears(self) -> list[nn.Linear]:
        return [self.q_proj, self.k_proj, self.v_proj, self.out_proj]

    @torch.no_grad()
    def weights(self) -> AttentionWeights:
        """Copies (detached clones) of the module's weights."""
        return AttentionWeights(
            q_weight=_copy(self.q_proj.weight), q_bias=_copy(self.q_proj.bias),
            k_weight=_copy(self.k_proj.weight), k_bias=_copy(self.k_proj.bias),
            v_weight=_copy(self.v_proj.weight), v_bias=_copy(self.v_proj.bias),
            out_weight=_copy(self.out_proj.weight), out_bias=_copy(self.out_proj.bias),
            qk_head_dims=list(self.qk_head_dims), v_head_dims=list(self.v_head_dims))


@dataclass(frozen=True, eq=False)
class FeedForwardUnits:
    """One position-wise feed-forward network, as prunable units (its hidden neurons).

    name: stable identifier, e.g. "encoder.layers.0.feed_forward" (wav2vec2) or
        "decoder.layers.2.ffn" (Whisper, whose fc1/fc2 sit on the layer);
    stack, role ("ffn"), group ("ffn_units", "encoder_ffn_units", ...), layer: as in
        `AttentionUnits`;
    fc1, fc2: the live Linear layers; neuron n is row n of fc1 (and its bias) and column n
        of fc2."""

    name: str
    stack: str
    role: str
    group: str
    layer: int
    fc1: nn.Linear
    fc2: nn.Linear

    @property
    def kind(self) -> str:
        return f"{self.stack}.{self.role}"

    @property
    def num_units(self) -> int:
        return self.fc1.out_features

    @property
    def hidden_size(self) -> int:
        return self.fc1.in_features

    def linears(self) -> list[nn.Linear]:
        return [self.fc1, self.fc2]

    @torch.no_grad()
    def weights(self) -> FeedForwardWeights:
        """Copies (detached clones) of the module's weights."""
        return FeedForwardWeights(fc1_weight=_copy(self.fc1.weight), fc1_bias=_copy(self.fc1.bias),
                                  fc2_weight=_copy(self.fc2.weight), fc2_bias=_copy(self.fc2.bias))


StructuredUnits = Union[AttentionUnits, FeedForwardUnits]
ModuleWeights = Union[AttentionWeights, FeedForwardWeights]


# ========================================================================================
# 3. Keeping chosen units of a model
# ========================================================================================

def _units_named(model: PrunableModel, names) -> dict[str, StructuredUnits]:
    units = {u.name: u for u in model.structured_units()}
    for name in names:
        if name not in units:
            raise ValueError(f"no module {name!r}; the model's modules are {sorted(units)}")
    return units


def keep_units(model: PrunableModel, keep: Mapping[str, Sequence[int]]) -> PrunableModel:
    """New model keeping, in each listed module, only the given whole heads / FFN neurons
    (original indices, any order; an empty list removes them all, leaving only the output
    bias). E.g. {"decoder.layers.1.encoder_attn": [0, 3], "encoder.layers.0.ffn": range(100)}."""
    units = _units_named(model, keep)
    weights: dict[str, ModuleWeights] = {}
    for name, indices in keep.items():
        module = units[name]
        current = module.weights()
        indices = list(indices)
        weights[name] = (current.keep_heads(indices) if isinstance(module, AttentionUnits)
                         else current.keep_units(indices))
    return model.rebuild(weights)


def keep_head_dims(model: PrunableModel,
                   dims: Mapping[str, tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]]) -> PrunableModel:
    """Fine-grained head pruning: `dims[name] = (qk_dims, v_dims)`, one list of kept
    within-head dims per head of that attention module (`AttentionWeights.keep_head_dims`)."""
    units = _units_named(model, dims)
    weights = {name: units[name].weights().keep_head_dims(qk, v) for name, (qk, v) in dims.items()}
    return model.rebuild(weights)


# ========================================================================================
# 4. Distillation: the blocks whose outputs a student and its teacher compare
# ========================================================================================

class DistillableModel(Protocol):
    """A model whose encoder blocks' outputs a distillation loss can compare
    (`spg.compress.l0`'s layer-to-layer distillation)."""

    def encoder_blocks(self) -> Sequence[nn.Module]:
        """The encoder's blocks in order; each one's forward returns its output (B, T, C)."""
        ...

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """The number of valid output frames (B,) of inputs of `lengths` samples (B,)."""
        ...
