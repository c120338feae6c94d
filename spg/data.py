"""Speech data in LibriSpeech layout: reading, tokenising and batching.

One format serves both the built-in synthetic corpus and real LibriSpeech
(Panayotov et al. 2015):

    <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   lines "<ID> <TRANSCRIPT>"
    <root>/<split>/<speaker>/<chapter>/<ID>.flac                         16 kHz mono

Bad input is either converted and reported (other sample rates are resampled, multi-channel
audio is mixed down; a warning names the files) or refused with an error that names the
file (unreadable audio, a transcript line without audio, a transcript line with an id but
no words, characters outside the vocabulary, a split with no utterances).  Audio files that
no transcript lists are not used, and a warning gives their count and first names.
`check_durations` refuses audio too short for the model or too long for memory, by name.

The corpus may be hostile, so the readers (this one and the Sphinx-style
`spg.whisper.evaluation.read_transcription_folder`, which share the helpers below) also
refuse, naming the file (and line and id): transcript files that are not regular files, are
larger than MAX_TRANSCRIPT_BYTES or are not UTF-8 (`read_transcript_lines`); utterance ids
that are not plain file name stems (`check_utterance_id`: `../../x` would read audio from
outside the corpus) or that a split lists twice (it would be scored twice); audio files that
resolve outside the corpus folder (a symlink out of it) or are not regular files; sample
rates outside MIN_SAMPLE_RATE..MAX_SAMPLE_RATE, or that the resampler refuses
(`spg.audio.check_resample`); FLACs whose STREAMINFO sample count the data contradicts
(`spg.audio.read_audio_file`).
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional, Sequence

import numpy as np
import torch

from spg.audio import audio_info, check_resample, read_audio_file, resample, resampled_length
from spg.files import open_regular_file

SAMPLE_RATE = 16_000
# The 32-token character vocabulary of facebook/wav2vec2-base-960h (id 0 = CTC blank).
# Same list as spg.wav2vec2.model.DEFAULT_VOCAB; repeated here so this module stands alone.
DEFAULT_VOCAB: list[str] = [
    "<pad>", "<s>", "</s>", "<unk>", "|",
    "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F", "G",
    "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z",
]


class DataError(ValueError):
    """Bad corpus input; the message names the file and what was expected."""


# Our choice: sample rates a corpus may have. 8 kHz (telephony) is the lowest in common speech
# use; below it the speech band up to 4 kHz is cut and a header that says so is more likely
# broken than real. 384 kHz is the highest that common audio interfaces record (352.8 kHz DXD
# included); above it nothing is speech audio, and the work grows with the rate (a header of
# 9 999 991 Hz asked for a 5 GB resampling filter and 158 s).
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 384_000
# Our choice: the largest transcript file read, checked before reading. A LibriSpeech
# chapter's trans.txt is a few KB, and every LibriSpeech transcript together (281 k lines,
# 960 h) is about 50 MB, so 64 MB refuses no real corpus and keeps a hostile file from
# filling memory.
MAX_TRANSCRIPT_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    """Upper-case and collapse white space: the only normalisation LibriSpeech needs.
    Anything else (digits, punctuation) is left for `encode_text` to refuse, because
    silently deleting it would train the model on a transcript that does not match."""
    return " ".join(text.upper().split())


def encode_text(text: str, vocab: Sequence[str] = DEFAULT_VOCAB) -> list[int]:
    """Characters -> token ids; a space becomes the word delimiter `|`.
    Raises ValueError listing the characters that are not in the vocabulary."""
    index = {token: i for i, token in enumerate(vocab)}
    chars = ["|" if c == " " else c for c in normalize_text(text)]
    unknown = sorted({c for c in chars if c not in index})
    if unknown:
        raise ValueError(f"characters outside the vocabulary: {''.join(unknown)!r}")
    return [index[c] for c in chars]


def decode_ids(ids: Sequence[int], vocab: Sequence[str] = DEFAULT_VOCAB) -> str:
    """Token ids -> text (no CTC collapsing; that is `spg.wav2vec2.model.ctc_greedy_decode`)."""
    return "".join(" " if vocab[i] == "|" else vocab[i] for i in ids)


# ----------------------------------------------------------------------------------------
# Utterances, and the checks shared by the corpus readers
# ----------------------------------------------------------------------------------------

@dataclass
class Utterance:
    id: str
    audio_path: Path
    transcript: str
    num_samples: int          # at 16 kHz (after any resampling)
    sample_rate: int          # of the file on disk
    channels: int

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE


def _split_lines(text: str) -> list[str]:
    """Lines as an editor numbers them: "\n", "\r\n" or a lone "\r" ends one."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_transcript_lines(path: Path) -> list[str]:
    """The lines of a transcript file (line i is number i + 1), as UTF-8 (a leading byte-order
    mark is dropped). DataError naming the file for one that cannot be opened, is not a
    regular file (a FIFO would block for ever, /dev/zero never ends; see
    `spg.files.open_regular_file`), is larger than MAX_TRANSCRIPT_BYTES (checked before
    reading, and no more than that is read if it grows), and naming the line and column for
    bytes that are not UTF-8."""
    try:
        with open_regular_file(path) as stream:
            size = os.fstat(stream.fileno()).st_size
            data = stream.read(MAX_TRANSCRIPT_BYTES + 1) if size <= MAX_TRANSCRIPT_BYTES else b""
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise DataError(f"cannot read transcript file {path}: {reason}") from None
    if size > MAX_TRANSCRIPT_BYTES or len(data) > MAX_TRANSCRIPT_BYTES:
        raise DataError(f"transcript file {path} is larger than {MAX_TRANSCRIPT_BYTES // 2**20} MB "
                        f"({max(size, len(data))} bytes); expected a text file of lines '<ID> <TRANSCRIPT>'")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        before = _split_lines(data[:error.start].decode("utf-8-sig"))
        raise DataError(f"{path}:{len(before)}: not valid UTF-8 (byte 0x{data[error.start]:02x} at column "
                        f"{len(before[-1]) + 1}); expected a UTF-8 text file") from None
    return _split_lines(text)


