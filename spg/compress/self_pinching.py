"""Self-pinching gates (SPG): one-pass joint pruning and fine-tuning (arXiv 2505.22608).

Every prunable matrix W_l (q, k, v, out, fc1, fc2 of every block; `model.prunable_linears()`)
gets ONE learnable scalar threshold t_l. With a temperature τ:

    soft mask   M_l = sigmoid((W_l² − t_l²) / τ)          (element-wise; used for gradients only)
    hard mask   B_l = [W_l² ≥ t_l²]                        (used in EVERY forward pass)
    forward     W_eff = W_l ⊙ B_l,  backward through W_l ⊙ M_l (straight-through estimator)
    loss        L = L_task + η · Σ_l ‖B_l‖₀,  the count's gradient taken through Σ_l Σ M_l

with L_task the model's own loss (the training loop's `Objective`: CTC for wav2vec2/HuBERT,
as in the paper; teacher-forced decoder cross-entropy for Whisper). So W and t are trained
together: the penalty raises t ("pinches" the matrix) and shrinks weights, the task loss
pushes back where weights matter. A controller holds the GLOBAL hard sparsity at the target
s* (`SparsityController`: the paper's on/off, or the authors' two-sided band, which also
un-prunes above s*). The per-matrix sparsities are learned, not set ("mixed sparsity"). τ is
cosine-annealed 0.5 → 0.01. There is no separate prune-then-fine-tune stage; the final model
is W ⊙ B with the gates removed (`finalize`).

The gate is a `torch.nn.utils.parametrize` parametrization of `Linear.weight`, so a gated
model is still a model of the same class (same forward, `prunable_linears()` returns the
same Linear modules and `linear.weight` reads the masked weight); `finalize` bakes W ⊙ B into a
plain `nn.Linear.weight` and leaves no gate code behind.

Penalty scaling. The paper writes the raw count, L = L_task + η · Σ_l ‖B_l‖₀ ("raw" form); the
authors' code adds it to a CTC loss SUMMED over the batch (HF's ctc_loss_reduction="sum"), with
wav2vec2-base η = 2e-5 (3e-5 for targets ≥ 65 %). That balance is `SPG`'s default, with η scaled
for a short budget (`default_raw_eta`) and a threshold learning rate that fits the number of
steps (`default_threshold_lr`); how to use it with a mean-reduced loss is in `SPG`'s docstring.
The other form, η'·mean(M) over all N prunable weights (`normalised_eta=True`),
    η' · (Σ_l Σ M_l) / N  ==  η · Σ_l Σ M_l   with   η = η' / N,
(η' = η·N: wav2vec2-base 2e-5 ↔ η' ≈ 1.7e3, `default_eta`) was our earlier default and stays for
Whisper in `spg.experiment`, whose teacher-forced cross-entropy is a mean. With a MEAN-reduced
loss and η' the penalty owns the thresholds' gradient, AdamW raises every t_l by about one
learning rate per step, the thresholds move in lockstep and SPG degenerates into gradual global
magnitude pruning; with the summed loss the task has a say and the per-matrix allocation is
learned. η is per weight, so its balance against the summed loss also depends on how much a
single weight matters to the task: tuned on a 5M-weight speech model, it reaches the target
late on a much smaller one (then the final calibration, or a larger η, closes the gap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from spg.compress.interface import Method, OptimizerSettings

THRESHOLD_INIT = 1e-5        # paper: every t_l starts at 1e-5 (≈ 0 % sparsity)
TAU_START, TAU_END = 0.5, 0.01   # paper: τ cosine-annealed from 0.5 to 0.01 over the run

# The raw η (module docstring, "Penalty scaling"): the paper's wav2vec2-base values by target ...
PAPER_ETA_RAW, PAPER_ETA_RAW_HIGH = 2e-5, 3e-5
# ... times a factor for a short budget. Not specified by the paper; we use 5 because in a few
# hundred steps the weights have no time to adapt, the task loss pushes back harder than in the
# paper's 27K steps, and the paper's η stalls below the target (measurement: README.md, "Why
# these defaults").
ETA_BUDGET_FACTOR = 5.0


def default_raw_eta(target: float) -> float:
    """The raw η of L = L_task + η · Σ_l ‖B_l‖₀ (L_task summed over the batch) by target: the
    paper's 2e-5 below 65 % and 3e-5 from 65 %, times `ETA_BUDGET_FACTOR`."""
    return ETA_BUDGET_FACTOR * (PAPER_ETA_RAW_HIGH if target >= 0.65 else PAPER_ETA_RAW)


