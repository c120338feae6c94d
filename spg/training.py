"""The one training loop that every method shares (dense fine-tuning, SPG, UMP, mixed, L0).

This is the glue module: unlike the algorithm modules it imports several siblings. A
compression method plugs in through a small `Method` object (extra loss, extra parameter
groups, a hook after each step, its own resumable state), and the model family through an
`Objective` (CTC for wav2vec2/HuBERT here; Whisper's decoder cross-entropy in
`spg.whisper_training`); the loop itself never changes.

What the loop guarantees:
  * AdamW with linear warm-up then linear decay to 0 (the SPG paper's schedule);
  * a non-finite loss is reported and skipped, never written into the weights;
  * checkpoints are written atomically (temp file, then rename) every `save_every` steps, and
    `resume` continues from one exactly: step, schedule, optimiser, RNG, batch order and
    the method's state;
  * optional frozen, cached feature extractor (the papers never prune it, and caching its
    output roughly halves the cost of a training step on CPU);
  * data-parallel training with PyTorch DDP when `torch.distributed` is initialised (e.g.
    under `torchrun`): every rank sees different batches, gradients are averaged by DDP, so
    weights, gates and a method's controller stay identical on every rank.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from spg.data import AudioCache, Batch, Utterance, length_sorted_batches, make_targets, normalize_waveform
from spg.loading import atomic_write
from spg.model import Wav2Vec2CTC, ctc_greedy_decode
from spg.wer import corpus_scores, error_counts


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4                 # SPG paper: AdamW, lr 2e-4
    warmup_fraction: float = 0.1     # SPG paper: linear warm-up over the first 10 % of steps
    weight_decay: float = 0.01       # not specified by the paper; AdamW's usual value
    grad_clip: float = 5.0           # not specified by the paper; guards rare CTC spikes
    freeze_feature_extractor: bool = True
    cache_features: bool = True      # only with a frozen extractor, and only for a small corpus
    max_cached_hours: float = 10.0   # above this, audio and features are re-read/re-computed each step
    feature_cache_dir: Optional[str] = None   # also keep cached features on disk here, for repeated runs
    save_every: int = 200
    eval_every: int = 0              # 0: no evaluation during training
    seed: int = 0


# ----------------------------------------------------------------------------------------
# Method plug-in
# ----------------------------------------------------------------------------------------

class Method:
    """Dense CTC fine-tuning. Compression methods subclass this.

    The loop calls, in order: `attach` once (before a resumed checkpoint is loaded, so that
    gates/masks exist and their state is restored into them), `parameter_groups` once, then
    per step `before_step` -> forward -> `extra_loss` -> backward/optimiser step ->
    `after_step`, and `finish` once when the last step is done (not when a run stops early
    to be resumed). A parameter group may carry "clip_grad": False to be left out of the
    gradient-norm clipping."""

    name = "dense"

    def attach(self, model: Wav2Vec2CTC) -> None:
        """Prepare `model` before training (add gates, prune and fix masks, ...)."""

    def parameter_groups(self, model: Wav2Vec2CTC, config: TrainConfig) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [{"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def before_step(self, model: Wav2Vec2CTC, step: int, total_steps: int) -> None:
        """Called before the forward pass of step `step` (0-based), e.g. to set a temperature."""

    def extra_loss(self, model: Wav2Vec2CTC, step: int, total_steps: int) -> Optional[torch.Tensor]:
        return None

    def after_step(self, model: Wav2Vec2CTC, step: int, total_steps: int,
                   optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Called after every optimiser step (`step` = steps done); returns figures for the
        progress bar. `optimizer` is the loop's, for methods that must touch its state."""
        return {}

    def finish(self, model: Wav2Vec2CTC) -> None:
        """Called once after the last step: turn the trained model into the deliverable."""

    def trainable_modules(self) -> list[nn.Module]:
        """Trainable modules the method keeps outside the model (e.g. L0 gates applied by hooks).
        Data-parallel training wraps them with the model so DDP broadcasts and averages them too."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ----------------------------------------------------------------------------------------
# Objective plug-in: what the loop minimises, per model family
# ----------------------------------------------------------------------------------------

class Objective:
    """How the loop turns a list of utterance indices into a loss, for one model family.

    `CTCObjective` (below) is the wav2vec2/HuBERT one; `spg.whisper_training.WhisperObjective`
    gives Whisper its teacher-forced decoder loss. The loop calls `freeze` once before the
    model is wrapped for data parallelism (a frozen parameter must not be registered with
    DDP), `prepare` once after (e.g. to cache features), then `loss` every step,
    `train_mode` whenever the model goes back to training, and `dev_wer` for `eval_every`."""

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


class CTCObjective(Objective):
    """Mean-reduced CTC on a `Wav2Vec2CTC`, with the conv front end optionally frozen and its
    outputs cached (`TrainConfig.freeze_feature_extractor`, `cache_features`)."""

    def __init__(self) -> None:
        self.features: Optional[FeatureCache] = None
        self.frozen = False

    def freeze(self, model: Wav2Vec2CTC, config: TrainConfig) -> None:
        self.frozen = config.freeze_feature_extractor
        if self.frozen:
            for parameter in model.feature_extractor.parameters():
                parameter.requires_grad_(False)

    def prepare(self, model: Wav2Vec2CTC, audio: AudioCache, config: TrainConfig, device: torch.device,
                in_memory: bool, progress: bool) -> None:
        if self.frozen and config.cache_features and in_memory:
            self.features = FeatureCache(model, audio, device, folder=config.feature_cache_dir, progress=progress)

    def loss(self, model: Wav2Vec2CTC, audio: AudioCache, indices: Sequence[int],
             device: torch.device) -> torch.Tensor:
        if self.features is None:
            batch = audio.batch(indices, normalize=model.config.do_normalize, vocab=model.vocab)
            logits, frame_lengths = forward_batch(model, batch, device)
        else:
            batch = _labels_only(audio, indices, model.vocab)
            logits, frame_lengths = forward_batch(model, batch, device, self.features.batch(indices))
        return ctc_loss(logits, frame_lengths, batch)

    def train_mode(self, model: Wav2Vec2CTC) -> None:
        model.train()
        if self.frozen:
            model.feature_extractor.eval()     # no dropout/norm updates in the frozen front end

    def dev_wer(self, model: Wav2Vec2CTC, audio: AudioCache, device: torch.device) -> float:
        hypotheses = transcribe_corpus(model, audio, device=device, progress=False)
        return error_counts([u.transcript for u in audio.utterances], hypotheses).rate


# ----------------------------------------------------------------------------------------
# Features and batches
# ----------------------------------------------------------------------------------------

class FeatureCache:
    """Frozen feature-extractor outputs, computed once per utterance and kept as float16.

    With `folder`, the features are also stored on disk under a key made of the front end's
    weights and the audio files' names, sizes and modification times, so repeated runs on the
    same corpus (a sparsity sweep) skip the recomputation; any change gives a new key."""

    def __init__(self, model: Wav2Vec2CTC, audio: AudioCache, device: torch.device, desc: str = "caching features",
                 folder: Optional[str | Path] = None, progress: bool = True):
        path = None if folder is None else Path(folder) / f"features-{_feature_key(model, audio)}.pt"
        if path is not None and path.exists():
            self.features = torch.load(path, weights_only=True)
            return
        self.features: list[torch.Tensor] = []
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for index in tqdm(range(len(audio.utterances)), desc=desc, leave=False, disable=not progress):
                waveform = audio.waveform(index)
                if model.config.do_normalize:
                    waveform = normalize_waveform(waveform)
                wave = torch.from_numpy(waveform)[None].to(device)
                self.features.append(model.extract_features(wave)[0].to("cpu", torch.float16))  # (T, C)
        model.train(was_training)
        if path is not None:
            atomic_torch_save(self.features, path)

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        frames = max(self.features[i].shape[0] for i in indices)
        channels = self.features[indices[0]].shape[1]
        out = torch.zeros(len(indices), frames, channels)                        # (B, T, C)
        for row, i in enumerate(indices):
            out[row, :self.features[i].shape[0]] = self.features[i].float()
        return out


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and float32 values: equal for equal weights, whatever their dtype on disk."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _feature_key(model: Wav2Vec2CTC, audio: AudioCache) -> str:
    """A digest of everything the cached features depend on."""
    digest = hashlib.sha256(tensors_digest(model.feature_extractor.state_dict()).encode())
    digest.update(repr(model.config.do_normalize).encode())
    for utterance in audio.utterances:
        stat = os.stat(utterance.audio_path)
        digest.update(f"{utterance.audio_path}|{stat.st_size}|{stat.st_mtime_ns}|{utterance.num_samples}".encode())
    return digest.hexdigest()[:20]


def forward_batch(model: Wav2Vec2CTC, batch: Batch, device: torch.device,
                  features: Optional[torch.Tensor] = None):
    lengths = batch.lengths.to(device)
    if features is not None:
        return model(None, lengths, features=features.to(device))
    return model(batch.waveforms.to(device), lengths)


def ctc_loss(logits: torch.Tensor, frame_lengths: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean-reduced CTC (per-utterance loss divided by its target length, then averaged)."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)                   # (T, B, V)
    return F.ctc_loss(log_probs, batch.targets.to(logits.device), frame_lengths,
                      batch.target_lengths.to(logits.device), blank=0, reduction="mean", zero_infinity=True)


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def transcribe_corpus(model: Wav2Vec2CTC, audio: AudioCache, *, batch_size: int = 16,
                      device: torch.device = torch.device("cpu"), progress: bool = True,
                      desc: str = "decoding") -> list[str]:
    """Greedy CTC transcripts of every utterance in `audio`, in corpus order.

    Group-norm ("base") models normalise each conv channel over the whole (padded) time
    axis, so batching changes their output; like HF's reference recipe we decode them one
    utterance at a time. Layer-norm models are exact under padding and are batched."""
    was_training = model.training
    model.eval()
    if model.config.feat_extract_norm == "group":
        batch_size = 1
    batches = length_sorted_batches(audio.utterances, batch_size=batch_size)
    hypotheses: list[str] = [""] * len(audio.utterances)
    for indices in tqdm(batches, desc=desc, leave=False, disable=not progress):
        batch = audio.batch(indices, normalize=model.config.do_normalize, vocab=model.vocab)
        logits, frame_lengths = forward_batch(model, batch, device)
        for index, text in zip(indices, ctc_greedy_decode(logits, frame_lengths, model.vocab)):
            hypotheses[index] = text
    model.train(was_training)
    return hypotheses


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through `spg.loading.atomic_write` (temp file, fsync, rename onto `path`)."""
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