def check_utterance_id(utterance_id: str, where: str) -> None:
    """DataError (starting with `where`, e.g. "file:line") unless `utterance_id` is a plain
    file name stem, so that `<folder>/<id>.flac` stays in `<folder>`: not empty, no path
    separator (/ or \\), not absolute and no Windows drive, no "..", no leading dot (., ..,
    hidden files), no control or other invisible characters (Unicode category C: NUL, tab,
    a byte-order mark...)."""
    reasons = []
    if not utterance_id:
        reasons.append("it is empty")
    if "/" in utterance_id or "\\" in utterance_id:
        reasons.append("it contains a path separator")
    if PurePosixPath(utterance_id).is_absolute() or PureWindowsPath(utterance_id).drive:
        reasons.append("it is an absolute path or names a drive")
    if ".." in utterance_id:
        reasons.append("it contains '..'")
    if utterance_id.startswith("."):
        reasons.append("it starts with a dot")
    if any(unicodedata.category(c).startswith("C") for c in utterance_id):
        reasons.append("it contains a control or invisible character")
    if reasons:
        raise DataError(f"{where}: utterance id {utterance_id!r} is not a plain file name ({', '.join(reasons)}); "
                        f"expected the name of an audio file in the transcript's folder, without extension")


def check_inside(path: Path, folder: Path, what: str) -> None:
    """DataError unless `path`, with every symlink resolved, lies inside `folder` (resolved
    too, so the folder itself may be a symlink): a symlink out of the corpus would read files
    the corpus does not hold. `what` starts the message (e.g. "file:line: audio file of <id>")."""
    resolved, boundary = path.resolve(), folder.resolve()
    if not resolved.is_relative_to(boundary):
        raise DataError(f"{what}: {path} resolves to {resolved}, outside the corpus folder {boundary}; "
                        f"expected files (and symlinks) that stay inside it")