# The normalised η' = η · N (module docstring): the paper's η times wav2vec2-base's 84.9 M
# prunable weights. Not the default; `spg.experiment` uses it for Whisper.
ETA_NORMALISED = 1.7e3
ETA_NORMALISED_HIGH = 2.5e3


def default_eta(target: float) -> float:
    """The paper's η by target (wav2vec2-base) in normalised form η' (for a mean-reduced loss)."""
    return ETA_NORMALISED_HIGH if target >= 0.65 else ETA_NORMALISED


# How far the thresholds may travel: AdamW moves a threshold by at most about its learning
# rate per step while one loss term owns its gradient, so threshold-lr × steps bounds the
# climb and sets which FRACTION of the run the pinching takes. Not specified by the paper
# (its thresholds share the weights' lr 2e-4 over 27K steps: a product of 5.4); we use 1.5
# because it reaches the target in about the first tenth of a short run and leaves the rest
# for recovery (measurement: README.md, "Why these defaults").
THRESHOLD_TRAVEL = 1.5
# Not specified by the paper; we use 1e-2 because a larger step jumps past a typical |w| of a
# trained speech model (README.md) in about one step.
THRESHOLD_LR_MAX = 1e-2


def default_threshold_lr(lr: float, steps: int) -> float:
    """The thresholds' learning rate for a run of `steps` steps whose weights learn at `lr`:
    THRESHOLD_TRAVEL / steps, at most THRESHOLD_LR_MAX and never below the weights' lr (the
    paper's choice, which long runs get)."""
    return max(lr, min(THRESHOLD_LR_MAX, THRESHOLD_TRAVEL / max(1, steps)))


# ========================================================================================
# The gate
# ========================================================================================

class SelfPinchingGate(nn.Module):
    """Parametrization of one prunable weight matrix: `weight -> weight ⊙ B` (forward) with
    the gradient of `weight ⊙ M` (backward). Holds the learnable threshold t and the current
    temperature τ (a plain float, set by the training method before every forward)."""

    def __init__(self, threshold_init: float = THRESHOLD_INIT, temperature: float = TAU_START):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold_init)))
        self.temperature = float(temperature)

    def soft_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """M = sigmoid((W² − t²) / τ) (paper, soft mask); differentiable in W and t."""
        return torch.sigmoid((weight.square() - self.threshold.square()) / self.temperature)

    def hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """B = [W² ≥ t²] (paper, hard mask) as a bool tensor; no gradient."""
        return weight.detach().square() >= self.threshold.detach().square()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        hard = self.hard_mask(weight).to(weight.dtype)
        if not torch.is_grad_enabled():
            return weight * hard
        soft = self.soft_mask(weight)
        # Straight-through estimator: W ⊙ M_ste with M_ste = B + M − sg(M) (sg = stop-gradient).
        # Written as W⊙B + W⊙(M − sg(M)) so the forward VALUE is exactly W⊙B in floating
        # point (M − sg(M) is exactly 0; B + M − M could be off by an ulp), while the
        # gradient is the same: ∂/∂W = B + W ⊙ ∂M/∂W, ∂/∂t = W ⊙ ∂M/∂t.
        return weight * hard + weight * (soft - soft.detach())


@dataclass
class GatedMatrix:
    """One gated prunable matrix: its name (e.g. "encoder.layers.0.attention.q_proj"),
    the Linear it belongs to and its gate."""

    name: str
    linear: nn.Linear
    gate: SelfPinchingGate

    @property
    def weight(self) -> torch.Tensor:
        """The unmasked, trainable weight W (the parametrization's 'original')."""
        return self.linear.parametrizations.weight.original

    def hard_mask(self) -> torch.Tensor:
        return self.gate.hard_mask(self.weight)

    def soft_mask(self) -> torch.Tensor:
        return self.gate.soft_mask(self.weight)


