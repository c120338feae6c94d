"""CTC fine-tuning and decoding for the shared loop: the objective of every CTC model here.

`spg.training.train` runs any `Method` on any model family; what differs between families is
the loss, given by an `Objective`. This module is the CTC one (Graves et al. 2006, "Connectionist
Temporal Classification"), the loss the SPG and L0 papers fine-tune with:

    logits (T, V), frame_lengths  = model(waveforms, lengths)       one row per utterance
    loss = CTC(log_softmax(logits), character targets, blank = model.blank_id)
           "mean": each utterance's loss / its target length, averaged (ours);
           "sum":  summed over the batch (the SPG authors' HF setting)  (`TrainConfig.loss_reduction`)

with greedy CTC decoding for scoring (`transcribe_corpus`, `evaluate_corpus`).

Why one module for two families rather than `spg/wav2vec2/training.py`: the objective is
shared. wav2vec2/HuBERT (`spg.wav2vec2.model.Wav2Vec2CTC`) and Whisper's encoder with a CTC
head (`spg.whisper.ctc.WhisperCTC`) speak the same interface to it (`model(waveforms, lengths)
-> (logits, frame_lengths)`, `feature_extractor`, `extract_features`, `vocab`, `blank_id`,
`config.do_normalize`), so both train and score through this code; Whisper's
encoder-decoder has its own objective in `spg.whisper.training`.

What else CTC training needs, and the loop does not:
  * the frozen conv front end (the papers never prune or train it) and a cache of its
    outputs (`FeatureCache`; roughly halves the cost of a training step on CPU);
  * a refusal of transcripts that contain the CTC blank as a character
    (`check_labels_avoid_blank`): CTC cannot emit its blank as a label.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spg.data import (AudioCache, Batch, DataError, Utterance, encode_text, length_sorted_batches, make_targets,
                      normalize_waveform)
from spg.training import Objective, TrainConfig, atomic_torch_save
from spg.wav2vec2.model import Wav2Vec2CTC, ctc_greedy_decode
from spg.wer import corpus_scores, error_counts
from spg.whisper.ctc import WhisperCTC

CTCModel = Union[Wav2Vec2CTC, WhisperCTC]     # the models this module trains and decodes


class CTCObjective(Objective):
    """CTC on a `CTCModel` (reduced as `TrainConfig.loss_reduction` says), with the conv
    front end optionally frozen and its outputs cached (`freeze_feature_extractor`,
    `cache_features`)."""

    def __init__(self) -> None:
        self.features: Optional[FeatureCache] = None
        self.frozen = False
        self.reduction = "mean"

    def freeze(self, model: CTCModel, config: TrainConfig) -> None:
        self.reduction = config.loss_reduction
        self.frozen = config.freeze_feature_extractor
        if self.frozen:
            for parameter in model.feature_extractor.parameters():
                parameter.requires_grad_(False)

    def prepare(self, model: CTCModel, audio: AudioCache, config: TrainConfig, device: torch.device,
                in_memory: bool, progress: bool) -> None:
        check_labels_avoid_blank(audio.utterances, model.vocab, model.blank_id)
        self.features = None            # an objective passed to several runs keeps none of the last one's
        if self.frozen and config.cache_features and in_memory:
            self.features = FeatureCache(model, audio, device, folder=config.feature_cache_dir, progress=progress)

    def loss(self, model: CTCModel, audio: AudioCache, indices: Sequence[int],
             device: torch.device) -> torch.Tensor:
        if self.features is None:
            batch = audio.batch(indices, normalize=model.config.do_normalize, vocab=model.vocab)
            logits, frame_lengths = forward_batch(model, batch, device)
        else:
            batch = _labels_only(audio, indices, model.vocab)
            logits, frame_lengths = forward_batch(model, batch, device, self.features.batch(indices))
        return ctc_loss(logits, frame_lengths, batch, self.reduction, blank=model.blank_id)

    def train_mode(self, model: CTCModel) -> None:
        model.train()
        if self.frozen:
            model.feature_extractor.eval()     # no dropout/norm updates in the frozen front end

    def dev_wer(self, model: CTCModel, audio: AudioCache, device: torch.device) -> float:
        hypotheses = transcribe_corpus(model, audio, device=device, progress=False)
        return error_counts([u.transcript for u in audio.utterances], hypotheses).rate

    def checkpoint_entries(self, model: CTCModel) -> dict:
        return {"config": model.config.to_dict(), "vocab": model.vocab}



# ----------------------------------------------------------------------------------------
# Features and batches
# ----------------------------------------------------------------------------------------

class FeatureCache:
    """Frozen feature-extractor outputs, computed once per utterance and kept as float16.

    With `folder`, the features are also stored on disk under a key made of the front end's
    weights and the audio files' names and contents (SHA-256 of their bytes: a file replaced
    with the same size and modification time still gives a new key), so repeated runs on the
    same corpus (a sparsity sweep) skip the recomputation; any change gives a new key."""

    def __init__(self, model: CTCModel, audio: AudioCache, device: torch.device, desc: str = "caching features",
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


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes. Hashing the built-in corpus's 3,500 files (153 MB) takes
    about 0.2-0.3 s on one core when they are in the page cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _feature_key(model: CTCModel, audio: AudioCache) -> str:
    """A digest of everything the cached features depend on: the front end's weights, the
    normalisation, and every audio file's name, content and length."""
    digest = hashlib.sha256(tensors_digest(model.feature_extractor.state_dict()).encode())
    digest.update(repr(model.config.do_normalize).encode())
    for utterance in audio.utterances:
        digest.update(f"{utterance.audio_path}|{file_digest(utterance.audio_path)}|{utterance.num_samples}".encode())
    return digest.hexdigest()[:20]