def check_sample_rate(sample_rate: int) -> None:
    """ValueError unless the readers take this rate: MIN_SAMPLE_RATE..MAX_SAMPLE_RATE Hz (see
    there for why) and one that `spg.audio.resample` can convert to 16 kHz."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"sample rate {sample_rate} Hz is outside the {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz "
                         f"these readers take")
    check_resample(sample_rate, SAMPLE_RATE)


def index_utterance(utterance_id: str, audio_path: Path, transcript: str, folder: Path, where: str) -> Utterance:
    """An Utterance from the audio file's header (see `spg.audio.audio_info`), after checking
    that the file resolves inside `folder` and is a readable regular audio file with a rate
    `check_sample_rate` takes. Errors are DataErrors starting with `where` and naming the file
    and the utterance."""
    check_inside(audio_path, folder, f"{where}: audio file of {utterance_id}")
    try:
        info = audio_info(audio_path)
        check_sample_rate(info.sample_rate)
    except Exception as error:  # soundfile raises several types for bad files
        raise DataError(f"{where}: cannot read audio file {audio_path} of {utterance_id}: {error}") from None
    return Utterance(utterance_id, audio_path, normalize_text(transcript),
                     resampled_length(info.frames, info.sample_rate, SAMPLE_RATE), info.sample_rate, info.channels)


# ----------------------------------------------------------------------------------------
# Reading a corpus
# ----------------------------------------------------------------------------------------

def read_corpus(root: str | Path, split: str, vocab: Sequence[str] = DEFAULT_VOCAB) -> list[Utterance]:
    """Index one split of a LibriSpeech-layout corpus (headers only; audio is read later).

    `split` is a folder name under `root` (e.g. "train-clean-100", "test"). Every transcript
    line must have its `.flac` and at least one word (LibriSpeech has no empty transcript; a
    line with only an id is a DataError naming file:line, since scoring or training on an empty
    reference would be a wrong number); every transcript must fit the vocabulary; a split with
    no utterances is a DataError naming the split and folder. Entirely empty lines are skipped.
    Ids must be plain file name stems (`check_utterance_id`) listed once in the split; audio
    and transcript files must resolve inside the split folder (which may itself be a symlink)
    and be regular files; see the module docstring for the other refusals.
    `.flac`/`.wav` files in the chapter folders that no transcript lists are not used; a
    warning gives how many and the first few names."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        available = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise DataError(f"split folder {split_dir} does not exist (available under {root}: {available})")
    transcript_files = sorted(split_dir.glob("*/*/*.trans.txt"))
    if not transcript_files:
        raise DataError(f"no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files under {split_dir}")
    utterances: list[Utterance] = []
    first_listed: dict[str, str] = {}       # id -> file:line where the split lists it first
    converted: dict[str, list[str]] = {"resampled": [], "mixed down": []}
    for transcript_file in transcript_files:
        check_inside(transcript_file, split_dir, "transcript file")
        for line_number, line in enumerate(read_transcript_lines(transcript_file), 1):
            if not line.strip():
                continue
            utterance_id, _, transcript = line.strip().partition(" ")
            where = f"{transcript_file}:{line_number}"
            check_utterance_id(utterance_id, where)
            if utterance_id in first_listed:
                raise DataError(f"{where}: utterance {utterance_id} is listed twice in split {split!r} (first at "
                                f"{first_listed[utterance_id]}); expected each id once, or it is scored twice")
            first_listed[utterance_id] = where
            if not transcript.strip():
                raise DataError(f"{where}: utterance {utterance_id} has an empty transcript "
                                f"(expected '<ID> <TRANSCRIPT>' with at least one word)")
            try:
                encode_text(transcript, vocab)
            except ValueError as error:
                raise DataError(f"{where}: transcript of {utterance_id}: {error}") from None
            audio_path = transcript_file.parent / f"{utterance_id}.flac"
            if not audio_path.exists():
                raise DataError(f"{where}: transcript line for {utterance_id} but no audio file {audio_path}")
            utterance = index_utterance(utterance_id, audio_path, transcript, split_dir, where)
            if utterance.sample_rate != SAMPLE_RATE:
                converted["resampled"].append(f"{audio_path} ({utterance.sample_rate} Hz)")
            if utterance.channels != 1:
                converted["mixed down"].append(f"{audio_path} ({utterance.channels} channels)")
            utterances.append(utterance)
    if not utterances:
        raise DataError(f"split {split!r} has no utterances: the {len(transcript_files)} transcript file(s) "
                        f"under {split_dir} list none (expected lines '<ID> <TRANSCRIPT>')")
    for action, files in converted.items():
        if files:
            warnings.warn(f"{split_dir}: {len(files)} file(s) {action} to 16 kHz mono on load, e.g. "
                          + "; ".join(files[:3]), stacklevel=2)
    listed = {u.audio_path for u in utterances}
    unlisted = sorted(path for pattern in ("*/*/*.flac", "*/*/*.wav") for path in split_dir.glob(pattern)
                      if path not in listed)
    if unlisted:
        warnings.warn(f"{split_dir}: {len(unlisted)} audio file(s) not listed in any trans.txt are not used, e.g. "
                      + ", ".join(str(path.relative_to(split_dir)) for path in unlisted[:5]), stacklevel=2)
    return utterances


