"""Magnitude-pruning baselines of the SPG paper (arXiv 2505.22608, §baselines):

  * UMP, uniform magnitude pruning: zero the fraction s of smallest-|w| entries of EVERY
    prunable matrix, then fine-tune with the mask fixed;
  * mixed (the paper's decoupled ablation): zero, in each matrix l, the fraction s_l of
    smallest-|w| entries, where s_l is the per-matrix sparsity an SPG run learned, then
    fine-tune with the mask fixed. It separates "where to prune" (taken from SPG) from
    "prune and update jointly" (which this baseline does not do);
  * GMP, one-shot global magnitude pruning (not in the SPG paper; ours, the simplest thing a
    learned per-matrix allocation must beat): ONE threshold over all prunable weights
    together, then fine-tune with the mask fixed. Its per-matrix sparsities follow the
    matrices' weight magnitudes, which is what SPG degenerates to when its penalty owns the
    thresholds' gradient.

Both are one `FixedMaskFineTuning` method for the shared training loop: the masks are
chosen once, before the first step, and never change. Pruned entries are held at exactly 0
twice over: their gradient is zeroed by a hook (so AdamW's moments for them stay 0, and
decoupled weight decay of 0 is 0), and the mask is re-applied after every optimiser step.
Each matrix gets exactly round(s_l · size) zeros (ties in |w| are broken by position), so
the achieved sparsity is the requested one to within rounding of one entry per matrix
(GMP: exactly round(s · N) zeros over all N prunable weights).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from spg.compress.interface import Method


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (True = keep) that drops the round(sparsity · size) smallest-|w| entries.
    Ties are broken by flat position (stable sort), so the result is deterministic."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = weight.detach().abs().flatten()
    drop = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:drop]] = False
    return keep.view_as(weight)


class FixedMaskFineTuning(Method):
    """Magnitude-prune each prunable matrix to its sparsity, then fine-tune with the masks fixed.

    sparsity: one value for every matrix (UMP), or {matrix name: sparsity} for every
        prunable matrix (mixed; names as in `model.prunable_linears()`)."""

    name = "fixed-mask"

    def __init__(self, sparsity: Union[float, dict[str, float]]):
        self.sparsity = sparsity
        self.masks: dict[str, torch.Tensor] = {}
        self._linears: dict[str, nn.Linear] = {}
        self._hooks: list = []

    def sparsity_of(self, name: str) -> float:
        if isinstance(self.sparsity, dict):
            return float(self.sparsity[name])
        return float(self.sparsity)

    def attach(self, model: nn.Module) -> None:
        linears = dict(model.prunable_linears())
        if isinstance(self.sparsity, dict) and set(self.sparsity) != set(linears):
            missing = sorted(set(linears) - set(self.sparsity))
            unknown = sorted(set(self.sparsity) - set(linears))
            raise ValueError(f"per-matrix sparsities do not match the model's prunable matrices "
                             f"(missing: {missing[:3]}..., unknown: {unknown[:3]}...)")
        self._linears = linears
        self.masks = self.choose_masks(linears)
        self.apply_masks()
        for name, linear in linears.items():
            # Look the mask up at call time: `load_state_dict` may replace it (resume).
            self._hooks.append(linear.weight.register_hook(
                lambda grad, name=name: grad * self.masks[name].to(grad.dtype)))

    def choose_masks(self, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """{matrix name: bool keep mask}, chosen once before the first step."""
        return {name: magnitude_mask(linear.weight, self.sparsity_of(name)) for name, linear in linears.items()}

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, linear in self._linears.items():
            linear.weight.mul_(self.masks[name].to(linear.weight.dtype))

    def after_step(self, model: nn.Module, step: int, total_steps: int,
                   optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        self.apply_masks()
        return {"sparsity": f"{self.global_sparsity():.3f}"}

    def global_sparsity(self) -> float:
        pruned = sum(int((~mask).sum()) for mask in self.masks.values())
        total = sum(mask.numel() for mask in self.masks.values())
        return pruned / total if total else 0.0

    def finish(self, model: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.apply_masks()
        model.compression = {
            "method": self.name,
            "target_sparsity": self.global_sparsity(),
            "sparsity": self.global_sparsity(),
            "per_matrix_sparsity": {name: int((~mask).sum()) / mask.numel() for name, mask in self.masks.items()},
        }

    def state_dict(self) -> dict:
        return {"masks": dict(self.masks)}

    def load_state_dict(self, state: dict) -> None:
        self.masks = {name: mask.to(torch.bool) for name, mask in state["masks"].items()}
        self.apply_masks()


class UMP(FixedMaskFineTuning):
    """Uniform magnitude pruning: the same sparsity s in every prunable matrix."""

    name = "ump"

    def __init__(self, sparsity: float):
        super().__init__(float(sparsity))


class Mixed(FixedMaskFineTuning):
    """Magnitude pruning to the per-matrix sparsities an SPG run learned
    (`model.compression["per_matrix_sparsity"]` of its checkpoint), with fixed-mask fine-tuning."""

    name = "mixed"

    def __init__(self, per_matrix_sparsity: dict[str, float]):
        super().__init__({name: float(value) for name, value in per_matrix_sparsity.items()})


@torch.no_grad()
def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """{name: bool keep mask} that drop the round(sparsity · N) smallest |w| over ALL N entries
    of `weights` together (one global threshold). Ties are broken by position in the
    concatenation of the matrices in the given order (stable sort), as in `magnitude_mask`."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = torch.cat([weight.detach().abs().flatten() for weight in weights.values()])     # (N,)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:round(sparsity * flat.numel())]] = False
    masks, start = {}, 0
    for name, weight in weights.items():
        masks[name] = keep[start:start + weight.numel()].view_as(weight)
        start += weight.numel()
    return masks


class GMP(FixedMaskFineTuning):
    """One-shot global magnitude pruning: one threshold over every prunable weight, so the
    global sparsity is s and each matrix gets whatever fraction of it falls below; then
    fixed-mask fine-tuning as in UMP."""

    name = "gmp"

    def __init__(self, sparsity: float):
        super().__init__(float(sparsity))

    def choose_masks(self, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        return global_magnitude_masks({name: linear.weight for name, linear in linears.items()}, float(self.sparsity))
