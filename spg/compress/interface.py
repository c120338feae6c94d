"""What a compression method plugs into: the hooks of the shared training loop.

The one module that the method modules (`self_pinching`, `magnitude`, `l0`) share with the
loop (`spg.training`); it imports only torch, so a method module copied out of spg needs this
file and nothing else. A model is any `nn.Module`; methods that prune matrices find them with
`model.prunable_linears()` (both model families offer it).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn

__all__ = ["Method", "OptimizerSettings"]


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
