"""The one training loop that every method shares (dense fine-tuning, SPG, UMP, mixed, L0).

This is the glue module: unlike the algorithm modules it imports several siblings. A
compression method plugs in through a small `Method` object (`spg.compress.interface`: extra
loss, extra parameter groups, a hook after each step, its own resumable state), and the
model family through an `Objective` (CTC for wav2vec2/HuBERT and Whisper's encoder with a
CTC head in `spg.ctc_training`; Whisper's decoder cross-entropy in `spg.whisper.training`);
the loop itself never changes and imports no model family.

What the loop guarantees:
  * AdamW with linear warm-up then linear decay to 0 (the SPG paper's schedule);
  * a non-finite loss is reported and skipped, never written into the weights; weights that
    stop being finite anyway stop the run with `NonFiniteWeightsError` (checked after every
    optimiser step) before any checkpoint is overwritten with them;
  * checkpoints are written atomically (temp file, then rename) every `save_every` steps, and
    `resume` continues from one exactly: step, schedule, optimiser, RNG, batch order and
    the method's state. A resume state holds only tensors and plain data and is read with
    `torch.load(weights_only=True)` (nothing in it is executed); a resume whose settings
    differ from the stored ones is refused (`spg.resume.ResumeMismatchError`), naming each one;
  * the objective may freeze part of the model before training (CTC: the conv front end,
    which the papers never prune, and cache its outputs);
  * data-parallel training with PyTorch DDP when `torch.distributed` is initialised (e.g.
    under `torchrun`): every rank sees different batches, gradients are averaged by DDP, so
    weights, gates and a method's controller stay identical on every rank.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from spg.data import AudioCache, Utterance, length_sorted_batches
from spg.checkpoint import CheckpointError, non_finite_entries, plain_data
from spg.files import atomic_write
from spg.compress.interface import Method, PrunableModel
from spg.resume import check_resume_settings, load_resume_state


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4                 # SPG paper: AdamW, lr 2e-4
    warmup_fraction: float = 0.1     # SPG paper: linear warm-up over the first 10 % of steps
    weight_decay: float = 0.01       # not specified by the paper; AdamW's usual value
    grad_clip: float = 5.0           # not specified by the paper; guards rare CTC spikes (0: no clipping)
    # CTC's reduction: "mean" (each utterance's loss divided by its target length, then
    # averaged; ours) or "sum" (summed over the batch, HF's ctc_loss_reduction="sum", which
    # the SPG authors' code uses and their η values go with)
    loss_reduction: str = "mean"
    freeze_feature_extractor: bool = True
    cache_features: bool = True      # only with a frozen extractor, and only for a small corpus
    max_cached_hours: float = 10.0   # above this, audio and features are re-read/re-computed each step
    feature_cache_dir: Optional[str] = None   # also keep cached features on disk here, for repeated runs
    save_every: int = 200
    eval_every: int = 0              # 0: no evaluation during training
    seed: int = 0


# ----------------------------------------------------------------------------------------
# Objective plug-in: what the loop minimises, per model family
# ----------------------------------------------------------------------------------------

class Objective:
    """How the loop turns a list of utterance indices into a loss, for one model family.

    `spg.ctc_training.CTCObjective` is the CTC one (wav2vec2/HuBERT, Whisper's encoder with a
    CTC head); `spg.whisper.training.WhisperObjective` gives Whisper its teacher-forced decoder
    loss. The loop calls `freeze` once before the model is wrapped for data parallelism (a
    frozen parameter must not be registered with DDP), `prepare` once after (e.g. to cache
    features), then `loss` every step, `train_mode` whenever the model goes back to training,
    `dev_wer` for `eval_every`, and `checkpoint_entries` with every checkpoint."""

    def freeze(self, model: nn.Module, config: TrainConfig) -> None:
        """Set requires_grad=False on whatever `config` says is not trained."""

    def prepare(self, model: nn.Module, audio: AudioCache, config: TrainConfig, device: torch.device,
                in_memory: bool, progress: bool) -> None:
        """One-off work before the first step (`in_memory`: the corpus is small enough to cache)."""

    def loss(self, model: nn.Module, audio: AudioCache, indices: Sequence[int], device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def dev_wer(self, model: nn.Module, audio: AudioCache, device: torch.device) -> float:
        raise NotImplementedError

    def checkpoint_entries(self, model: nn.Module) -> dict:
        """Plain data the resume state stores beside the weights to say which model they belong
        to (the families' objectives store the model's config and vocabulary as "config" and
        "vocab"); none by default."""
        return {}


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

class NonFiniteWeightsError(RuntimeError):
    """The weights stopped being finite during training (the run is stopped, nothing saved)."""


@contextlib.contextmanager
def naming_write_errors(path: str | Path):
    """Re-raise an OSError from writing `path` (whose own filename may be missing or be the
    temporary file's) as one that names `path`: "cannot write PATH: no space left on device".
    torch.save's writer turns the OSError of a failed write (a full disk, `ulimit -f`) into a
    RuntimeError raised while handling it; that one is re-raised the same way, and one raised
    while handling Ctrl-C as the KeyboardInterrupt it was."""
    try:
        yield
    except (OSError, RuntimeError) as raised:
        error = raised
        while error is not None and not isinstance(error, (OSError, KeyboardInterrupt)):   # torch's: its context
            error = error.__cause__ or error.__context__
        if error is None:
            raise
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(*error.args) from None
        if error.errno == errno.ENOSPC:
            reason = "no space left on device"
        else:
            reason = error.strerror or str(error)
            if error.filename is not None and os.fspath(error.filename) != os.fspath(path):
                reason += f" ({error.filename})"
        raise OSError(error.errno, f"cannot write {path}: {reason}") from raised


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through `spg.files.atomic_write` (temp file, fsync, rename onto `path`);
    an OSError (a full disk) names `path`, and the file already there stays as it was."""
    with naming_write_errors(path):
        atomic_write(os.fspath(path), lambda file: torch.save(obj, file))


def learning_rate_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Linear warm-up to 1 over the first `warmup_fraction` of steps, then linear decay to 0."""
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


# ----------------------------------------------------------------------------------------
# Data parallelism
# ----------------------------------------------------------------------------------------

def distributed_rank() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingStep(nn.Module):
    """One forward of a training step: the objective's loss plus the method's extra loss.

    The loop calls this module (or DDP wrapped around it) so that, under data parallelism, one
    forward produces every loss term and DDP sees every trainable parameter: the model's and
    the method's own (`Method.trainable_modules`). DDP runs with find_unused_parameters because
    layerdrop skips whole blocks, so some parameters get no gradient in a given step."""

    def __init__(self, model: nn.Module, method: Method, objective: Objective, audio: AudioCache):
        super().__init__()
        self.model = model
        self.method_modules = nn.ModuleList(method.trainable_modules())
        # plain attributes, not modules: the method's parameters are listed above
        self.method, self.objective, self.audio = method, objective, audio

    def forward(self, indices: Sequence[int], step: int, total_steps: int):
        device = next(self.model.parameters()).device
        loss = self.objective.loss(self.model, self.audio, indices, device)
        extra = self.method.extra_loss(self.model, step, total_steps)
        return loss, extra


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (a collective: every rank must call it)."""
    if distributed_rank()[1] == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps_done: int
    skipped_steps: int
    seconds: float
    loop_seconds: float = 0.0      # the optimiser steps alone (no setup, caching or final calibration)
    history: list[dict] = field(default_factory=list)


ESTIMATE_AFTER_STEPS = 20       # the loop prints how long the rest will take after this many steps


def time_estimate(seconds: float, steps_done: int, steps_left: int) -> str:
    """One line: how long the remaining steps take at the speed of the first ones."""
    left = seconds / steps_done * steps_left
    finish = time.strftime("%H:%M", time.localtime(time.time() + left))
    return (f"{seconds / steps_done:.2f} s per step: the remaining {steps_left} steps take about "
            f"{left / 60:.1f} min (until about {finish}), then saving and evaluation")


def train(model: nn.Module, train_utterances: Sequence[Utterance], config: TrainConfig, *,
          objective: Objective, method: Optional[Method] = None,
          device: torch.device = torch.device("cpu"),
          checkpoint_path: Optional[str | Path] = None, resume: bool = False,
          dev_utterances: Optional[Sequence[Utterance]] = None,
          progress: bool = True, stop_after_steps: Optional[int] = None,
          settings: Optional[dict] = None) -> TrainResult:
    """Fine-tune `model` for `config.steps` optimiser steps on `objective`'s loss (the model
    family's: `spg.ctc_training.CTCObjective()` for a CTC model, `spg.whisper.training.
    WhisperObjective()` for Whisper) plus `method`'s loss.

    The `Method` hooks (`spg.compress.interface`), in the order the loop calls them:
    `attach` once; `parameter_groups` for the optimiser; `load_state_dict` on resume; per
    step `before_step`, `extra_loss` (in `TrainingStep`), `after_step`; `state_dict` with
    every checkpoint; `finish` once the last step is done.

    `checkpoint_path` receives a resumable checkpoint every `config.save_every` steps and at
    the end; with `resume=True` training continues from it. `stop_after_steps` ends this call
    early (the checkpoint is still written), to run a long job in several parts. `settings`
    (plain data, e.g. the command line's options) is stored with the checkpoint; a resume
    is refused (`spg.resume.ResumeMismatchError`) unless it, `config` (but
    `spg.resume.RESUMABLE_FIELDS`) and the method's name are the stored ones. Training stops with `NonFiniteWeightsError` when a
    weight stops being finite; the last checkpoint is not overwritten then.

    Under torch.distributed (every rank calls `train` with the same arguments) each optimiser
    step consumes `world_size` batches of `config.batch_size`, one per rank, and DDP averages
    the gradients. Only rank 0 writes checkpoints, evaluates and shows progress."""
    method = method or Method()
    rank, world_size = distributed_rank()
    model.to(device)
    method.attach(model)
    started = time.time()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    state = read_resume_state(checkpoint_path, device) if resume else None

    objective.freeze(model, config)
    # built before the resume check, which compares its hyperparameters with the stored ones; the
    # methods restore their state into the parameters it holds
    optimizer = build_optimizer(model, method, config)
    if state is not None:
        lr_factor = learning_rate_factor(state["step"] - 1, config.steps, config.warmup_fraction) \
            if state["step"] else 1.0         # the schedule's factor at the stored state's last step
        check_resume_settings(state, checkpoint_path, asdict(config), method_name=method.name, settings=settings,
                              optimizer=optimizer, lr_factor=lr_factor)
        restore_weights(state, model, method, checkpoint_path)   # before caching features: they depend on them
    # Keeping a corpus in memory pays off for the built-in 2 h; LibriSpeech train-clean-100 would
    # need ~11 GB of int16 audio and ~18 GB of fp16 features, so large corpora stream from disk.
    small_corpus = sum(u.seconds for u in train_utterances) / 3600 <= config.max_cached_hours
    audio = AudioCache(train_utterances, keep=small_corpus)
    network = data_parallel(TrainingStep(model, method, objective, audio), device, world_size)
    objective.prepare(model, audio, config, device, in_memory=small_corpus, progress=progress)
    dev_audio = AudioCache(dev_utterances) if dev_utterances else None
    loop = LoopState() if state is None else restore_loop(state, optimizer, checkpoint_path)
    if world_size > 1:
        torch.manual_seed(config.seed * 1_000_003 + loop.step * 1009 + rank)   # own dropout/SpecAugment per rank
    check_weights_finite = FiniteWeightsCheck(model, method, optimizer, device)

    objective.train_mode(model)
    bar = tqdm(total=config.steps, initial=loop.step, desc=method.name, disable=not progress or rank != 0,
               dynamic_ncols=True)
    end_step = config.steps if stop_after_steps is None else min(config.steps, loop.step + stop_after_steps)
    loop_started, first_step = time.time(), loop.step
    try:
        while loop.step < end_step:
            batches = epoch_batches(audio, config, loop.epoch, world_size)
            # Every rank shuffles identically and takes its own slot of each group of world_size batches.
            while loop.position + world_size <= len(batches) and loop.step < end_step:
                indices = batches[loop.position + rank]
                loop.position += world_size
                done = optimizer_step(network, model, method, optimizer, audio, indices, loop, config, device, bar)
                if done is None:       # a non-finite loss: the step is counted, nothing else happens
                    continue
                loss, shown = done
                check_weights_finite(loop, optimizer, checkpoint_path)
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
                if loop.step - first_step == ESTIMATE_AFTER_STEPS and end_step - loop.step > ESTIMATE_AFTER_STEPS \
                        and rank == 0 and progress:
                    bar.write(time_estimate(time.time() - loop_started, loop.step - first_step, end_step - loop.step))
                if loop.step % 10 == 0 or loop.step == config.steps:
                    loop.history.append({"step": loop.step, "loss": loss.item(),
                                         **{k: v for k, v in shown.items() if k != "loss"}})
                if config.eval_every and dev_audio is not None and loop.step % config.eval_every == 0 and rank == 0:
                    evaluate_dev(objective, model, dev_audio, device, loop, bar)
                if config.save_every and loop.step % config.save_every == 0:
                    save_resume_state(checkpoint_path, rank, loop, model, optimizer, method, objective, config,
                                      settings)
            if loop.position + world_size > len(batches):
                loop.epoch, loop.position = loop.epoch + 1, 0
    finally:
        bar.close()        # also when training stops with an error: its line then starts clean
    loop_seconds = time.time() - loop_started
    save_resume_state(checkpoint_path, rank, loop, model, optimizer, method, objective, config, settings)
    if loop.step >= config.steps:
        method.finish(model)
    model.eval()
    return TrainResult(steps_done=loop.step, skipped_steps=loop.skipped, seconds=time.time() - started,
                       loop_seconds=loop_seconds, history=loop.history)


# --- the loop's steps, in the order `train` takes them -----------------------------------------

@dataclass
class LoopState:
    """Where the loop is. With the weights, the optimiser, the RNGs and the method's state it
    is what a resume state holds (`save_resume_state`)."""
    step: int = 0                  # optimiser steps done (skipped ones included)
    epoch: int = 0
    position: int = 0              # batches of this epoch already taken, by all ranks together
    skipped: int = 0               # steps whose loss or gradient was not finite
    history: list[dict] = field(default_factory=list)
    saved_step: Optional[int] = None   # the step of the checkpoint last written or resumed from


def read_resume_state(checkpoint_path: Optional[str | Path], device: torch.device) -> dict:
    """`load_resume_state` of `checkpoint_path`, which `resume=True` requires."""
    if checkpoint_path is None:
        raise FileNotFoundError("--resume given but there is no checkpoint path")
    return load_resume_state(checkpoint_path, map_location=device)


def build_optimizer(model: nn.Module, method: Method, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (the SPG paper's optimiser) over the method's parameter groups (`Method.
    parameter_groups`: the model's weights, and the method's own parameters with their
    settings); each group keeps its `base_lr`, which the schedule scales before every step."""
    optimizer = torch.optim.AdamW(method.parameter_groups(model, config), lr=config.lr)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return optimizer


def restore_weights(state: dict, model: nn.Module, method: Method, path: str | Path) -> None:
    """The model's weights and the method's state from a resume state (CheckpointError when
    they do not fit this model and method)."""
    try:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its model or method state does not fit this model and "
                              f"method: {error_line(error)}") from None


def restore_loop(state: dict, optimizer: torch.optim.Optimizer, path: str | Path) -> LoopState:
    """The optimiser, both RNGs and the loop's position from a resume state."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        random.setstate(state["python_rng"])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its optimiser or RNG state does not fit this run: "
                              f"{error_line(error)}") from None
    return LoopState(step=state["step"], epoch=state["epoch"], position=state["position"],
                     skipped=state["skipped"], history=state["history"], saved_step=state["step"])


def error_line(error: BaseException) -> str:
    """The first line of `error`'s message (its repr when it has none), for a one-line CheckpointError."""
    return str(error).splitlines()[0] if str(error) else repr(error)


def data_parallel(step: TrainingStep, device: torch.device, world_size: int) -> nn.Module:
    """`step` wrapped in PyTorch DDP when there are several ranks, else `step` itself. DDP
    broadcasts rank 0's parameters and buffers now (before features are cached from them) and
    averages gradients in backward(); the standard PyTorch recipe, nothing home-made."""
    if world_size == 1:
        return step
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


class FiniteWeightsCheck:
    """Raises NonFiniteWeightsError, naming the first broken parameter, when a weight stops
    being finite after an optimiser step.

    One sum per parameter, stacked (a NaN or inf anywhere makes the total non-finite), then a
    single isfinite; only when that fails is each parameter looked at (a finite total that
    overflowed is a false alarm and training goes on)."""

    def __init__(self, model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, device: torch.device):
        self.device = device
        self.checked = [p for group in optimizer.param_groups for p in group["params"]]
        self.names = {id(p): n for n, p in model.named_parameters()}
        for i, module in enumerate(method.trainable_modules()):
            self.names.update({id(p): f"{method.name} module {i}: {n}" for n, p in module.named_parameters()})

    def __call__(self, loop: LoopState, optimizer: torch.optim.Optimizer,
                 checkpoint_path: Optional[str | Path]) -> None:
        if not self.checked:
            return
        with torch.no_grad():
            total = torch.stack([p.detach().sum(dtype=torch.float32).to(self.device) for p in self.checked]).sum()
        if bool(torch.isfinite(total)):
            return
        for index, parameter in enumerate(self.checked):
            bad = int((~torch.isfinite(parameter.detach())).sum())
            if bad:
                name = self.names.get(id(parameter), f"optimiser parameter {index}")
                kept = (f"the last checkpoint, {checkpoint_path} at step {loop.saved_step}, was left as it was"
                        if checkpoint_path is not None and loop.saved_step is not None else "no checkpoint was written")
                raise NonFiniteWeightsError(
                    f"step {loop.step - 1}: the weights are no longer finite after its optimiser step: {name} has "
                    f"{bad} NaN/inf of {parameter.numel()} values (lr {optimizer.param_groups[0]['lr']:.3g}); "
                    f"training stopped and {kept}; try a lower --lr")


def epoch_batches(audio: AudioCache, config: TrainConfig, epoch: int, world_size: int) -> list[list[int]]:
    """This epoch's batches of utterance indices: length-sorted, shuffled with a seed of
    `config.seed` and `epoch` (identical on every rank, and again on resume)."""
    batches = length_sorted_batches(audio.utterances, batch_size=config.batch_size, shuffle=True,
                                    seed=config.seed * 100_003 + epoch)
    if len(batches) < world_size:
        raise ValueError(f"{len(batches)} batches per epoch cannot feed {world_size} ranks; "
                         f"use a smaller batch size or more data")
    return batches


def optimizer_step(network: nn.Module, model: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
                   audio: AudioCache, indices: Sequence[int], loop: LoopState, config: TrainConfig,
                   device: torch.device, bar: tqdm) -> Optional[tuple[torch.Tensor, dict]]:
    """One step on one batch: the scheduled learning rate, `Method.before_step`, the forward
    (`TrainingStep`: objective loss + `Method.extra_loss`), backward, gradient clipping, the
    AdamW update, `Method.after_step`; `loop.step` advances. Returns (the objective's loss,
    what the progress bar shows), or None when the loss was not finite on some rank: then
    every rank skips the step (a rank that skipped backward() would leave DDP's all-reduce
    hanging). A non-finite gradient skips the update only."""
    factor = learning_rate_factor(loop.step, config.steps, config.warmup_fraction)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    method.before_step(model, loop.step, config.steps)
    loss, extra = network(indices, loop.step, config.steps)
    total = loss if extra is None else loss + extra
    optimizer.zero_grad(set_to_none=True)
    if not _all_ranks_agree(bool(torch.isfinite(total)), device):
        loop.skipped += 1
        first_ids = [audio.utterances[i].id for i in indices[:3]]
        bar.write(f"step {loop.step}: non-finite loss ({total.item()}); batch {first_ids}... skipped")
        loop.step += 1
        bar.update(1)
        return None
    total.backward()
    if clip_gradients(optimizer, config.grad_clip):
        optimizer.step()
    else:
        loop.skipped += 1
        optimizer.zero_grad(set_to_none=True)
        bar.write(f"step {loop.step}: non-finite gradient; update skipped")
    loop.step += 1
    shown = {"loss": f"{loss.item():.3f}", "lr": f"{optimizer.param_groups[0]['lr']:.2e}"}
    shown.update(method.after_step(model, loop.step, config.steps, optimizer=optimizer))
    return loss, shown


def clip_gradients(optimizer: torch.optim.Optimizer, grad_clip: float) -> bool:
    """Clip the gradients of the groups that allow it (`clip_grad`, default True) to a total
    norm of `grad_clip` (0: the norm only, no clipping); True when every gradient is finite."""
    gradient_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups if g.get("clip_grad", True) for p in g["params"]],
        grad_clip if grad_clip > 0 else float("inf"))
    unclipped = [p for g in optimizer.param_groups if not g.get("clip_grad", True) for p in g["params"]]
    return bool(torch.isfinite(gradient_norm)) and \
        all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in unclipped)


