"""L0 hard-concrete gates for fine-grained structured pruning (arXiv 2306.01385).

Every prunable unit gets a stochastic gate z ∈ [0, 1] from the hard concrete distribution
(Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
Regularization", arXiv 1712.01312), with the constants CoFi (Xia et al. 2022, arXiv
2204.00408) and DPHuBERT (Peng et al. 2023, arXiv 2305.17651) use: one learnable log_alpha
per unit, temperature β = 2/3, stretch interval (l, r) = (−0.1, 1.1):

    training sample   u ~ U(ε, 1 − ε),  s = sigmoid((log u − log(1 − u) + log_alpha) / β),
                      z = clamp(s·(r − l) + l, 0, 1)
    P(z ≠ 0)          = sigmoid(log_alpha − β·log(−l/r))      (closed form, differentiable)
    expected L0       = Σ_units P(z ≠ 0)

The stretch makes z exactly 0 or exactly 1 with non-zero probability, so a sampled network
really drops units, while P(z ≠ 0) gives a smooth expected count to penalise.

Units (our reading of the paper's "fine-grained" head pruning; the paper's exact scheme is
not public). In every attention module and FFN of the model (`structured_units()` of
`spg.compress.interface`; a gate group is one attention module with the FFN that follows it
in its layer, see `gate_groups`):

  * attention heads h                 — gate z_h;
  * within head h, query/key dims d   — gate z_{h,d}, shared by row d of W_q and of W_k
    (q·k sums over d, so one gate removes a dim from both);
  * within head h, value dims e       — gate z_{h,e}, shared by row e of W_v and column e
    of W_out (the head's output dim e);
    (the two dim gates only where the model accepts heads of other widths,
    `AttentionUnits.head_dims_prunable`: wav2vec2 yes, Whisper no: its heads are whole);
  * FFN neurons n                     — gate z_n, shared by row n of W_fc1 and column n of W_fc2.

How the gates act in the forward pass (`apply_gates`, forward hooks, removable):
    q  ← q ⊙ m_q        with m_q[h,d] = z_{h,d}          (q_proj output; masking q alone
                                                           removes the dim from q·k)
    ctx ← ctx ⊙ m_v     with m_v[h,e] = z_h · z_{h,e}    (out_proj input = per-head context)
    a  ← a ⊙ m_f        with m_f[n]   = z_n              (fc2 input = activations after GELU)
Every mask multiplies a linear map's input or output, so a deterministic (eval) mask folds
exactly into the weights: m_q into the rows and bias of W_q, m_v into the columns of W_out,
m_f into the columns of W_fc2 (GELU is not homogeneous, so the FFN mask must be folded on
its output side). `spg.compress.l0.finalize` does that fold and then removes the zeroed
units physically with the model's `rebuild`.

Evaluation mask (DPHuBERT's `HardConcrete.forward` in eval mode, from FLOP, Wang et al.
2020): per gate group keep the round(expected L0) units with the largest log_alpha, with the
soft value sigmoid(0.8·log_alpha/β) (an approximation of E[z] that DPHuBERT calls
"empirically validated"); the other units get 0. Groups: the heads of a block, the q/k dims
of one head, the value dims of one head, the FFN neurons of a block.

STE variant (`ste=True`, ours as to the details): the training forward uses the binary mask
b = [z > 0] and the gradient of the relaxed z (b + z − stop_grad(z)). We binarise at z > 0,
not at 0.5, because P(z > 0) is exactly the probability the L0 penalty counts: the binary
network seen in training has, in expectation, exactly the parameter count the penalty sees.
Its evaluation mask is the same top-k selection with value 1 (binary), so nothing soft is
folded and training, evaluation and the deployed model all use 0/1 masks.

Parameter count (`L0Gates.expected_num_parameters`; see `BlockGates.count`). Counted are
the prunable Linear layers of every attention module and FFN with ALL their parameters: W_q,
W_k, W_v, W_out, W_fc1, W_fc2 and the biases b_q, b_k, b_v, b_out, b_fc1, b_fc2. With D the
hidden size:

    head h, per kept q/k dim:   2·(D + 1)   (row of W_q + b_q entry, row of W_k + b_k entry;
                                             2·D + 1 where k_proj has no bias, as in Whisper)
    head h, per kept value dim: 2·D + 1     (row of W_v + b_v entry, column of W_out)
    FFN, per kept neuron:       2·D + 1     (row of W_fc1 + b_fc1 entry, column of W_fc2)
    always kept:                D per module (b_out and b_fc2 belong to no unit)

The model's `rebuild` (via `AttentionWeights.keep_head_dims`) removes a head that keeps no
value dim altogether, its q/k dims included (it can add nothing to the output). So with p(·) = P(gate ≠ 0) and independent gates:

    E[#params of head h] = p(z_h) · [ Σ_d p(z_{h,d}) · 2(D + 1) · (1 − Π_e (1 − p(z_{h,e})))
                                      + Σ_e p(z_{h,e}) · (2D + 1) ]
    E[#params of the FFN] = Σ_n p(z_n) · (2D + 1)

This is the exact expectation of the physically pruned count of a sampled network, and
with 0/1 gates it IS that count (tests/test_hardconcrete.py checks it against the rebuilt model).
Expected sparsity ŝ = 1 − E[#params] / #params of the dense prunable layers.

Only torch and `spg.compress.interface` are imported, so this file can be copied with that one
(the gates find a model's heads and neurons through its `structured_units()`). Folding the masks and removing the pruned
units (`finalize`) and the training-loop plug-in (Lagrangian schedule, optional
distillation, `L0Method`) are `spg.compress.l0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spg.compress.interface import AttentionUnits, FeedForwardUnits, StructuredUnits


__all__ = [
    "BETA", "LIMIT_L", "LIMIT_R", "InitDropRates", "HardConcrete", "BlockMasks", "BlockGates", "L0Gates",
    "GateHooks", "apply_gates", "gate_groups", "lagrangian", "reverse_gradient", "target_at",
]

BETA = 2.0 / 3.0                 # temperature (Louizos et al.; CoFi; DPHuBERT)
LIMIT_L, LIMIT_R = -0.1, 1.1     # stretch interval (l, r)
EPS = 1e-6                       # u ~ U(EPS, 1 − EPS) keeps log u and log(1 − u) finite (DPHuBERT)
INIT_STD = 0.01                  # log_alpha ~ N(log((1 − p)/p), 0.01²) (DPHuBERT), breaks top-k ties
EVAL_SHARPNESS = 0.8             # DPHuBERT's eval value sigmoid(0.8 · log_alpha / β)
# P(z ≠ 0) = sigmoid(log_alpha − L0_SHIFT); β·log(−l/r) = (2/3)·log(1/11) ≈ −1.599.
L0_SHIFT = BETA * math.log(-LIMIT_L / LIMIT_R)


@dataclass(frozen=True)
class InitDropRates:
    """Initial drop rate p per gate type; log_alpha starts at log((1 − p)/p).

    heads 0.01: DPHuBERT's value for heads (and for conv channels and whole layers).
    q/k and value dims 0.01: not specified by the paper; we use the head value because a dim
        gate is a finer head gate, and p = 0.01 starts every gate almost surely at 1, so the
        pruned network starts as the fine-tuned one.
    FFN neurons 0.01: DPHuBERT uses 0.5 (log_alpha = 0, E[z] ≈ 0.5), which halves every FFN
        output at step 0; it distils from the teacher anyway. We start from a fine-tuned CTC
        model and train with CTC (distillation optional), so we keep the network intact at
        the start and let the Lagrangian remove neurons.
    """

    heads: float = 0.01
    qk_dims: float = 0.01
    v_dims: float = 0.01
    ffn: float = 0.01


def _segment_sum(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[s] = Σ_{i: index[i] = s} values[i] (differentiable)."""
    return values.new_zeros(num_segments).index_add(0, index, values)


