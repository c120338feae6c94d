"""Scoring Whisper like the CTC models: WER/CER on a corpus, and the real recordings.

`evaluate_whisper(model, utterances)` returns the same figures as
`spg.ctc_training.evaluate_corpus` (WER, CER, S/D/I, real-time factor, references and
hypotheses), so `evaluate.py`, `train.py` and the benchmarks print Whisper results the same
way. Whisper writes cased, punctuated text ("And Mr. John Dashwood ..."), so references and
hypotheses both go through `spg.text.normalize_english` before scoring (lowercase, no
punctuation, mr -> mister, ...); the built-in corpus's references (upper-case letters and
apostrophes) are unchanged by it apart from the case.

`read_transcription_folder(folder)` reads real recordings in the Sphinx test layout
(`recordings/librivox`: a `transcription` file of `<s> words </s> (utterance-id)` lines and
`<utterance-id>.flac` or `.wav` next to it) as `spg.data.Utterance`s, for any model.

Whisper hears one 30 s window (`spg.whisper.audio.N_SAMPLES`); `Whisper.transcribe` would cut
longer audio to its first 30 s and score the rest as deleted, a wrong number. So both
functions refuse audio longer than 30 s with a DataError naming the file and its length
(there is no long-form sliding window here).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Sequence, Union

import torch

from spg.data import (SAMPLE_RATE, DataError, Utterance, check_inside, check_utterance_id, index_utterance,
                      read_audio, read_transcript_lines)
from spg.text import normalize_english
from spg.wer import corpus_scores
from spg.whisper.audio import N_SAMPLES
from spg.whisper.model import Whisper

__all__ = ["TRANSCRIPTION_FILE", "is_transcription_folder", "read_transcription_folder", "evaluate_whisper"]

TRANSCRIPTION_FILE = "transcription"
MAX_SECONDS = N_SAMPLES / SAMPLE_RATE   # 30.0: Whisper's one window


def check_whisper_durations(utterances: Sequence[Utterance], where: str) -> None:
    """DataError naming every utterance (first five, and how many) longer than Whisper's 30 s
    window, which `Whisper.transcribe` would silently truncate."""
    too_long = [u for u in utterances if u.num_samples > N_SAMPLES]
    if too_long:
        raise DataError(f"{where}: {len(too_long)} utterance(s) longer than Whisper's {MAX_SECONDS:g} s window "
                        f"(it would hear only the first {MAX_SECONDS:g} s; no long-form transcription here): "
                        + ", ".join(f"{u.audio_path} ({u.seconds:.1f} s)" for u in too_long[:5])
                        + "; split the file")


def is_transcription_folder(path: Union[str, os.PathLike]) -> bool:
    """Whether `path` holds a `transcription` file (of any kind: `read_transcription_folder`
    refuses one that is not a regular file by name, rather than the folder being taken for a
    LibriSpeech root)."""
    return (Path(path) / TRANSCRIPTION_FILE).exists()


def read_transcription_folder(folder: Union[str, os.PathLike]) -> list[Utterance]:
    """Utterances of a Sphinx-style test folder, in file order. Transcripts are upper-cased
    like LibriSpeech's (spg.data.normalize_text), so CTC models can score them too.

    DataError (naming the file, and line and id where there are some) for: a transcription
    file that is not a regular UTF-8 file of at most spg.data.MAX_TRANSCRIPT_BYTES, a line not
    in the layout, an utterance id that is not a plain file name stem (spg.data.check_utterance_id)
    or that is listed twice, a line with no words, a missing audio file or one that resolves
    outside the folder (a symlink out of it), is not a regular file or is unreadable, a sample
    rate the readers refuse (spg.data.check_sample_rate), audio longer than Whisper's 30 s, no
    utterances. Audio files in the folder that no line lists are not used; a warning gives how
    many and the first few names."""
    folder = Path(folder)
    path = folder / TRANSCRIPTION_FILE
    if not path.exists():
        raise DataError(f"{folder}: no '{TRANSCRIPTION_FILE}' file (expected lines '<s> words </s> (utterance-id)')")
    check_inside(path, folder, "transcription file")
    utterances = []
    first_listed: dict[str, int] = {}       # id -> the line that lists it first
    for number, line in enumerate(read_transcript_lines(path), 1):
        if not line.strip():
            continue
        words, bracket, rest = line.rpartition("(")
        if not bracket or not rest.strip().endswith(")"):
            raise DataError(f"{path}:{number}: expected '<s> words </s> (utterance-id)', got {line!r}")
        utterance_id = rest.strip()[:-1].strip()
        check_utterance_id(utterance_id, f"{path}:{number}")
        if utterance_id in first_listed:
            raise DataError(f"{path}:{number}: utterance {utterance_id} is listed twice (first on line "
                            f"{first_listed[utterance_id]}); expected each id once, or it is scored twice")
        first_listed[utterance_id] = number
        text = words.replace("<s>", " ").replace("</s>", " ")
        if not text.strip():
            raise DataError(f"{path}:{number}: utterance {utterance_id} has an empty transcript "
                            f"(expected '<s> words </s> (utterance-id)')")
        audio = next((folder / f"{utterance_id}{ext}" for ext in (".flac", ".wav")
                      if (folder / f"{utterance_id}{ext}").exists()), None)
        if audio is None:
            raise DataError(f"{path}:{number}: no audio file {utterance_id}.flac or .wav in {folder}")
        utterances.append(index_utterance(utterance_id, audio, text, folder, f"{path}:{number}"))
    if not utterances:
        raise DataError(f"{folder}: no utterances in {path} (expected lines '<s> words </s> (utterance-id)')")
    check_whisper_durations(utterances, str(folder))
    listed = {u.audio_path for u in utterances}
    unlisted = sorted(p for pattern in ("*.flac", "*.wav") for p in folder.glob(pattern) if p not in listed)
    if unlisted:
        warnings.warn(f"{folder}: {len(unlisted)} audio file(s) not listed in {path} are not used, e.g. "
                      + ", ".join(p.name for p in unlisted[:5]), stacklevel=2)
    return utterances


@torch.no_grad()
def evaluate_whisper(model: Whisper, utterances: Sequence[Utterance], *, batch_size: int = 8,
                     device: torch.device = torch.device("cpu")) -> dict:
    """Greedy-decode every utterance and score it after English normalisation.

    Returns the keys of `spg.ctc_training.evaluate_corpus` ("wer", "cer", "substitutions",
    "deletions", "insertions", "reference_words", "utterances", "audio_seconds", "rtf", "ids",
    "references", "hypotheses": both normalised) plus "raw_hypotheses" (Whisper's text).
    Utterances are decoded in batches of similar length (fewer wasted decoder steps); every
    input is padded to Whisper's 30 s window, so the cost hardly depends on the length. Audio
    longer than 30 s is refused (DataError naming the files), not truncated; so is an empty list."""
    if not utterances:
        raise DataError("evaluate_whisper: no utterances to score")
    check_whisper_durations(utterances, "evaluate_whisper")
    model.to(device)
    waveforms = [read_audio(u) for u in utterances]           # before the clock starts
    order = sorted(range(len(utterances)), key=lambda i: (utterances[i].num_samples, utterances[i].id))
    started = time.perf_counter()
    decoded = model.transcribe([waveforms[i] for i in order], batch_size=batch_size)
    seconds = time.perf_counter() - started
    raw = [""] * len(utterances)
    for position, index in enumerate(order):
        raw[index] = decoded[position]
    references = [normalize_english(u.transcript) for u in utterances]
    hypotheses = [normalize_english(text) for text in raw]
    audio_seconds = sum(u.seconds for u in utterances)
    return {**corpus_scores(references, hypotheses), "utterances": len(utterances),
            "audio_seconds": audio_seconds, "rtf": seconds / audio_seconds if audio_seconds else 0.0,
            "ids": [u.id for u in utterances], "references": references, "hypotheses": hypotheses,
            "raw_hypotheses": raw}