def train(model: nn.Module, train_utterances: Sequence[Utterance], config: TrainConfig, *,
          method: Optional[Method] = None, objective: Optional[Objective] = None,
          device: torch.device = torch.device("cpu"),
          checkpoint_path: Optional[str | Path] = None, resume: bool = False,
          dev_utterances: Optional[Sequence[Utterance]] = None,
          on_eval: Optional[Callable[[int, float], None]] = None,
          progress: bool = True, stop_after_steps: Optional[int] = None) -> TrainResult:
    """Fine-tune `model` for `config.steps` optimiser steps on `objective`'s loss (default
    `CTCObjective()`: a wav2vec2/HuBERT CTC model) plus `method`'s loss.

    `checkpoint_path` receives a resumable checkpoint every `config.save_every` steps and at
    the end; with `resume=True` training continues from it. `stop_after_steps` ends this call
    early (the checkpoint is still written), to run a long job in several parts.

    Under torch.distributed (every rank calls `train` with the same arguments) each optimiser
    step consumes `world_size` batches of `config.batch_size`, one per rank, and DDP averages
    the gradients. Only rank 0 writes checkpoints, evaluates and shows progress."""
    method = method or Method()
    objective = objective or CTCObjective()
    rank, world_size = distributed_rank()
    model.to(device)
    method.attach(model)
    started = time.time()
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    state = None
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise FileNotFoundError(f"--resume given but there is no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if state["train_config"]["steps"] != config.steps:
            raise ValueError(f"{checkpoint_path} was written for {state['train_config']['steps']} steps, "
                             f"not {config.steps}; resume with the same --steps")
        model.load_state_dict(state["model"])     # before caching features: they depend on the weights
        method.load_state_dict(state["method"])

    objective.freeze(model, config)
    # Keeping a corpus in memory pays off for the built-in 2 h; LibriSpeech train-clean-100 would
    # need ~11 GB of int16 audio and ~18 GB of fp16 features, so large corpora stream from disk.
    small_corpus = sum(u.seconds for u in train_utterances) / 3600 <= config.max_cached_hours
    audio = AudioCache(train_utterances, keep=small_corpus)
    # DDP broadcasts rank 0's parameters and buffers now (before features are cached from them)
    # and averages gradients in backward(); the standard PyTorch recipe, nothing home-made.
    network = TrainingStep(model, method, objective, audio)
    if world_size > 1:
        network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
    objective.prepare(model, audio, config, device, in_memory=small_corpus, progress=progress)
    dev_audio = AudioCache(dev_utterances) if dev_utterances else None

    optimizer = torch.optim.AdamW(method.parameter_groups(model, config), lr=config.lr)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    step, epoch, position, skipped = 0, 0, 0, 0
    history: list[dict] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, position, skipped = state["step"], state["epoch"], state["position"], state["skipped"]
        history = state["history"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    if world_size > 1:
        torch.manual_seed(config.seed * 1_000_003 + step * 1009 + rank)   # own dropout/SpecAugment per rank

    def save_checkpoint() -> None:
        if checkpoint_path is None or rank != 0:
            return
        atomic_torch_save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict(),
            "step": step, "epoch": epoch, "position": position, "skipped": skipped, "history": history,
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "train_config": asdict(config), "config": model.config.to_dict(), "vocab": getattr(model, "vocab", None),
        }, checkpoint_path)

    objective.train_mode(model)
    bar = tqdm(total=config.steps, initial=step, desc=method.name, disable=not progress or rank != 0,
               dynamic_ncols=True)
    end_step = config.steps if stop_after_steps is None else min(config.steps, step + stop_after_steps)
    loop_started = time.time()
    while step < end_step:
        batches = length_sorted_batches(audio.utterances, batch_size=config.batch_size, shuffle=True,
                                        seed=config.seed * 100_003 + epoch)
        if len(batches) < world_size:
            raise ValueError(f"{len(batches)} batches per epoch cannot feed {world_size} ranks; "
                             f"use a smaller batch size or more data")
        # Every rank shuffles identically and takes its own slot of each group of world_size batches.
        while position + world_size <= len(batches) and step < end_step:
            indices = batches[position + rank]
            position += world_size
            factor = learning_rate_factor(step, config.steps, config.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            method.before_step(model, step, config.steps)
            loss, extra = network(indices, step, config.steps)
            total = loss if extra is None else loss + extra
            optimizer.zero_grad(set_to_none=True)
            # Ranks skip together: a rank that skipped backward() would leave DDP's all-reduce hanging.
            if not _all_ranks_agree(bool(torch.isfinite(total)), device):
                skipped += 1
                first_ids = [audio.utterances[i].id for i in indices[:3]]
                bar.write(f"step {step}: non-finite loss ({total.item()}); batch {first_ids}... skipped")
                step += 1
                bar.update(1)
                continue
            total.backward()
            gradient_norm = torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups if g.get("clip_grad", True) for p in g["params"]],
                config.grad_clip)
            unclipped = [p for g in optimizer.param_groups if not g.get("clip_grad", True) for p in g["params"]]
            if not torch.isfinite(gradient_norm) or \
                    not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in unclipped):
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                bar.write(f"step {step}: non-finite gradient; update skipped")
            else:
                optimizer.step()
            step += 1
            shown = {"loss": f"{loss.item():.3f}", "lr": f"{optimizer.param_groups[0]['lr']:.2e}"}
            shown.update(method.after_step(model, step, config.steps, optimizer=optimizer))
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if step % 50 == 0 or step == config.steps:
                history.append({"step": step, "loss": loss.item(), **{k: v for k, v in shown.items() if k != "loss"}})
            if config.eval_every and dev_audio is not None and step % config.eval_every == 0 and rank == 0:
                dev_wer = objective.dev_wer(model, dev_audio, device)
                history.append({"step": step, "dev_wer": dev_wer})
                bar.write(f"step {step}: dev WER {100 * dev_wer:.2f}%")
                if on_eval is not None:
                    on_eval(step, dev_wer)
                objective.train_mode(model)
            if checkpoint_path is not None and config.save_every and step % config.save_every == 0:
                save_checkpoint()
        if position + world_size > len(batches):
            epoch, position = epoch + 1, 0
    bar.close()
    loop_seconds = time.time() - loop_started
    save_checkpoint()
    if step >= config.steps:
        method.finish(model)
    model.eval()
    return TrainResult(steps_done=step, skipped_steps=skipped, seconds=time.time() - started,
                       loop_seconds=loop_seconds, history=history)