def _segment_index(sizes: Sequence[int]) -> torch.Tensor:
    """[0]*sizes[0] + [1]*sizes[1] + ...: the group of every packed unit."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes), dtype=torch.long))


# ========================================================================================
# One set of hard-concrete gates
# ========================================================================================

class HardConcrete(nn.Module):
    """Hard-concrete gates over `sum(group_sizes)` units, packed group after group.

    Groups matter only for the deterministic (evaluation) mask, whose top-k selection runs
    per group (DPHuBERT has one `HardConcrete` module per group). In training mode `forward`
    samples z; in eval mode it returns the deterministic mask (binary when `ste`)."""

    def __init__(self, group_sizes: Sequence[int], init_drop_rate: float, *,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not 0.0 < init_drop_rate < 1.0:
            raise ValueError(f"init_drop_rate must be in (0, 1), got {init_drop_rate}")
        self.group_sizes = [int(n) for n in group_sizes]
        mean = math.log(1.0 - init_drop_rate) - math.log(init_drop_rate)
        log_alpha = torch.randn(sum(self.group_sizes), generator=generator) * INIT_STD + mean
        self.log_alpha = nn.Parameter(log_alpha)
        self.register_buffer("group_index", _segment_index(self.group_sizes), persistent=False)

    @property
    def num_units(self) -> int:
        return self.log_alpha.numel()

    def keep_probability(self) -> torch.Tensor:
        """P(z ≠ 0) per unit = sigmoid(log_alpha − β·log(−l/r)); differentiable."""
        return torch.sigmoid(self.log_alpha - L0_SHIFT)

    def log_drop_probability(self) -> torch.Tensor:
        """log P(z = 0) per unit, computed stably as logsigmoid(−(log_alpha − L0_SHIFT))."""
        return F.logsigmoid(L0_SHIFT - self.log_alpha)

    def expected_l0(self) -> torch.Tensor:
        """E[number of non-zero gates] = Σ P(z ≠ 0)."""
        return self.keep_probability().sum()

    def sample(self) -> torch.Tensor:
        """A relaxed sample z ∈ [0, 1] per unit, differentiable in log_alpha."""
        u = torch.empty_like(self.log_alpha).uniform_(EPS, 1.0 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self, binary: bool = False) -> torch.Tensor:
        """Evaluation mask: in every group, the round(n_g − Σ_g P(z ≠ 0)) units with the
        smallest log_alpha get 0; the others sigmoid(0.8·log_alpha/β) (DPHuBERT), or 1 when
        `binary`. Ties are broken by position (stable sort)."""
        keep = torch.ones_like(self.log_alpha, dtype=torch.bool)
        sizes = self.group_sizes
        expected_kept = _segment_sum(self.keep_probability(), self.group_index, len(sizes))
        num_drop = torch.round(torch.tensor(sizes, dtype=expected_kept.dtype, device=keep.device)
                               - expected_kept).long().clamp(min=0)
        if sizes and min(sizes) > 0 and len(set(sizes)) == 1:     # all groups equal: one batched sort
            groups, width = len(sizes), sizes[0]
            order = torch.sort(self.log_alpha.view(groups, width), dim=1, stable=True).indices
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(width, device=order.device).expand(groups, width))
            keep = (rank >= num_drop[:, None]).reshape(-1)
        else:
            start = 0
            for group, size in enumerate(sizes):
                drop = int(num_drop[group])
                if drop:
                    order = torch.sort(self.log_alpha[start:start + size], stable=True).indices
                    keep[start + order[:drop]] = False
                start += size
        value = torch.ones_like(self.log_alpha) if binary else torch.sigmoid(EVAL_SHARPNESS * self.log_alpha / BETA)
        return value * keep

    def forward(self, ste: bool = False) -> torch.Tensor:
        if not self.training:
            return self.deterministic(binary=ste)
        z = self.sample()
        if not ste:
            return z
        # Straight-through: value [z > 0] exactly (z − sg(z) is exactly 0), gradient of z.
        return (z > 0).to(z.dtype) + (z - z.detach())


# ========================================================================================
# The gates of one transformer block, and of a whole model
# ========================================================================================

def gate_groups(units: Sequence[StructuredUnits]) -> list[tuple[AttentionUnits, Optional[FeedForwardUnits]]]:
    """The model's structured units as gate groups: each attention module with the FFN that
    directly follows it (wav2vec2: one group per block; Whisper's decoder layers: (self-
    attention, None) and (cross-attention, FFN))."""
    groups: list[tuple[AttentionUnits, Optional[FeedForwardUnits]]] = []
    for unit in units:
        if isinstance(unit, AttentionUnits):
            groups.append((unit, None))
        elif groups and groups[-1][1] is None:
            groups[-1] = (groups[-1][0], unit)
        else:
            raise ValueError(f"{unit.name}: an FFN that does not follow an attention module cannot be gated")
    return groups


@dataclass
class BlockMasks:
    """The masks one gate group's forward pass multiplies in, in the packed head layout
    (head 0's dims, then head 1's, ...):

    query (sum qk_head_dims,): on the q_proj output, m_q[h,d] = z_{h,d} (1 without dim gates);
    value (sum v_head_dims,):  on the out_proj input, m_v[h,e] = z_h · z_{h,e};
    ffn (intermediate_size,):  on the fc2 input, m_f[n] = z_n (empty without an FFN).
    """

    query: torch.Tensor
    value: torch.Tensor
    ffn: torch.Tensor


class BlockGates(nn.Module):
    """Head, q/k-dim, value-dim and FFN-neuron gates of one attention module and the FFN
    after it (see the module docstring and `gate_groups`).

    intermediate_size: None when the group has no FFN. head_dims: False for whole heads only
    (no dim gates; `qk_dims` and `v_dims` are then None). key_bias: whether k_proj has a bias
    (it counts in the parameters).

    Ours, not in the papers; we add them because on a small model the head gates can close
    before all others (measurement: README.md, "Why these options" under L0):
    head_gates=False is the dims-only variant: no head gate (`heads` is None, z_h = 1), so a
        head disappears only when all its value dims do (then its q/k dims go with it).
    min_heads=k keeps the k heads with the largest log_alpha always on (z_h = 1 in training
        and evaluation, P(z_h ≠ 0) = 1 in the expected count); which k can change from step
        to step. A protected head can still lose all its value dims."""

    def __init__(self, hidden_size: int, qk_head_dims: Sequence[int], v_head_dims: Sequence[int],
                 intermediate_size: Optional[int], init: InitDropRates = InitDropRates(), *,
                 generator: Optional[torch.Generator] = None, head_dims: bool = True, key_bias: bool = True,
                 head_gates: bool = True, min_heads: int = 0):
        super().__init__()
        if len(qk_head_dims) != len(v_head_dims):
            raise ValueError(f"{len(qk_head_dims)} query/key head widths but {len(v_head_dims)} value widths")
        self.hidden_size = int(hidden_size)
        self.qk_head_dims = [int(d) for d in qk_head_dims]
        self.v_head_dims = [int(d) for d in v_head_dims]
        self.num_heads = len(self.qk_head_dims)
        self.key_bias = bool(key_bias)
        self.has_ffn = intermediate_size is not None
        if min_heads and not head_gates:
            raise ValueError("min_heads needs head gates (head_gates=True)")
        if int(min_heads) < 0:
            raise ValueError(f"min_heads must be >= 0, got {min_heads}")
        self.min_heads = min(int(min_heads), self.num_heads)    # a module with fewer heads keeps them all
        self.heads = HardConcrete([self.num_heads], init.heads, generator=generator) if head_gates else None
        self.qk_dims = HardConcrete(self.qk_head_dims, init.qk_dims, generator=generator) if head_dims else None
        self.v_dims = HardConcrete(self.v_head_dims, init.v_dims, generator=generator) if head_dims else None
        self.ffn = HardConcrete([int(intermediate_size or 0)], init.ffn, generator=generator)
        self.register_buffer("qk_head_index", _segment_index(self.qk_head_dims), persistent=False)
        self.register_buffer("v_head_index", _segment_index(self.v_head_dims), persistent=False)

    @classmethod
    def for_units(cls, attention: AttentionUnits, ffn: Optional[FeedForwardUnits],
                  init: InitDropRates = InitDropRates(), *, generator: Optional[torch.Generator] = None,
                  head_gates: bool = True, min_heads: int = 0) -> "BlockGates":
        return cls(attention.hidden_size, attention.qk_head_dims, attention.v_head_dims,
                   None if ffn is None else ffn.num_units, init, generator=generator,
                   head_dims=attention.head_dims_prunable, key_bias=attention.k_proj.bias is not None,
                   head_gates=head_gates, min_heads=min_heads)

    def _ones(self, index: torch.Tensor) -> torch.Tensor:
        like = self.ffn.log_alpha          # always present (empty without an FFN): dtype and device
        return torch.ones(index.shape, dtype=like.dtype, device=like.device)

    # --- the head gate, with the dims-only and min_heads variants ------------------------
    @torch.no_grad()
    def _protected_heads(self) -> torch.Tensor:
        """(num_heads,) bool: the min_heads heads with the largest log_alpha."""
        protected = torch.zeros(self.num_heads, dtype=torch.bool, device=self.ffn.log_alpha.device)
        if self.heads is not None and self.min_heads:
            protected[torch.topk(self.heads.log_alpha, self.min_heads).indices] = True
        return protected

    def _head_values(self, values: Optional[torch.Tensor]) -> torch.Tensor:
        """Head-gate values (a sample, a mask or keep probabilities) with protected heads at 1."""
        if values is None:
            return torch.ones(self.num_heads, dtype=self.ffn.log_alpha.dtype, device=self.ffn.log_alpha.device)
        if not self.min_heads:
            return values
        return torch.where(self._protected_heads(), torch.ones_like(values), values)

    def head_keep_probability(self) -> torch.Tensor:
        return self._head_values(None if self.heads is None else self.heads.keep_probability())

    @torch.no_grad()
    def head_deterministic(self, binary: bool = False) -> torch.Tensor:
        return self._head_values(None if self.heads is None else self.heads.deterministic(binary))

    # --- masks ---------------------------------------------------------------------
    def _combine(self, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, ffn: torch.Tensor) -> BlockMasks:
        return BlockMasks(query=qk, value=heads[self.v_head_index] * v, ffn=ffn)

    def masks(self, ste: bool = False) -> BlockMasks:
        """Sampled masks in training mode, deterministic ones in eval mode."""
        heads = self._head_values(None if self.heads is None else self.heads(ste))
        if self.qk_dims is None:
            return self._combine(heads, self._ones(self.qk_head_index), self._ones(self.v_head_index), self.ffn(ste))
        return self._combine(heads, self.qk_dims(ste), self.v_dims(ste), self.ffn(ste))

    def _deterministic_dims(self, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qk_dims is None:
            return self._ones(self.qk_head_index), self._ones(self.v_head_index)
        return self.qk_dims.deterministic(binary), self.v_dims.deterministic(binary)

    @torch.no_grad()
    def deterministic_masks(self, binary: bool = False) -> BlockMasks:
        return self._combine(self.head_deterministic(binary), *self._deterministic_dims(binary),
                             self.ffn.deterministic(binary))

    # --- parameter counts ------------------------------------------------------------
    @property
    def always_kept(self) -> int:
        """b_out and (with an FFN) b_fc2: D parameters each, part of no unit."""
        return self.hidden_size * (2 if self.has_ffn else 1)

    def count(self, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, v_head_empty: torch.Tensor,
              ffn: torch.Tensor) -> torch.Tensor:
        """Parameters of this group's prunable Linear layers given per-unit keep values
        (probabilities P(z ≠ 0) for the expectation, 0/1 for a fixed mask) and, per head,
        the probability (or indicator) that the head keeps no value dim. See the module
        docstring for the formula and what is counted."""
        d = self.hidden_size
        qk_per_head = _segment_sum(qk, self.qk_head_index, self.num_heads)
        v_per_head = _segment_sum(v, self.v_head_index, self.num_heads)
        qk_params = qk_per_head * 2 * (d + 1) if self.key_bias else qk_per_head * (2 * d + 1)
        attention = (heads * (qk_params * (1.0 - v_head_empty) + v_per_head * (2 * d + 1))).sum()
        return attention + ffn.sum() * (2 * d + 1) + self.always_kept

    def expected_num_parameters(self) -> torch.Tensor:
        """E[parameters of the group's prunable layers after pruning]; differentiable."""
        if self.v_dims is None:
            v_head_empty = torch.tensor([float(w == 0) for w in self.v_head_dims],
                                        dtype=self.ffn.log_alpha.dtype, device=self.ffn.log_alpha.device)
            return self.count(self.head_keep_probability(), self._ones(self.qk_head_index),
                              self._ones(self.v_head_index), v_head_empty, self.ffn.keep_probability())
        v_head_empty = torch.exp(_segment_sum(self.v_dims.log_drop_probability(), self.v_head_index,
                                              self.num_heads))      # Π_e P(z_{h,e} = 0)
        return self.count(self.head_keep_probability(), self.qk_dims.keep_probability(),
                          self.v_dims.keep_probability(), v_head_empty, self.ffn.keep_probability())

    @torch.no_grad()
    def num_parameters_of(self, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, ffn: torch.Tensor) -> int:
        """Exact count for fixed masks (non-zero = kept), e.g. the deterministic ones."""
        heads, qk, v, ffn = [(x != 0).to(self.ffn.log_alpha.dtype) for x in (heads, qk, v, ffn)]
        v_head_empty = (_segment_sum(v, self.v_head_index, self.num_heads) == 0).to(v.dtype)
        return int(round(self.count(heads, qk, v, v_head_empty, ffn).item()))

    @torch.no_grad()
    def deployed_num_parameters(self, binary: bool = False) -> int:
        """Parameters of the group's layers in the model `spg.compress.l0.finalize` builds from these gates."""
        return self.num_parameters_of(self.head_deterministic(binary), *self._deterministic_dims(binary),
                                      self.ffn.deterministic(binary))

    def full_num_parameters(self) -> int:
        d = self.hidden_size
        qk_unit = 2 * (d + 1) if self.key_bias else 2 * d + 1
        return (sum(self.qk_head_dims) * qk_unit + sum(self.v_head_dims) * (2 * d + 1)
                + self.ffn.num_units * (2 * d + 1) + self.always_kept)


class L0Gates(nn.Module):
    """The gates of every gate group of a model (see `for_model` and `gate_groups`).

    `ste` selects the straight-through variant (binary forward masks, binary evaluation
    masks; see the module docstring). The gates are NOT registered inside the model: the
    model's state_dict and checkpoints stay those of the plain model; `apply_gates`
    connects the two through forward hooks. Train/eval mode follows the model's (set by
    the hooks at every forward). `blocks` holds one `BlockGates` per gate group."""

    def __init__(self, blocks: Sequence[BlockGates], ste: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.ste = bool(ste)

    @classmethod
    def for_model(cls, model: nn.Module, init: InitDropRates = InitDropRates(), *, ste: bool = False,
                  seed: int = 0, head_gates: bool = True, min_heads: int = 0) -> "L0Gates":
        """Gates shaped like `model`'s attention modules and FFNs (`model.structured_units()`:
        any per-module head count, head widths and FFN width), on the model's device.
        `seed` fixes the N(·, 0.01²) init noise; `head_gates`, `min_heads`: see `BlockGates`."""
        generator = torch.Generator().manual_seed(seed)
        blocks = [BlockGates.for_units(attention, ffn, init, generator=generator, head_gates=head_gates,
                                       min_heads=min_heads)
                  for attention, ffn in gate_groups(model.structured_units())]
        return cls(blocks, ste=ste).to(next(model.parameters()).device)

    def masks(self) -> list[BlockMasks]:
        return [block.masks(self.ste) for block in self.blocks]

    @torch.no_grad()
    def deterministic_masks(self) -> list[BlockMasks]:
        """The evaluation masks, which `spg.compress.l0.finalize` folds and prunes (binary when `ste`)."""
        return [block.deterministic_masks(self.ste) for block in self.blocks]

    def expected_num_parameters(self) -> torch.Tensor:
        return sum(block.expected_num_parameters() for block in self.blocks)

    def full_num_parameters(self) -> int:
        return sum(block.full_num_parameters() for block in self.blocks)

    @torch.no_grad()
    def deployed_num_parameters(self) -> int:
        return sum(block.deployed_num_parameters(self.ste) for block in self.blocks)

    def expected_sparsity(self) -> torch.Tensor:
        """ŝ = 1 − E[#params] / #params (the prunable layers of every group); differentiable."""
        return 1.0 - self.expected_num_parameters() / self.full_num_parameters()

    @torch.no_grad()
    def deployed_sparsity(self) -> float:
        return 1.0 - self.deployed_num_parameters() / self.full_num_parameters()

    @torch.no_grad()
    def calibrate(self, target: float, iterations: int = 50) -> float:
        """Add ONE common shift c to every log_alpha, found by bisection, so that the deployed
        sparsity is the smallest one ≥ `target` that a common shift can reach. Returns c.

        Not in the papers: our final correction of the Lagrangian's miss in short runs (as
        `spg.compress.self_pinching.calibrate_thresholds` for SPG), in either direction. A common shift keeps
        the order of the units inside every group, so it moves the per-group keep counts
        round(n_g − Σ P(z ≠ 0)) and units leave (or come back) in log_alpha order; the
        deployed count is non-decreasing in c, so bisection converges. It also moves the soft
        values sigmoid(0.8·log_alpha/β) of kept units (binary masks with `ste` are
        unaffected); the finalized model computes exactly what the shifted gates compute."""
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target}")
        parameters = list(self.parameters())
        original = [p.detach().clone() for p in parameters]

        def sparsity_with(shift: float) -> float:
            for p, p0 in zip(parameters, original):
                p.copy_(p0 + shift)
            return self.deployed_sparsity()

        low, high = -100.0, 100.0       # sparsity_with(low) ≈ 1 ≥ target; sparsity_with(high) ≈ 0
        if sparsity_with(high) >= target:
            low = high
        for _ in range(iterations):     # invariant: sparsity_with(low) >= target
            middle = 0.5 * (low + high)
            if sparsity_with(middle) >= target:
                low = middle
            else:
                high = middle
        sparsity_with(low)
        return low


# ========================================================================================
# Applying the masks to a model (forward hooks)
# ========================================================================================

class GateHooks:
    """Forward hooks that put `gates` into `model`'s forward pass; `remove()` takes them off.

    One pre-hook on the model draws all masks once per forward call (a fresh sample in
    training mode, the deterministic masks in eval mode; the gates follow the model's
    mode); per gate group, a hook multiplies the q_proj output by m_q (only with dim gates),
    and pre-hooks multiply the out_proj input by m_v and the fc2 input by m_f. A training
    forward must therefore run through `model(...)`, so that every step draws a fresh
    sample. Code that runs parts of the model in eval mode (Whisper's `greedy_decode` calls
    its encoder and decoder directly) gets the deterministic masks, drawn at the first gated
    module when the last masks were not eval masks. `copy.deepcopy` of a gated model copies
    the hooks too (still bound to this object): remove them before copying."""

    def __init__(self, model: nn.Module, gates: L0Gates):
        groups = gate_groups(model.structured_units())
        if len(gates.blocks) != len(groups):
            raise ValueError(f"{len(gates.blocks)} gate blocks for a model with {len(groups)} gate groups")
        self.gates = gates
        self.current: Optional[list[BlockMasks]] = None
        self.current_training = False              # the mode `current` was drawn in
        self.handles = [model.register_forward_pre_hook(self._draw_masks)]
        for block, ((attention, ffn), block_gates) in enumerate(zip(groups, gates.blocks)):
            if block_gates.qk_dims is not None:
                self.handles.append(attention.q_proj.register_forward_hook(self._scale_output_hook(block, "query")))
            self.handles.append(attention.out_proj.register_forward_pre_hook(self._scale_input_hook(block, "value")))
            if ffn is not None:
                self.handles.append(ffn.fc2.register_forward_pre_hook(self._scale_input_hook(block, "ffn")))

    def _draw_masks(self, model: nn.Module, args) -> None:
        self.gates.train(model.training)
        self.current = self.gates.masks()
        self.current_training = model.training

    def _mask(self, block: int, which: str, module: nn.Module, like: torch.Tensor) -> torch.Tensor:
        if self.current is None or self.current_training != module.training:
            if module.training:
                raise RuntimeError("a gated training forward must run through the model's forward "
                                   "(which draws the masks)")
            self.gates.train(False)                # parts of the model run in eval mode
            self.current, self.current_training = self.gates.masks(), False
        return getattr(self.current[block], which).to(like.dtype)

    def _scale_output_hook(self, block: int, which: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
            return output * self._mask(block, which, module, output)
        return hook

    def _scale_input_hook(self, block: int, which: str):
        def hook(module: nn.Module, args):
            (x,) = args
            return (x * self._mask(block, which, module, x),)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.current = None


def apply_gates(model: nn.Module, gates: L0Gates) -> GateHooks:
    """Gate `model`'s forward pass with `gates` until `.remove()` is called on the result."""
    return GateHooks(model, gates)


# ========================================================================================
# Target-sparsity Lagrangian (CoFi; DPHuBERT)
# ========================================================================================

class _ReverseGradient(torch.autograd.Function):
    """Identity in the forward pass, −gradient in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    return _ReverseGradient.apply(x)


def lagrangian(expected_sparsity: torch.Tensor, target: float, lambda1: torch.Tensor,
               lambda2: torch.Tensor) -> torch.Tensor:
    """λ1·(ŝ − t) + λ2·(ŝ − t)², to be MINIMISED over the gates and MAXIMISED over λ1, λ2.

    The maximisation is built in: λ1 and λ2 enter through a gradient reversal, so an
    ordinary optimiser step on the total loss is gradient descent for the gates and
    gradient ascent for λ (DPHuBERT gets the same with a negative learning rate)."""
    gap = expected_sparsity - target
    return reverse_gradient(lambda1) * gap + reverse_gradient(lambda2) * gap * gap


def target_at(step: int, total_steps: int, target: float, warmup_fraction: float) -> float:
    """Target sparsity t at `step`: linear from 0 to `target` over the first
    `warmup_fraction` of the steps, then constant (CoFi; DPHuBERT)."""
    ramp = warmup_fraction * total_steps
    if ramp <= 0:
        return target
    return target * min(1.0, step / ramp)