def evaluate_dev(objective: Objective, model: nn.Module, dev_audio: AudioCache, device: torch.device,
                 loop: LoopState, bar: tqdm) -> None:
    """`config.eval_every`: the objective's dev WER, into the history and on the progress bar."""
    dev_wer = objective.dev_wer(model, dev_audio, device)
    loop.history.append({"step": loop.step, "dev_wer": dev_wer})
    bar.write(f"step {loop.step}: dev WER {100 * dev_wer:.2f}%")
    objective.train_mode(model)


def save_resume_state(path: Optional[str | Path], rank: int, loop: LoopState, model: nn.Module,
                      optimizer: torch.optim.Optimizer, method: Method, objective: Objective,
                      config: TrainConfig, settings: Optional[dict]) -> None:
    """Write the resume state to `path` atomically (rank 0 only; nothing without a path):
    only plain data and tensors, so `load_resume_state` reads it back with weights_only=True.
    The objective adds what says which model the weights belong to (`checkpoint_entries`)."""
    if path is None or rank != 0:
        return
    atomic_torch_save(plain_data({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict(),
        "step": loop.step, "epoch": loop.epoch, "position": loop.position, "skipped": loop.skipped,
        "history": loop.history, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "train_config": asdict(config), "method_name": method.name, "settings": settings,
        **objective.checkpoint_entries(model),
    }), path)
    loop.saved_step = loop.step