def _labels_only(audio: AudioCache, indices: Sequence[int], vocab: Sequence[str]) -> Batch:
    """A batch with lengths and targets but no waveforms (features come from the cache)."""
    utterances = [audio.utterances[i] for i in indices]
    targets, target_lengths = make_targets([u.transcript for u in utterances], vocab)
    return Batch(ids=[u.id for u in utterances], waveforms=torch.empty(0),
                 lengths=torch.tensor([u.num_samples for u in utterances]), targets=targets,
                 target_lengths=target_lengths, transcripts=[u.transcript for u in utterances])


# ----------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------

def sparsity_report(model: Wav2Vec2CTC) -> dict:
    """Zero fraction of the prunable matrices: overall, per block, and per matrix."""
    per_matrix: dict[str, float] = {}
    per_block: dict[int, list[int]] = {}
    zeros_total = size_total = 0
    for name, linear in model.prunable_linears():
        zeros = int((linear.weight == 0).sum())
        size = linear.weight.numel()
        per_matrix[name] = zeros / size if size else 0.0
        block = int(name.split(".")[2])
        counts = per_block.setdefault(block, [0, 0])
        counts[0] += zeros
        counts[1] += size
        zeros_total += zeros
        size_total += size
    return {"sparsity": zeros_total / size_total if size_total else 0.0,
            "per_block_sparsity": {b: z / s if s else 0.0 for b, (z, s) in sorted(per_block.items())},
            "per_matrix_sparsity": per_matrix,
            "prunable_params": size_total}


def evaluate_corpus(model: Wav2Vec2CTC, utterances: Sequence[Utterance], *, batch_size: int = 16,
                    device: torch.device = torch.device("cpu"), progress: bool = True, desc: str = "decoding") -> dict:
    """WER/CER with S/D/I counts, hypotheses and real-time factor on one corpus split."""
    audio = AudioCache(utterances)
    for index in range(len(utterances)):   # read audio before the clock starts
        audio.waveform(index)
    started = time.perf_counter()
    hypotheses = transcribe_corpus(model, audio, batch_size=batch_size, device=device, progress=progress, desc=desc)
    seconds = time.perf_counter() - started
    references = [u.transcript for u in utterances]
    audio_seconds = sum(u.seconds for u in utterances)
    return {**corpus_scores(references, hypotheses), "utterances": len(utterances),
            "audio_seconds": audio_seconds, "rtf": seconds / audio_seconds if audio_seconds else 0.0,
            "ids": [u.id for u in utterances], "references": references, "hypotheses": hypotheses}
