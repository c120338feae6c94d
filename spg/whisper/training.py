"""Fine-tuning Whisper with the shared loop: a teacher-forced decoder cross-entropy.

`spg.training.train` runs any `Method` (SPG, UMP, mixed, dense) on any model whose
prunable matrices `model.prunable_linears()` lists; what differs between model families is
the loss, given by an `Objective`. This module is Whisper's objective:

    input  = prompt + text tokens              e.g. <|startoftranscript|><|notimestamps|> ␣The ␣cat ...
    labels =   (ignored) + text tokens + <|endoftext|>
    loss   = mean over the labelled tokens of −log p(label | audio, previous tokens)

the standard sequence-to-sequence fine-tuning loss (openai's and HF's Whisper fine-tuning
recipes). Every input is padded to Whisper's 30 s window, as in its pre-training, so a
training step costs about as much for a 3 s utterance as for a 30 s one.

Choices the papers leave open (the SPG paper prunes CTC models only; the clustering paper's
Whisper experiment is data-free):
  * Targets keep Whisper's own orthography: the built-in corpus's upper-case transcripts
    become sentence case with a final full stop (`target_text`), because tiny.en writes
    cased, punctuated text and we do not want fine-tuning to spend its steps on a new
    orthography. WER is computed after `spg.text.normalize_english` either way.
  * `TrainConfig.freeze_feature_extractor` (the default) freezes Whisper's front end, the two
    convolutions of the encoder stem, the counterpart of wav2vec2's conv feature extractor
    that the papers never prune or train.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from spg.data import AudioCache
from spg.training import Objective, TrainConfig
from spg.whisper.audio import log_mel_spectrogram
from spg.whisper.evaluation import evaluate_whisper
from spg.whisper.model import Whisper
from spg.whisper.tokenizer import WhisperTokenizer

IGNORE_INDEX = -100     # label value that F.cross_entropy skips (padding and the prompt)


def target_text(transcript: str) -> str:
    """A corpus transcript in Whisper's orthography: " Many tailors sang through your station."

    Sentence case (the first letter and the pronoun "I", also in I'M/I'LL/I'D/I'VE,
    upper-case; everything else lower-case), a full stop unless the text already ends in
    punctuation, and a leading space: Whisper's first text token carries the word's space."""
    words = transcript.strip().lower().split()
    if not words:
        return ""
    words = [word.replace("i", "I", 1) if word == "i" or word.startswith("i'") else word for word in words]
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    if text[-1] not in ".?!":
        text += "."
    return " " + text


def teacher_forcing_tokens(texts: Sequence[Sequence[int]], prompt: Sequence[int], eos: int,
                           max_length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs and labels for a batch of tokenised texts (no special tokens).

    For each text t: sequence = prompt + t + [eos]; inputs = sequence[:-1], labels =
    sequence[1:] with the first len(prompt) - 1 labels (prompt predicting prompt) set to
    IGNORE_INDEX. Rows are right-padded: inputs with eos, labels with IGNORE_INDEX.
    Returns (inputs, labels), both (B, S) int64. A text longer than `max_length` decoder
    positions is an error, not silently cut."""
    sequences = [list(prompt) + list(text) + [eos] for text in texts]
    width = max(len(sequence) for sequence in sequences) - 1
    if max_length is not None and width > max_length:
        raise ValueError(f"a target of {width} decoder positions exceeds max_target_positions={max_length}")
    inputs = torch.full((len(texts), width), eos, dtype=torch.long)                 # (B, S)
    labels = torch.full((len(texts), width), IGNORE_INDEX, dtype=torch.long)        # (B, S)
    for row, sequence in enumerate(sequences):
        inputs[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        labels[row, :len(sequence) - 1] = torch.tensor(sequence[1:])
        labels[row, :len(prompt) - 1] = IGNORE_INDEX
    return inputs, labels


class WhisperObjective(Objective):
    """Teacher-forced cross-entropy of Whisper's decoder (module docstring).

    tokenizer: the BPE tokenizer for the targets (default: the model's own, `model.tokenizer`,
        which must have its merges to encode)."""

    def __init__(self, tokenizer: Optional[WhisperTokenizer] = None):
        self.tokenizer = tokenizer

    def freeze(self, model: Whisper, config: TrainConfig) -> None:
        if config.freeze_feature_extractor:
            for parameter in [*model.encoder.conv1.parameters(), *model.encoder.conv2.parameters()]:
                parameter.requires_grad_(False)
        if self.tokenizer is None:
            self.tokenizer = model.tokenizer
        if self.tokenizer is None:
            raise ValueError("Whisper fine-tuning needs a tokenizer for the targets; this model has none "
                             "(its folder had no tokenizer.json): pass WhisperObjective(tokenizer)")

    def loss(self, model: Whisper, audio: AudioCache, indices: Sequence[int], device: torch.device) -> torch.Tensor:
        config = model.config
        mel = torch.stack([log_mel_spectrogram(audio.waveform(i), config.num_mel_bins)
                           for i in indices])                                        # (B, n_mels, 3000)
        texts = [self.tokenizer.encode(target_text(audio.utterances[i].transcript)) for i in indices]
        inputs, labels = teacher_forcing_tokens(texts, config.prompt_ids(), config.eos_token_id,
                                                max_length=config.max_target_positions)
        logits = model(mel.to(device), inputs.to(device))                           # (B, S, V)
        return F.cross_entropy(logits.float().transpose(1, 2), labels.to(device), ignore_index=IGNORE_INDEX)

    def dev_wer(self, model: Whisper, audio: AudioCache, device: torch.device) -> float:
        return evaluate_whisper(model, audio.utterances, device=device)["wer"]

    def checkpoint_entries(self, model: Whisper) -> dict:
        return {"config": model.config.to_dict(), "vocab": None}     # the tokenizer is not stored