def attach_gates(model: nn.Module, threshold_init: float = THRESHOLD_INIT) -> list[GatedMatrix]:
    """Put a `SelfPinchingGate` on every prunable matrix of `model` (in `prunable_linears()`
    order) and return them. Already gated matrices keep their gate. Undo with `finalize`."""
    for _, linear in model.prunable_linears():
        if not parametrize.is_parametrized(linear, "weight"):
            gate = SelfPinchingGate(threshold_init).to(linear.weight.device)
            parametrize.register_parametrization(linear, "weight", gate)
    return gated_matrices(model)


def gated_matrices(model: nn.Module) -> list[GatedMatrix]:
    """The gates currently attached to `model`'s prunable matrices (empty when none)."""
    found = []
    for name, linear in model.prunable_linears():
        if parametrize.is_parametrized(linear, "weight"):
            gate = linear.parametrizations.weight[0]
            if isinstance(gate, SelfPinchingGate):
                found.append(GatedMatrix(name, linear, gate))
    return found


@torch.no_grad()
def finalize(model: nn.Module) -> None:
    """Bake W ⊙ B into each gated Linear's plain `weight` Parameter and remove every gate.
    The model is then an ordinary model of its class whose pruned entries are exact zeros."""
    for matrix in gated_matrices(model):
        keep = matrix.hard_mask()
        parametrize.remove_parametrizations(matrix.linear, "weight", leave_parametrized=False)
        matrix.linear.weight.mul_(keep.to(matrix.linear.weight.dtype))


# ========================================================================================
# Measurements and schedules
# ========================================================================================

@torch.no_grad()
def hard_sparsity(matrices: list[GatedMatrix]) -> float:
    """Global hard sparsity: pruned entries of all gated matrices / all their entries."""
    pruned = sum(int((~m.hard_mask()).sum()) for m in matrices)
    total = sum(m.weight.numel() for m in matrices)
    return pruned / total if total else 0.0


@torch.no_grad()
def per_matrix_sparsity(matrices: list[GatedMatrix]) -> dict[str, float]:
    return {m.name: int((~m.hard_mask()).sum()) / m.weight.numel() for m in matrices}


def sparsity_penalty(matrices: list[GatedMatrix], eta: float, *, normalised: bool = True) -> torch.Tensor:
    """The differentiable stand-in for η · Σ‖B‖₀: η · Σ_l Σ M_l (raw, the paper's form) or
    η' · Σ_l Σ M_l / N (normalised, our default; η = η'/N, see the module docstring)."""
    kept = sum(m.soft_mask().sum() for m in matrices)
    if normalised:
        kept = kept / sum(m.weight.numel() for m in matrices)
    return eta * kept


def cosine_temperature(step: int, total_steps: int, start: float = TAU_START, end: float = TAU_END) -> float:
    """τ at `step` of `total_steps`: cosine annealing from `start` (step 0) to `end` (last step).
    Paper: "cosine-annealed from 0.5 to 0.01"; the exact cosine form is the usual one."""
    progress = min(1.0, step / max(1, total_steps))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def calibrate_thresholds(matrices: list[GatedMatrix], target: float, iterations: int = 60) -> float:
    """Multiply every threshold by ONE common scale c > 0, found by bisection, so that the
    global hard sparsity is the target (to within a handful of weights). Returns c.

    Not in the paper: our final correction of the controller's small miss (see `SPG`).
    A common scale keeps the learned *relative* thresholds, hence the mixed per-matrix
    sparsities; the global sparsity is non-decreasing in c, so bisection converges."""
    magnitudes = [m.weight.detach().abs().flatten() for m in matrices]
    thresholds = [m.gate.threshold.detach().abs() for m in matrices]
    total = sum(x.numel() for x in magnitudes)
    wanted = round(target * total)

    def pruned(scale: float) -> int:
        return sum(int((w < scale * t).sum()) for w, t in zip(magnitudes, thresholds))

    low, high = 0.0, 1.0
    while pruned(high) < wanted:            # find an upper bracket
        if high > 1e30:
            raise ValueError(f"no common threshold scale reaches sparsity {target} (all thresholds 0?)")
        high *= 2.0
    for _ in range(iterations):             # invariant: pruned(low) < wanted <= pruned(high)
        middle = 0.5 * (low + high)
        if pruned(middle) >= wanted:
            high = middle
        else:
            low = middle
    # |W| < c·t  ⇔  W² < (c·t)², the hard mask's rule; `high` is the smallest scale found
    # that prunes at least `wanted` entries.
    for m in matrices:
        m.gate.threshold.mul_(high)
    return high