def check_durations(utterances: Sequence[Utterance], *, min_samples: int, max_seconds: Optional[float],
                    where: str) -> None:
    """Refuse, before any model runs, audio the model cannot take.

    Too short: fewer than `min_samples` samples at 16 kHz (the model's receptive field, e.g.
    `ModelConfig.min_input_samples`: 400 for wav2vec2's conv stack) gives no output frame and
    crashes inside a convolution. Too long: more than `max_seconds` (None: no limit) would
    exhaust memory (attention is quadratic in the length). Raises DataError starting with
    `where` (e.g. "split test of data/synth-..."), giving how many utterances are affected and
    the first five files with their length in seconds, and a hint."""
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
    problems = []
    short = [u for u in utterances if u.num_samples < min_samples]
    if short:
        problems.append(f"{len(short)} utterance(s) shorter than the model's receptive field of {min_samples} "
                        f"samples ({min_samples / SAMPLE_RATE:g} s): "
                        + ", ".join(f"{u.audio_path} ({u.seconds:.4f} s)" for u in short[:5])
                        + "; remove them from the transcript file")
    if max_seconds is not None:
        long = [u for u in utterances if u.num_samples > max_seconds * SAMPLE_RATE]
        if long:
            problems.append(f"{len(long)} utterance(s) longer than --max-seconds={max_seconds:g}: "
                            + ", ".join(f"{u.audio_path} ({u.seconds:.1f} s)" for u in long[:5])
                            + "; raise --max-seconds or split the file")
    if problems:
        raise DataError(f"{where}: " + "; and ".join(problems))


def read_audio(utterance: Utterance) -> np.ndarray:
    """float32 mono 16 kHz samples of one utterance (converted if the file is not).

    Read with `spg.audio.read_audio_file` (a regular file; a FLAC to its real end, refused if
    that contradicts its STREAMINFO count); the rate is checked again (`check_sample_rate`).
    Errors are DataErrors naming the file."""
    try:
        samples, sample_rate = read_audio_file(utterance.audio_path)
        check_sample_rate(sample_rate)
    except Exception as error:  # soundfile raises several types for bad files
        raise DataError(f"cannot read audio file {utterance.audio_path}: {error}") from None
    samples = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]   # (N,)
    if sample_rate != SAMPLE_RATE:
        samples = resample(samples, sample_rate, SAMPLE_RATE)
    return np.ascontiguousarray(samples, dtype=np.float32)


# ----------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------

@dataclass
class Batch:
    ids: list[str]
    waveforms: torch.Tensor        # (B, N) float32, zero-padded (normalised if asked)
    lengths: torch.Tensor          # (B,) valid samples
    targets: torch.Tensor          # (sum of target lengths,) concatenated label ids
    target_lengths: torch.Tensor   # (B,)
    transcripts: list[str]


