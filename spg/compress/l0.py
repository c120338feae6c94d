"""L0 hard-concrete head pruning as a `spg.compress.interface.Method` (arXiv 2306.01385).

The gates, the expected parameter count and the Lagrangian are in
`spg.compress.hardconcrete`; this module plugs them into the shared training loop and, at
the end, folds the masks into the weights and removes the pruned units (`finalize`, with the
model's `rebuild`). It sees the model only through `spg.compress.interface`
(`structured_units()`, `rebuild()`), so it prunes wav2vec2/HuBERT (heads, head dims, FFN
neurons) and Whisper (encoder self-attention, decoder self- and cross-attention heads, FFN
neurons; its heads stay whole) alike:

    method = L0Method(target_sparsity=0.7)                  # or ste=True, distill_teacher=...
    train(model, utterances, config, objective=CTCObjective(), method=method)
    smaller = method.pruned_model                            # physically pruned model
    spg.save(smaller, "runs/l0-0.7.pt")

Loss per step (CoFi, Xia et al. 2022; DPHuBERT, Peng et al. 2023):
    L = L_task + λ1·(ŝ − t) + λ2·(ŝ − t)²  [+ w·L_distill]
with L_task the model family's loss (CTC; Whisper's decoder cross-entropy), ŝ the expected
sparsity of the prunable layers (`L0Gates.expected_sparsity`),
t ramped linearly from 0 to the target over the first `target_warmup_fraction` of the
steps, and λ1, λ2 trained by gradient ASCENT (gradient reversal, see
`spg.compress.hardconcrete.lagrangian`). The arXiv 2306.01385 paper trains task-agnostically
by distillation; in our CTC setting CTC is the main loss and distillation is optional.

Distillation (optional, `distill_teacher`; any `DistillableModel` of the interface: its
`encoder_blocks()` and `frame_lengths`): layer-to-layer, as DPHuBERT's "layer2layer" mode: for a few blocks i, L1 + (1 − cosine) between the student's and the dense teacher's
output of block i, averaged over the valid (unpadded) frames and the chosen blocks.
  * Blocks: by default L/3, 2L/3 and L (4, 8, 12 for base models, as DPHuBERT; 2, 4, 6 for
    the tiny model). DPHuBERT also distils the transformer input ("layer 0") because it
    prunes the conv front end; we never prune it, so that term would only compare
    identical-but-for-SpecAugment features; we leave it out.
  * No projection heads: DPHuBERT learns a Linear per distilled layer; not specified by
    2306.01385; we use the identity because the student starts as a copy of the teacher
    with the same hidden width, so identity is the exact initial map and nothing has to be
    thrown away after training.
  * Cosine term: DPHuBERT's `cos_type=raw` is −cos; we use 1 − cos (same gradient, ≥ 0).
  * The student's block outputs come from forward hooks on `model.encoder_blocks()`; the
    teacher gets exactly the student's inputs (waveforms, or the cached conv features,
    which are the same for both because the front end is frozen and never pruned). A
    block skipped by LayerDrop in this step has no output and its term is left out;
    setting `layerdrop = 0` for distillation runs is advisable.

Not specified by the papers, ours (defaults):
  * gate and λ learning rates 0.1 (DPHuBERT: `reg_lr` 0.02 over 50 000 steps). λ1, λ2 sit
    in the loop's AdamW, as in DPHuBERT, so they move by about one learning rate per step
    whatever the size of ŝ − t, and they must grow until the penalty's gradient on the
    gates outweighs the (noisy) CTC gradient; at 0.02 they stay too small in a run of
    hundreds of steps. Gates and λ follow the loop's warm-up/decay schedule and get no
    weight decay and no gradient clipping (the Lagrangian's gradient would otherwise scale
    down every CTC gradient through the shared norm);
  * target ramp over the first 50 % of the steps (DPHuBERT: 5 000 of 50 000 = 10 %): our
    runs are short and the gates need time to follow the ramp; with shorter ramps the
    gates overshoot more often (measured on tiny random models, 200-300 steps);
  * `calibrate=True`: the Lagrangian lands near, not on, the target in short runs. Measured
    on tiny random models (2 blocks, hidden 32-64), target 0.6: 600 CTC steps end at
    0.45..0.69, a synthetic distillation loss over 300-600 steps at 0.50..0.74; with λ in
    AdamW (sign-like steps) λ1 winds up while the gates lag the ramp and unwinds only as
    fast, so the gates overshoot or stop short when the learning rate decays. `finish`
    therefore adds one common shift to all log_alpha so that the deployed sparsity is the
    target (the smallest reachable value ≥ it; `L0Gates.calibrate`), as SPG's final
    threshold calibration; the record keeps the sparsity before calibration and the shift.
    CoFi also clamps log_alpha to [log 0.01, log 100] after every step; we do not (as
    DPHuBERT): it did not remove the miss in our runs, and clamped gates tie at the floor,
    where the eval mask still keeps ~5 % of them with values ~0.004.
  * two variants for models whose head gates close first (`head_gates=False`, the
    dims-only variant, and `min_heads`; see `spg.compress.hardconcrete.BlockGates`), and per
    gate type learning rates (`gate_lr` as a dict) and initial drop rates (`init`); what they
    change on the shipped model is measured in the README (experiments/structured_experiment.py).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from spg.compress.hardconcrete import (BlockMasks, GateHooks, InitDropRates, L0Gates, apply_gates, gate_groups,
                                       lagrangian, target_at)
from spg.compress.interface import (AttentionWeights, DistillableModel, FeedForwardWeights, Method, ModuleWeights,
                                    OptimizerSettings, PrunableModel, head_slices)

GATE_LR = 0.1                   # ours; DPHuBERT's reg_lr is 0.02 (see the module docstring)
LAMBDA_LR = 0.1                 # ours; DPHuBERT's reg_lr is 0.02 (ascent)
TARGET_WARMUP_FRACTION = 0.5    # ours; DPHuBERT 0.1 (see the module docstring)
GATE_TYPES = ("heads", "qk_dims", "v_dims", "ffn")


def gate_parameters_by_type(gates: L0Gates) -> dict[str, list[nn.Parameter]]:
    """{gate type: the log_alpha of every gate group of that type} (types without gates omitted)."""
    found: dict[str, list[nn.Parameter]] = {}
    for block in gates.blocks:
        for kind in GATE_TYPES:
            gate = getattr(block, kind)
            if gate is not None and gate.log_alpha.numel():
                found.setdefault(kind, []).append(gate.log_alpha)
    return found


def default_distill_layers(num_blocks: int) -> list[int]:
    """Blocks L/3, 2L/3, L (1-based; block i's output), e.g. [4, 8, 12] for 12 blocks."""
    return sorted({max(1, round(num_blocks * k / 3)) for k in (1, 2, 3)})


class HiddenStateRecorder:
    """Records the output of the given blocks (1-based) of `model` during training-mode
    forwards, via forward hooks on `model.encoder_blocks()`. `pop()` returns and clears them."""

    def __init__(self, model: DistillableModel, blocks: Sequence[int], *, always: bool = False):
        self.states: dict[int, torch.Tensor] = {}
        self.always = always
        layers = model.encoder_blocks()
        self.handles = [layers[i - 1].register_forward_hook(self._hook(i)) for i in blocks]

    def _hook(self, block: int):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if self.always or module.training:
                self.states[block] = output
        return hook

    def pop(self) -> dict[int, torch.Tensor]:
        states, self.states = self.states, {}
        return states

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.states = [], {}


def distillation_loss(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor],
                      frame_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Mean over the blocks present in both of  L1(s, t) + (1 − cos(s, t)),  each averaged
    over the valid frames (`frame_mask` (B, T), None = all), L1 also over the features."""
    terms = []
    for block, s in student.items():
        if block not in teacher:
            continue
        t = teacher[block].to(s.dtype)
        if t.shape != s.shape:
            raise ValueError(f"block {block}: the student's output is {tuple(s.shape)}, the teacher's "
                             f"{tuple(t.shape)}; distillation needs the same hidden size")
        valid = torch.ones(s.shape[:2], dtype=s.dtype, device=s.device) if frame_mask is None \
            else frame_mask.to(s.dtype)                                                     # (B, T)
        frames = valid.sum().clamp(min=1.0)
        l1 = ((s - t).abs().mean(-1) * valid).sum() / frames
        cosine = (torch.nn.functional.cosine_similarity(s, t, dim=-1) * valid).sum() / frames
        terms.append(l1 + (1.0 - cosine))
    return torch.stack(terms).mean() if terms else None


class L0Method(Method):
    """Fine-grained L0 hard-concrete pruning (heads, q/k dims, value dims, FFN neurons)
    with a target-sparsity Lagrangian; see the module docstring.

    target_sparsity: final target for ŝ, the sparsity of the prunable layers of every
        attention module and FFN counted with their biases (`spg.compress.hardconcrete`
        module docstring).
    ste: straight-through variant (binary masks forward, relaxed gradient backward).
    gate_lr, lambda_lr: learning rates of log_alpha and of λ1, λ2. `gate_lr` may also be a
        dict by gate type ({"heads", "qk_dims", "v_dims", "ffn"}; missing types: GATE_LR):
        a head gate's penalty gradient is ~128x an FFN gate's on the tiny model while its
        CTC gradient is only ~30x, so under Adam head gates take near-full steps.
    target_warmup_fraction: share of the steps over which t ramps from 0 to the target.
    init: initial drop rate per gate type (`InitDropRates`).
    head_gates: False for the dims-only variant (no head gate; a head goes when all its value
        dims do). min_heads: keep at least this many heads per attention module (ours; see
        `spg.compress.hardconcrete.BlockGates`).
    seed: seed of the log_alpha init noise.
    distill_teacher: optional dense teacher (frozen, eval mode) for layer-wise distillation.
    distill_layers: 1-based blocks to distil (default `default_distill_layers`).
    distill_weight: weight of the distillation loss next to CTC.
    calibrate: finish with `L0Gates.calibrate` so the deployed sparsity is the target (ours).
    history_every: record the figures every N steps in `self.history`.

    After the last step, `finish` folds the deterministic masks into the training model
    (dense shapes, pruned units exactly 0, hooks removed) and leaves the physically smaller
    model in `self.pruned_model`; both carry the record in `.compression`.
    """

    name = "l0"

    def __init__(self, target_sparsity: float, *, ste: bool = False, gate_lr: Union[float, dict] = GATE_LR,
                 lambda_lr: float = LAMBDA_LR, target_warmup_fraction: float = TARGET_WARMUP_FRACTION,
                 init: InitDropRates = InitDropRates(), seed: int = 0, head_gates: bool = True, min_heads: int = 0,
                 distill_teacher: Optional[nn.Module] = None, distill_layers: Optional[Sequence[int]] = None,
                 distill_weight: float = 1.0, calibrate: bool = True, history_every: int = 10):
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
        self.target = float(target_sparsity)
        self.ste = bool(ste)
        if isinstance(gate_lr, dict):
            unknown = set(gate_lr) - set(GATE_TYPES)
            if unknown:
                raise ValueError(f"unknown gate types {sorted(unknown)}; expected some of {GATE_TYPES}")
            self.gate_lr = {kind: float(gate_lr.get(kind, GATE_LR)) for kind in GATE_TYPES}
        else:
            self.gate_lr = float(gate_lr)
        self.lambda_lr = float(lambda_lr)
        self.target_warmup_fraction = float(target_warmup_fraction)
        self.init = init
        self.seed = int(seed)
        self.head_gates = bool(head_gates)
        if min_heads and not head_gates:
            raise ValueError("min_heads needs head gates: the dims-only variant (head_gates=False) has none")
        self.min_heads = int(min_heads)
        self.teacher = distill_teacher
        self.distill_layers = list(distill_layers) if distill_layers is not None else None
        self.distill_weight = float(distill_weight)
        self.calibrate = bool(calibrate)
        self.history_every = int(history_every)
        self.gates: Optional[L0Gates] = None
        self.hooks: Optional[GateHooks] = None
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.current_target = 0.0
        self.figures: dict[str, float] = {}
        self.history: list[dict] = []
        self.pruned_model: Optional[nn.Module] = None
        self._student_states: Optional[HiddenStateRecorder] = None
        self._teacher_states: Optional[HiddenStateRecorder] = None
        self._inputs: Optional[tuple] = None
        self._input_hook = None

    # --- the Method interface ------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        self.gates = L0Gates.for_model(model, self.init, ste=self.ste, seed=self.seed, head_gates=self.head_gates,
                                       min_heads=self.min_heads)
        self.hooks = apply_gates(model, self.gates)
        with torch.no_grad():
            self.lambda1.data = self.lambda1.data.to(device)
            self.lambda2.data = self.lambda2.data.to(device)
        if self.teacher is not None:
            self._attach_teacher(model, device)

    def _attach_teacher(self, model: nn.Module, device: torch.device) -> None:
        teacher = self.teacher
        blocks = len(model.encoder_blocks())
        if len(teacher.encoder_blocks()) != blocks:
            raise ValueError(f"the distillation teacher has {len(teacher.encoder_blocks())} encoder blocks, "
                             f"the student {blocks}: they must have the same number")
        teacher.to(device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        if self.distill_layers is None:
            self.distill_layers = default_distill_layers(blocks)
        self._student_states = HiddenStateRecorder(model, self.distill_layers)
        self._teacher_states = HiddenStateRecorder(teacher, self.distill_layers, always=True)
        self._input_hook = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)

    def _record_inputs(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if model.training:
            self._inputs = (args, dict(kwargs))

    def trainable_modules(self) -> list[nn.Module]:
        return [self.gates]

    def parameter_groups(self, model: nn.Module, config: OptimizerSettings) -> list[dict]:
        return super().parameter_groups(model, config) + [
            # Gates and λ: no weight decay (it would pull them to 0, i.e. to a 50 % drop rate
            # and to no constraint) and no clipping (see the module docstring).
            *self.gate_groups(),
            {"params": [self.lambda1, self.lambda2], "lr": self.lambda_lr, "weight_decay": 0.0, "clip_grad": False},
        ]

    def gate_groups(self) -> list[dict]:
        """The gates' optimiser groups: one for all, or one per gate type with its own lr."""
        if not isinstance(self.gate_lr, dict):
            return [{"params": list(self.gates.parameters()), "lr": self.gate_lr, "weight_decay": 0.0,
                     "clip_grad": False}]
        return [{"params": params, "lr": self.gate_lr[kind], "weight_decay": 0.0, "clip_grad": False}
                for kind, params in gate_parameters_by_type(self.gates).items()]

    def before_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.current_target = target_at(step, total_steps, self.target, self.target_warmup_fraction)

    def extra_loss(self, model: nn.Module, step: int, total_steps: int) -> Optional[torch.Tensor]:
        expected = self.gates.expected_sparsity()
        penalty = lagrangian(expected, self.current_target, self.lambda1, self.lambda2)
        self.figures = {"expected_sparsity": expected.item(), "lagrangian": penalty.item()}
        if self.teacher is None:
            return penalty
        distill = self._distillation(model)
        if distill is None:
            return penalty
        self.figures["distill"] = distill.item()
        return penalty + self.distill_weight * distill

    def _distillation(self, model: nn.Module) -> Optional[torch.Tensor]:
        student = self._student_states.pop()
        if self._inputs is None or not student:
            return None
        args, kwargs = self._inputs
        self._inputs = None
        with torch.no_grad():
            self.teacher(*args, **kwargs)
        teacher = self._teacher_states.pop()
        lengths = kwargs.get("lengths", args[1] if len(args) > 1 else None)
        first = next(iter(student.values()))                                        # (B, T, C)
        frames = first.shape[1]
        frame_mask = None
        if lengths is not None:
            frame_lengths = model.frame_lengths(lengths.to(first.device).long()).clamp(max=frames)
            frame_mask = torch.arange(frames, device=frame_lengths.device)[None, :] < frame_lengths[:, None]
        return distillation_loss(student, teacher, frame_mask)

    def after_step(self, model: nn.Module, step: int, total_steps: int,
                   optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        figures = {"step": step, "target": self.current_target, "lambda1": self.lambda1.item(),
                   "lambda2": self.lambda2.item(), **self.figures}
        if self.history_every and (step % self.history_every == 0 or step == total_steps):
            figures["deployed_sparsity"] = self.gates.deployed_sparsity()
            self.history.append(figures)
        shown = {"exp_sp": f"{figures.get('expected_sparsity', 0.0):.3f}", "t": f"{self.current_target:.3f}",
                 "l1": f"{figures['lambda1']:.3f}", "l2": f"{figures['lambda2']:.3f}"}
        if "distill" in figures:
            shown["distill"] = f"{figures['distill']:.3f}"
        return shown

    def finish(self, model: nn.Module) -> None:
        before = self.gates.deployed_sparsity()
        shift = self.gates.calibrate(self.target) if self.calibrate else 0.0
        masks = self.gates.deterministic_masks()
        record = self.compression_record()
        record.update(sparsity_before_calibration=before, calibration_shift=shift)
        self.pruned_model = prune_with_masks(model, masks).eval()
        self.pruned_model.compression = record
        self.detach(model)
        fold_masks_(model, masks)
        model.compression = dict(record)

    def detach(self, model: Optional[nn.Module] = None) -> None:
        """Remove every hook this method put on the model and the teacher (the gates stay)."""
        for recorder in (self._student_states, self._teacher_states):
            if recorder is not None:
                recorder.remove()
        if self._input_hook is not None:
            self._input_hook.remove()
        if self.hooks is not None:
            self.hooks.remove()
        self._student_states = self._teacher_states = self._input_hook = self.hooks = None

    @torch.no_grad()
    def compression_record(self) -> dict:
        """Plain-data summary for `model.compression` (saved with the checkpoint)."""
        gates = self.gates
        return {
            "method": "l0", "target_sparsity": self.target, "ste": self.ste,
            "expected_sparsity": float(gates.expected_sparsity()), "sparsity": gates.deployed_sparsity(),
            "sparsity_definition": "1 - kept/all parameters (weights and biases) of q, k, v, out, fc1, fc2",
            "prunable_params": gates.full_num_parameters(), "prunable_params_kept": gates.deployed_num_parameters(),
            "lambda1": self.lambda1.item(), "lambda2": self.lambda2.item(),
            "gate_lr": self.gate_lr, "lambda_lr": self.lambda_lr, "calibrate": self.calibrate,
            "head_gates": self.head_gates, "min_heads": self.min_heads,
            "target_warmup_fraction": self.target_warmup_fraction,
            "distill_layers": self.distill_layers if self.teacher is not None else None,
        }

    def state_dict(self) -> dict:
        return {"gates": {k: v.detach().cpu() for k, v in self.gates.state_dict().items()},
                "lambda1": self.lambda1.item(), "lambda2": self.lambda2.item(),
                "current_target": self.current_target, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore into the existing gate and λ parameters (the optimiser holds those)."""
        self.gates.load_state_dict(state["gates"])
        with torch.no_grad():
            self.lambda1.fill_(state["lambda1"])
            self.lambda2.fill_(state["lambda2"])
        self.current_target = state["current_target"]
        self.history = list(state["history"])


# ========================================================================================
# Folding the masks and removing the pruned units
# ========================================================================================

@torch.no_grad()
def fold_attention(a: AttentionWeights, masks: BlockMasks) -> AttentionWeights:
    """New weights (same shapes) computing exactly what attention `a` computes under `masks`,
    with every parameter that `prune_with_masks` removes set to 0:

    W_q rows and b_q ← ·m_q (q·k then carries the mask); W_out columns ← ·m_v (the context
    enters out_proj linearly). Then zeroed: W_k rows and b_k where m_q = 0, W_v rows and b_v
    where m_v = 0, and all q/k rows of heads that keep no value dim (they are removed)."""
    m_q = masks.query.to(a.q_weight)
    m_v = masks.value.to(a.v_weight)
    head_alive = torch.zeros_like(m_q)
    for qk_slice, v_slice in zip(head_slices(a.qk_head_dims), head_slices(a.v_head_dims)):
        head_alive[qk_slice] = float(bool((m_v[v_slice] != 0).any()))
    q_scale = m_q * head_alive
    k_keep = (q_scale != 0).to(m_q)
    v_keep = (m_v != 0).to(m_v)
    return AttentionWeights(
        q_weight=a.q_weight * q_scale[:, None], q_bias=a.q_bias * q_scale,
        k_weight=a.k_weight * k_keep[:, None], k_bias=None if a.k_bias is None else a.k_bias * k_keep,
        v_weight=a.v_weight * v_keep[:, None], v_bias=a.v_bias * v_keep,
        out_weight=a.out_weight * m_v[None, :], out_bias=a.out_bias.clone(),
        qk_head_dims=list(a.qk_head_dims), v_head_dims=list(a.v_head_dims))


@torch.no_grad()
def fold_feed_forward(f: FeedForwardWeights, masks: BlockMasks) -> FeedForwardWeights:
    """As `fold_attention` for an FFN: W_fc2 columns ← ·m_f (after the GELU); W_fc1 rows and
    b_fc1 zeroed where m_f = 0."""
    m_f = masks.ffn.to(f.fc1_weight)
    f_keep = (m_f != 0).to(m_f)
    return FeedForwardWeights(fc1_weight=f.fc1_weight * f_keep[:, None], fc1_bias=f.fc1_bias * f_keep,
                              fc2_weight=f.fc2_weight * m_f[None, :], fc2_bias=f.fc2_bias.clone())


def _kept_within_heads(mask: torch.Tensor, widths: Sequence[int]) -> list[list[int]]:
    """Per head, the within-head indices whose mask value is non-zero."""
    return [torch.nonzero(mask[s] != 0).flatten().tolist() for s in head_slices(widths)]


def _groups(model: PrunableModel, masks: Sequence[BlockMasks]):
    groups = gate_groups(model.structured_units())
    if len(masks) != len(groups):
        raise ValueError(f"{len(masks)} block masks for a model with {len(groups)} gate groups")
    return zip(groups, masks)


@torch.no_grad()
def fold_masks_(model: PrunableModel, masks: Sequence[BlockMasks]) -> None:
    """In place: fold `masks` into `model`'s weights (`fold_attention`, `fold_feed_forward`);
    the shapes stay dense, the pruned units become exact zeros. Remove the gate hooks before
    using the model."""
    for (attention, ffn), group_masks in _groups(model, masks):
        a = fold_attention(attention.weights(), group_masks)
        pairs = [(attention.q_proj, a.q_weight, a.q_bias), (attention.k_proj, a.k_weight, a.k_bias),
                 (attention.v_proj, a.v_weight, a.v_bias), (attention.out_proj, a.out_weight, a.out_bias)]
        if ffn is not None:
            f = fold_feed_forward(ffn.weights(), group_masks)
            pairs += [(ffn.fc1, f.fc1_weight, f.fc1_bias), (ffn.fc2, f.fc2_weight, f.fc2_bias)]
        for linear, weight, bias in pairs:
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)


@torch.no_grad()
def prune_with_masks(model: PrunableModel, masks: Sequence[BlockMasks]) -> PrunableModel:
    """A new, physically smaller model computing what `model` computes under `masks`:
    fold the mask values into the weights (`fold_attention`, `fold_feed_forward`), then keep,
    per attention module, the q/k dims with m_q ≠ 0 and the value dims with m_v ≠ 0 (heads
    left with none are removed, see `spg.compress.interface.AttentionWeights.keep_head_dims`),
    and per FFN the neurons with m_f ≠ 0, and hand the weights to `model.rebuild`.

    wav2vec2's rebuilt config lists every block's head count, per-head q/k and value widths
    and FFN width (`ModelConfig.layer_qk_head_dims`, ...); `spg.wav2vec2.model.Attention`
    packs the heads' dims one after the other and zero-pads them to the widest head of the
    block at run time, so attention stays one batched call. The attention scale stays
    1/sqrt(unpruned head width), as in training. Whisper's heads are whole (no dim gates).
    `model` is not modified; it may carry gate hooks (they are not copied)."""
    weights: dict[str, ModuleWeights] = {}
    for (attention, ffn), group_masks in _groups(model, masks):
        a = fold_attention(attention.weights(), group_masks)
        qk_dims = _kept_within_heads(group_masks.query, a.qk_head_dims)
        v_dims = _kept_within_heads(group_masks.value, a.v_head_dims)
        weights[attention.name] = a.keep_head_dims(qk_dims, v_dims)
        if ffn is not None:
            units = torch.nonzero(group_masks.ffn != 0).flatten().tolist()
            weights[ffn.name] = fold_feed_forward(ffn.weights(), group_masks).keep_units(units)
    return model.rebuild(weights)


@torch.no_grad()
def finalize(model: PrunableModel, gates: L0Gates) -> PrunableModel:
    """The deliverable: a new, smaller model that computes what the gated `model` computes
    in eval mode (deterministic masks, soft values folded, see `prune_with_masks`). Its
    prunable layers have exactly `gates.deployed_num_parameters()` parameters, which equals
    `gates.expected_num_parameters()` when the gates are saturated (every P(z ≠ 0) is 0 or
    1). It saves, loads (`spg.save` / `spg.load`) and evaluates like any other model.
    `model.compression` is copied; callers add their record."""
    return prune_with_masks(model, gates.deterministic_masks())