# ========================================================================================
# The controller
# ========================================================================================

def authors_band(target: float) -> float:
    """Width of the authors' band below the target (hanyxu/SASPG-pruning scripts): 0.02 for
    targets up to 50 %, 0.002 above."""
    return 0.02 if target <= 0.5 + 1e-9 else 0.002


def default_band(target: float) -> float:
    """The band width `SPG` uses by default: `authors_band(target)`, at most half the target
    (not specified by the authors' scripts, whose targets are all above 0.04; we use the half so
    that the band [s* − b, s*] always lies above 0)."""
    return min(authors_band(target), target / 2)


class SparsityController:
    """Sets the sign of η for the next step from the global hard sparsity s measured after
    every step. Two controllers:

      * on/off (`band=None`; the paper's text): +η while s < s*, 0 once s ≥ s*;
      * two-sided band (`band=b`; the authors' public code, `minmax_gate_prune_loss` in
        `ASR/utils/prune_ratio_utils.py`): +η below s* − b (prune), −η above s* (the penalty
        turns into a reward for kept weights: un-prune), 0 inside [s* − b, s*].

    `slow_band` (ours, on/off only; 0 = off): within `slow_band` below the target, η is scaled
    down linearly, η·(s* − s)/slow_band, so the pinching slows as it arrives."""

    def __init__(self, target: float, eta: float, slow_band: float = 0.0, band: Optional[float] = None):
        if band is not None and not 0.0 <= band < target:
            raise ValueError(f"band must be in [0, target={target}), got {band}")
        self.target = target
        self.eta = eta
        self.slow_band = slow_band
        self.band = band
        self.direction = 1 if target > 0 else 0     # +1 prune, 0 off, −1 un-prune
        self.sparsity = 0.0
        self.switches = 0          # how often the direction changed
        self.first_reached: Optional[int] = None

    def current_eta(self) -> float:
        """The signed penalty weight for the next step."""
        if self.direction == 0:
            return 0.0
        if self.direction > 0 and self.slow_band > 0 and self.band is None:
            return self.eta * min(1.0, (self.target - self.sparsity) / self.slow_band)
        return self.direction * self.eta

    def update(self, sparsity: float, step: int) -> bool:
        """Record the sparsity measured after `step`; returns True when the direction changed."""
        self.sparsity = sparsity
        if self.band is None:
            direction = 1 if sparsity < self.target else 0
        elif sparsity < self.target - self.band:
            direction = 1
        elif sparsity > self.target:
            direction = -1
        else:
            direction = 0
        if sparsity >= self.target - (self.band or 0.0) and self.first_reached is None:
            self.first_reached = step
        switched = direction != self.direction
        self.switches += int(switched)
        self.direction = direction
        return switched

    def state_dict(self) -> dict:
        return {"direction": self.direction, "sparsity": self.sparsity, "switches": self.switches,
                "first_reached": self.first_reached}

    def load_state_dict(self, state: dict) -> None:
        self.direction, self.sparsity = state["direction"], state["sparsity"]
        self.switches, self.first_reached = state["switches"], state["first_reached"]


# ========================================================================================
# The training-loop plug-in
# ========================================================================================