def normalize_waveform(waveform: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance for one utterance, as HF's Wav2Vec2FeatureExtractor:
    (x - mean) / sqrt(var + 1e-7). Done before padding, so padding stays 0."""
    waveform = np.asarray(waveform, dtype=np.float32)
    return (waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)


def collate(utterances: Sequence[Utterance], waveforms: Sequence[np.ndarray], *, normalize: bool,
            vocab: Sequence[str] = DEFAULT_VOCAB) -> Batch:
    """Pad a list of waveforms into one batch, with lengths and CTC targets."""
    if normalize:
        waveforms = [normalize_waveform(w) for w in waveforms]
    lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.long)
    padded = torch.zeros(len(waveforms), int(lengths.max()))                     # (B, N)
    for row, waveform in enumerate(waveforms):
        padded[row, :len(waveform)] = torch.from_numpy(np.asarray(waveform, dtype=np.float32))
    targets, target_lengths = make_targets([u.transcript for u in utterances], vocab)
    return Batch(ids=[u.id for u in utterances], waveforms=padded, lengths=lengths, targets=targets,
                 target_lengths=target_lengths, transcripts=[u.transcript for u in utterances])


def make_targets(transcripts: Sequence[str], vocab: Sequence[str] = DEFAULT_VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC targets: all label ids concatenated (sum L,), and each transcript's length (B,)."""
    labels = [encode_text(text, vocab) for text in transcripts]
    return (torch.tensor([i for label in labels for i in label], dtype=torch.long),
            torch.tensor([len(label) for label in labels], dtype=torch.long))


def length_sorted_batches(utterances: Sequence[Utterance], *, batch_size: int = 8,
                          max_batch_seconds: Optional[float] = None, shuffle: bool = False,
                          seed: int = 0) -> list[list[int]]:
    """Group utterance indices into batches of similar length (little padding).

    Indices are sorted by length and cut into consecutive batches of at most `batch_size`
    utterances (and, if given, at most `max_batch_seconds` of padded audio). With `shuffle`
    the order of the *batches* is permuted with `seed`; each batch keeps similar lengths."""
    order = sorted(range(len(utterances)), key=lambda i: (utterances[i].num_samples, utterances[i].id))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = max([utterances[i].num_samples for i in current] + [utterances[index].num_samples])
        too_long = max_batch_seconds is not None and current and \
            longest * (len(current) + 1) / SAMPLE_RATE > max_batch_seconds
        if len(current) == batch_size or too_long:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    if shuffle:
        permutation = np.random.default_rng(seed).permutation(len(batches))
        batches = [batches[i] for i in permutation]
    return batches


class AudioCache:
    """Reads utterances on demand and keeps them in memory, exactly as `read_audio` returns them.

    Stored as int16 (half the RAM of float32) when that is lossless, which it is for 16-bit
    files at 16 kHz (LibriSpeech, the built-in corpus: ~2 h, ~230 MB); otherwise (float files,
    resampled audio) as float32. Our choice: exact storage rather than rounding everything to
    int16, because rounding clipped float audio louder than full scale (a WAV at peak 10.7 went
    from 18.75% to 31.25% WER) and made cached and uncached numbers differ. Audio louder than
    full scale (peak > 1) is kept as it is, not rescaled (models that normalise per utterance,
    as wav2vec2's feature extractor does, are unaffected by the scale; rescaling would change
    what the others see relative to the uncached read), and the first such file is named in a
    warning with its peak; `louder_than_full_scale` lists all found so far as (path, peak).
    For LibriSpeech-size data pass `keep=False` to re-read from disk every time."""

    def __init__(self, utterances: Sequence[Utterance], keep: bool = True):
        self.utterances = list(utterances)
        self.keep = keep
        self._store: dict[int, np.ndarray] = {}
        self.louder_than_full_scale: list[tuple[Path, float]] = []

    def waveform(self, index: int) -> np.ndarray:
        if index not in self._store:
            samples = read_audio(self.utterances[index])
            peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
            if peak > 1.0:
                self._report_loud(self.utterances[index].audio_path, peak)
            if not self.keep:
                return samples
            pcm = np.round(samples.astype(np.float64) * 32768.0)
            if peak <= 1.0 and pcm.min(initial=0) >= -32768 and pcm.max(initial=0) <= 32767 \
                    and np.array_equal((pcm / 32768.0).astype(np.float32), samples):
                self._store[index] = pcm.astype(np.int16)
            else:
                self._store[index] = samples
        stored = self._store[index]
        return stored.astype(np.float32) / 32768.0 if stored.dtype == np.int16 else stored.copy()

    def _report_loud(self, path: Path, peak: float) -> None:
        if any(known == path for known, _ in self.louder_than_full_scale):
            return
        self.louder_than_full_scale.append((path, peak))
        if len(self.louder_than_full_scale) == 1:
            warnings.warn(f"{path}: audio louder than full scale (peak {peak:.3g} > 1.0); kept unclipped as "
                          f"float32, not clipped to 16 bits (later such files are not warned about again; "
                          f"see AudioCache.louder_than_full_scale)", stacklevel=3)

    def batch(self, indices: Sequence[int], *, normalize: bool, vocab: Sequence[str] = DEFAULT_VOCAB) -> Batch:
        return collate([self.utterances[i] for i in indices], [self.waveform(i) for i in indices],
                       normalize=normalize, vocab=vocab)