# ----------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------

def sparsity_report(model: PrunableModel) -> dict:
    """Zero fraction of the prunable matrices (`model.prunable_linears()`): overall, per layer
    and per matrix, for any model family. Layers are those of `model.structured_units()`
    (every matrix belongs to one attention module or FFN, which knows its stack and layer),
    keyed by the layer index when the model has one stack (wav2vec2: 0, 1, ...) and by
    "stack.layer" when it has several (Whisper: "encoder.0", ..., "decoder.3")."""
    units = model.structured_units()
    one_stack = len({u.stack for u in units}) == 1
    layer_of = {id(linear): u.layer if one_stack else f"{u.stack}.{u.layer}" for u in units for linear in u.linears()}
    per_matrix: dict[str, float] = {}
    per_layer: dict = {}
    zeros_total = size_total = 0
    for name, linear in model.prunable_linears():
        zeros = int((linear.weight == 0).sum())
        size = linear.weight.numel()
        per_matrix[name] = zeros / size if size else 0.0
        counts = per_layer.setdefault(layer_of[id(linear)], [0, 0])
        counts[0] += zeros
        counts[1] += size
        zeros_total += zeros
        size_total += size
    return {"sparsity": zeros_total / size_total if size_total else 0.0,
            "per_block_sparsity": {layer: z / s if s else 0.0 for layer, (z, s) in per_layer.items()},
            "per_matrix_sparsity": per_matrix,
            "prunable_params": size_total}