class SPG(Method):
    """Self-pinching gates as a `spg.compress.interface.Method`: attach gates, anneal τ, add the
    penalty while the controller says so, calibrate and finalize at the end.

    The defaults are the authors' balance (hanyxu/SASPG-pruning), which is what `train.py` runs
    on wav2vec2/HuBERT: the raw η of L = L_task + η · Σ_l ‖B_l‖₀ (`default_raw_eta`), the
    two-sided band controller (`default_band`), no optimiser reset, and, given `steps`, a
    threshold learning rate that fits the run (`default_threshold_lr`).

    The loss the default η assumes: L_task SUMMED over the batch (the authors' CTC,
    ctc_loss_reduction="sum"; for a regression, the squared errors added over the examples).
    With a MEAN over B terms, L_mean = L_sum / B, two exact equivalents:
      * multiply the loss by B: B · L_mean = L_sum, the same loss and the same gradients;
      * or divide η by B: L_mean + (η/B) · Σ‖B_l‖₀ = (L_sum + η · Σ‖B_l‖₀) / B, the same
        objective scaled by 1/B, so every gradient is 1/B times the summed one; AdamW's step
        does not depend on that scale (up to its ε), gradient clipping at a fixed norm does.
    Left at η with a mean loss, the penalty weighs B times more than the balance it was chosen
    for (towards the degenerate regime of the module docstring).

    target: global sparsity s* of the prunable matrices.
    eta: penalty weight; raw η (default form) or, with `normalised_eta=True`, η' on the
        mean soft mask (module docstring). None: `default_raw_eta(target)` for the raw form,
        `default_eta(target)` for the normalised one.
    threshold_lr: learning rate of the thresholds. "auto" (default): `default_threshold_lr(lr,
        steps)` with the weights' lr when `steps` is given, else the weights' lr; None: the
        weights' lr (the paper's choice); a number: that. The thresholds follow the same
        warm-up/decay schedule, with weight decay 0 (ours).
    steps: the run's number of optimiser steps, for threshold_lr="auto" (the optimiser's
        parameter groups are built before the loop tells a method its total steps).
    band: "authors" (default): the two-sided band controller with width `default_band(target)`;
        a number b: that width; None: the on/off controller of the paper's text
        (`SparsityController`).
    reset_on_switch: when η switches, clear the thresholds' AdamW state (ours; see below).
        None (default): on with the on/off controller, off with the band (the authors' code).
    calibrate: finish with `calibrate_thresholds` so the global sparsity is exactly s* (ours).
    history_every: record global and per-matrix sparsity and thresholds every N steps.

    What lands on the target with the ON/OFF controller (not specified by the paper; our
    choice, measured; the band controller needs no reset because it pulls back itself). With the
    bare on/off controller the sparsity overshoots and then keeps creeping up: while η is on
    it dominates the thresholds' gradient, so AdamW's second moment v becomes large and its
    first moment m points up; after the switch m carries the thresholds on for tens of steps,
    and the small task-loss gradient that remains is divided by the large sqrt(v), so the
    thresholds are frozen above the target and cannot come back. (Meanwhile kept weights
    random-walk across the frozen threshold, and masked ones barely move: more creep.)
    Clearing the thresholds' AdamW state at every switch (`reset_on_switch`) removes both:
    each switch restarts them with a bounded step of one learning rate, in the direction
    of the gradient they now see (penalty up, task loss usually down), so the controller chatters
    around s*. The measurements behind this choice (overshoot of the bare controller, the
    range with the reset, what calibration then changes) are in README.md, "Compressing the
    shipped model".
    """

    name = "spg"

    def __init__(self, target: float, *, eta: Optional[float] = None, normalised_eta: bool = False,
                 tau_start: float = TAU_START, tau_end: float = TAU_END, threshold_init: float = THRESHOLD_INIT,
                 threshold_lr: Union[float, str, None] = "auto", steps: Optional[int] = None,
                 slow_band: float = 0.0, band: Union[float, str, None] = "authors",
                 reset_on_switch: Optional[bool] = None, calibrate: bool = True, history_every: int = 10):
        if not 0.0 < target < 1.0:
            raise ValueError(f"target sparsity must be in (0, 1), got {target}")
        if isinstance(threshold_lr, str) and threshold_lr != "auto":
            raise ValueError(f"threshold_lr must be a number, None or 'auto', got {threshold_lr!r}")
        if isinstance(band, str):
            if band != "authors":
                raise ValueError(f"band must be a number, None or 'authors', got {band!r}")
            band = default_band(target)
        if eta is None:
            eta = default_eta(target) if normalised_eta else default_raw_eta(target)
        self.target = target
        self.eta = eta
        self.normalised_eta = normalised_eta
        self.tau_start, self.tau_end = tau_start, tau_end
        self.threshold_init = threshold_init
        self.threshold_lr = threshold_lr      # "auto" is resolved in `parameter_groups`
        self.steps = steps
        self.reset_on_switch = band is None if reset_on_switch is None else reset_on_switch
        self.calibrate = calibrate
        self.history_every = history_every
        self.controller = SparsityController(target, eta, slow_band, band)
        self.tau = tau_start
        self.history: list[dict] = []
        self.matrices: list[GatedMatrix] = []

    # --- the Method interface ------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.matrices = attach_gates(model, self.threshold_init)

    def parameter_groups(self, model: nn.Module, config: OptimizerSettings) -> list[dict]:
        if self.threshold_lr == "auto":
            self.threshold_lr = config.lr if self.steps is None else default_threshold_lr(config.lr, self.steps)
        thresholds = [m.gate.threshold for m in self.matrices]
        ids = {id(t) for t in thresholds}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
                # Thresholds: weight decay 0 (ours: decay would pull them back to 0) and no
                # gradient clipping (ours: the penalty's gradient on them is large by design
                # and would otherwise scale down every task-loss gradient through the shared norm;
                # AdamW normalises their steps anyway).
                {"params": thresholds, "weight_decay": 0.0, "clip_grad": False,
                 "lr": self.threshold_lr if self.threshold_lr is not None else config.lr}]

    def before_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.tau = cosine_temperature(step, total_steps, self.tau_start, self.tau_end)
        for m in self.matrices:
            m.gate.temperature = self.tau

    def extra_loss(self, model: nn.Module, step: int, total_steps: int) -> Optional[torch.Tensor]:
        eta = self.controller.current_eta()
        if eta == 0.0:
            return None
        return sparsity_penalty(self.matrices, eta, normalised=self.normalised_eta)

    def after_step(self, model: nn.Module, step: int, total_steps: int,
                   optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        sparsity = hard_sparsity(self.matrices)
        switched = self.controller.update(sparsity, step)
        if switched and self.reset_on_switch and optimizer is not None:
            for m in self.matrices:
                optimizer.state.pop(m.gate.threshold, None)
        if self.history_every and (step % self.history_every == 0 or step == total_steps):
            self.record(step)
        return {"sparsity": f"{sparsity:.3f}", "eta": {1: "on", 0: "off", -1: "neg"}[self.controller.direction],
                "tau": f"{self.tau:.3f}"}

    def finish(self, model: nn.Module) -> None:
        before = hard_sparsity(self.matrices)
        scale = calibrate_thresholds(self.matrices, self.target) if self.calibrate else 1.0
        after = hard_sparsity(self.matrices)
        model.compression = {
            "method": "spg", "target_sparsity": self.target,
            "sparsity_before_calibration": before, "sparsity": after, "calibration_scale": scale,
            "per_matrix_sparsity": per_matrix_sparsity(self.matrices),
            "thresholds": {m.name: m.gate.threshold.item() for m in self.matrices},
            "eta": self.eta, "eta_form": "normalised" if self.normalised_eta else "raw",
            "tau_start": self.tau_start, "tau_end": self.tau_end,
            "threshold_lr": self.threshold_lr, "band": self.controller.band,
            "first_reached_step": self.controller.first_reached,
            "switches": self.controller.switches,
        }
        finalize(model)
        self.matrices = []

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.history = list(state["history"])

    # --- history for plots -----------------------------------------------------------
    @torch.no_grad()
    def record(self, step: int) -> None:
        self.history.append({
            "step": step, "tau": self.tau, "eta": self.controller.current_eta(),
            "sparsity": self.controller.sparsity,
            "thresholds": [m.gate.threshold.item() for m in self.matrices],
            "per_matrix_sparsity": list(per_matrix_sparsity(self.matrices).values()),
        })