def forward_batch(model: CTCModel, batch: Batch, device: torch.device,
                  features: Optional[torch.Tensor] = None):
    lengths = batch.lengths.to(device)
    if features is not None:
        return model(None, lengths, features=features.to(device))
    return model(batch.waveforms.to(device), lengths)


def ctc_loss(logits: torch.Tensor, frame_lengths: torch.Tensor, batch: Batch, reduction: str = "mean", *,
             blank: int = 0) -> torch.Tensor:
    """CTC over a batch with blank id `blank` (pass the model's `blank_id`; 0 is the default
    vocabulary's): "mean" divides each utterance's loss by its target length and averages over
    the batch (HF `ctc_loss_reduction="mean"`); "sum" adds the utterances' losses (HF "sum").
    A target equal to the blank is a ValueError (CTC cannot emit it as a label)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if bool((batch.targets == blank).any()):
        raise ValueError(f"a target of batch {batch.ids[:3]}... is the CTC blank id {blank}")
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)                   # (T, B, V)
    return F.ctc_loss(log_probs, batch.targets.to(logits.device), frame_lengths,
                      batch.target_lengths.to(logits.device), blank=blank, reduction=reduction, zero_infinity=True)


def check_labels_avoid_blank(utterances: Sequence[Utterance], vocab: Sequence[str], blank_id: int) -> None:
    """DataError naming the first transcript that contains the vocabulary's CTC blank token as
    a character (a space, when the blank is the word delimiter `|`): CTC can never emit its
    blank as a label, so training on it would be silently wrong. A blank such as `<pad>` or
    `[PAD]` is never a character and passes."""
    token = vocab[blank_id]
    if len(token) != 1:                  # encode_text maps single characters only
        return
    character = " " if token == "|" else token
    for utterance in utterances:
        if blank_id in encode_text(utterance.transcript, vocab):
            raise DataError(f"{utterance.audio_path}: the transcript of {utterance.id} contains {character!r}, "
                            f"which is the model's CTC blank ({token!r}, pad_token_id {blank_id}); CTC cannot "
                            "learn a label equal to its blank: use a vocabulary whose pad token is not a character")


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------
# Evaluation: greedy CTC decoding
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def transcribe_corpus(model: CTCModel, audio: AudioCache, *, batch_size: int = 16,
                      device: torch.device = torch.device("cpu"), progress: bool = True,
                      desc: str = "decoding") -> list[str]:
    """Greedy CTC transcripts of every utterance in `audio`, in corpus order.

    Group-norm ("base") models normalise each conv channel over the whole (padded) time
    axis, so batching changes their output; like HF's reference recipe we decode them one
    utterance at a time. Layer-norm models are exact under padding and are batched."""
    was_training = model.training
    model.eval()
    if getattr(model.config, "feat_extract_norm", None) == "group":
        batch_size = 1
    batches = length_sorted_batches(audio.utterances, batch_size=batch_size)
    hypotheses: list[str] = [""] * len(audio.utterances)
    for indices in tqdm(batches, desc=desc, leave=False, disable=not progress):
        batch = audio.batch(indices, normalize=model.config.do_normalize, vocab=model.vocab)
        logits, frame_lengths = forward_batch(model, batch, device)
        for index, text in zip(indices, ctc_greedy_decode(logits, frame_lengths, model.vocab, model.blank_id)):
            hypotheses[index] = text
    model.train(was_training)
    return hypotheses



def _labels_only(audio: AudioCache, indices: Sequence[int], vocab: Sequence[str]) -> Batch:
    """A batch with lengths and targets but no waveforms (features come from the cache)."""
    utterances = [audio.utterances[i] for i in indices]
    targets, target_lengths = make_targets([u.transcript for u in utterances], vocab)
    return Batch(ids=[u.id for u in utterances], waveforms=torch.empty(0),
                 lengths=torch.tensor([u.num_samples for u in utterances]), targets=targets,
                 target_lengths=target_lengths, transcripts=[u.transcript for u in utterances])



def evaluate_corpus(model: CTCModel, utterances: Sequence[Utterance], *, batch_size: int = 16,
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
