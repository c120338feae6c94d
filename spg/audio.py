"""Audio helpers: reading files safely, band-limited resampling in pure numpy and atomic
16-bit FLAC writing.

Reading
-------
Files are opened with `spg.files.open_regular_file`, which refuses anything but a regular
file (a FIFO would block the reader for ever, `/dev/zero` never ends). `audio_info` and
`read_audio_file` are ``soundfile.info`` and ``soundfile.read`` without trusting a FLAC's STREAMINFO sample count, which libsndfile uses as
the length of the file: a header that says 1 s over 20 s of audio would silently cut it to
1 s, and the legal count 0 ("unknown", FLAC format specification) would make the file
2^63 - 1 samples long. So a FLAC is decoded to its real end: a count of 0 is replaced by the
decoded count, and a file that holds a different number of samples than a non-zero count says
is refused (see `read_audio_file` for why it is refused rather than read).

Resampling
----------
Changing the sample rate from ``orig_sr`` to ``new_sr`` is done the textbook way:

1. Reduce the ratio: with ``g = gcd(orig_sr, new_sr)`` we *upsample* by ``up = new_sr / g``
   and *downsample* by ``down = orig_sr / g`` (22050 -> 16000 is up=320, down=441).
2. Conceptually, insert ``up - 1`` zeros between input samples, low-pass filter at the lower
   of the two Nyquist frequencies (so that nothing aliases), keep every ``down``-th sample.
3. Never build the huge zero-stuffed signal: output sample ``n`` lies at time
   ``t_n = n * down / up`` (measured in input samples; output sample 0 coincides with input
   sample 0), and equals ``sum_i x[i] * h(t_n - i)`` where ``h`` is the low-pass kernel
   evaluated in continuous time.  This is the "polyphase" form: only the taps that touch
   real input samples are ever computed.

The kernel is a Kaiser-windowed sinc::

    h(tau) = 2 fc sinc(2 fc tau) * kaiser(tau / half_width)      for |tau| <= half_width

with ``fc = ROLLOFF * 0.5 * min(1, up / down)`` cycles per input sample, i.e. the cutoff sits
at ``ROLLOFF`` times the lower Nyquist frequency, and ``half_width = ZERO_CROSSINGS / (2 fc)``
input samples, i.e. the sinc is kept for ``ZERO_CROSSINGS`` zero crossings on each side.
For 22050 -> 16000 every output sample is a 96-tap dot product; measured with sines, the
response is flat to within 0.01 dB up to 6.8 kHz, -0.3 dB at 7 kHz, -6 dB at 7.36 kHz, and
every input frequency from 8 kHz (the new Nyquist) upwards, i.e. everything that could alias,
is at least 80 dB down.

Efficient evaluation: since ``up`` outputs span exactly ``down`` inputs, output ``k*up + r``
reads the input window ``x[k*down - pad : k*down + down + pad]`` with weights that depend only
on the phase ``r``.  Stacking those windows as rows of a (strided, copy-free) frame matrix, the
whole resampling is a single matrix product ``frames @ kernel_matrix``.  To avoid multiplying
by the (mostly zero) parts of ``kernel_matrix`` we split the ``up`` phases into groups of
``PHASES_PER_GROUP`` and give each group only the band of window rows it actually touches;
when ``up`` is small (8 kHz -> 16 kHz has up = 2) a frame holds several periods instead, so
that the matrix products stay wide.
Resampling three hours of 22.05 kHz audio to 16 kHz takes 2-7 seconds on one core.
"""

from __future__ import annotations

import functools
import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import soundfile

from spg.files import open_regular_file

# Not specified by any standard; we use 32 zero crossings because a Kaiser window of that
# length gives a transition band of ~0.16 x cutoff with ~80 dB stop-band attenuation (close
# to the ~96 dB floor of the 16-bit files we store) for ~100 multiply-adds per output sample.
ZERO_CROSSINGS = 32
# Not specified by any standard; beta = 8 puts the Kaiser window's side lobes ~80 dB down.
KAISER_BETA = 8.0
# Not specified by any standard; we put the -6 dB point at 0.92 x the lower Nyquist frequency
# so that the transition band (~1.2 kHz wide for 16 kHz output) ends at the new Nyquist:
# almost nothing aliases, and the band that speech recognisers use (< 7 kHz) stays flat.
ROLLOFF = 0.92
# Implementation detail (does not change the result beyond float rounding): how many output
# phases share one dense kernel block.  64 keeps each block mostly non-zero.
PHASES_PER_GROUP = 64
# Implementation detail (speed only): multiply-adds per matrix product.  We keep products
# this small because OpenBLAS then runs them on the calling thread; its thread pool costs
# far more than it saves for these skinny products when the machine is busy or when the
# process forks (as corpus generation does), e.g. 40 ms instead of 0.5 ms per 2.5 s clip.
MAX_PRODUCT_SIZE = 2**17
# Our choice: the largest polyphase kernel `resample` builds, in weights (float32; 2^22 =
# 16 MB, about a second to compute, and up to 16 are kept by `_kernel_blocks`' cache). Every
# common rate (8 to 384 kHz) to 16 kHz needs at most 0.22 M weights; the kernel grows with the
# reduced ratio's numerator, so an odd rate whose gcd with the target is small needs millions
# (44 099 Hz -> 16 kHz: 16 000 phases, 5.8 M weights, 2 s to compute; 9 999 991 Hz: 1.3 G
# weights, 5 GB). Such pairs are refused, not computed.
MAX_KERNEL_WEIGHTS = 2**22


def resampled_length(num_samples: int, orig_sr: int, new_sr: int) -> int:
    """Number of output samples: ``ceil(num_samples * new_sr / orig_sr)``.

    This is the number of output instants ``t_n = n * orig_sr / new_sr`` (in input samples)
    that fall inside ``[0, num_samples)``: the output covers the same duration as the input.
    """
    return -(-num_samples * new_sr // orig_sr)  # integer ceil division, exact for any size


def _frames_per_kernel(orig_sr: int, new_sr: int) -> tuple[int, int]:
    """(frame_outputs, frame_inputs) of `resample`'s kernel for this rate pair: ``up`` outputs
    spanning ``down`` inputs, several periods per frame when ``up`` is small (8 kHz -> 16 kHz has
    up = 2) so that the matrix products stay wide."""
    divisor = math.gcd(orig_sr, new_sr)
    up, down = new_sr // divisor, orig_sr // divisor
    periods_per_frame = -(-PHASES_PER_GROUP // up)
    return up * periods_per_frame, down * periods_per_frame


def kernel_weights(orig_sr: int, new_sr: int) -> int:
    """An upper bound on the number of weights `resample` would compute for this rate pair,
    from the rates alone (nothing is allocated): each group of PHASES_PER_GROUP phases gets
    the window rows its phases touch, which span at most ``(PHASES_PER_GROUP - 1) * down / up``
    inputs plus the kernel's width and one row of rounding on each side."""
    frame_outputs, frame_inputs = _frames_per_kernel(orig_sr, new_sr)
    cutoff = ROLLOFF * 0.5 * min(1.0, frame_outputs / frame_inputs)
    half_width = ZERO_CROSSINGS / (2.0 * cutoff)
    rows = (PHASES_PER_GROUP - 1) * frame_inputs / frame_outputs + 2 * half_width + 2
    groups = -(-frame_outputs // PHASES_PER_GROUP)
    return int(math.ceil(groups * PHASES_PER_GROUP * rows))


def check_resample(orig_sr: int, new_sr: int) -> None:
    """ValueError unless `resample` takes this rate pair: both positive integers, and a kernel
    of at most MAX_KERNEL_WEIGHTS weights (see there for why)."""
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} and {new_sr}")
    if orig_sr == new_sr:
        return
    weights = kernel_weights(int(orig_sr), int(new_sr))
    if weights > MAX_KERNEL_WEIGHTS:
        divisor = math.gcd(int(orig_sr), int(new_sr))
        raise ValueError(f"resampling {orig_sr} Hz to {new_sr} Hz would need a {weights / 1e6:.3g} M-weight filter "
                         f"(ratio {int(new_sr) // divisor}/{int(orig_sr) // divisor}; the limit is "
                         f"{MAX_KERNEL_WEIGHTS / 1e6:.3g} M); convert the file to a common rate such as "
                         f"16000, 22050, 44100 or 48000 Hz first")


def _kaiser_window(u: np.ndarray, beta: float) -> np.ndarray:
    """Continuous Kaiser window on ``u`` in [-1, 1] (zero outside)."""
    inside = np.abs(u) <= 1.0
    argument = beta * np.sqrt(np.clip(1.0 - u * u, 0.0, None))
    return np.where(inside, np.i0(argument) / np.i0(beta), 0.0)


@functools.lru_cache(maxsize=16)
def _kernel_blocks(
    frame_outputs: int, frame_inputs: int
) -> tuple[int, tuple[tuple[int, int, int, int, np.ndarray], ...]]:
    """Precompute the polyphase kernel for resampling by ``frame_outputs / frame_inputs``.

    A "frame" is ``frame_outputs`` consecutive outputs, which span exactly ``frame_inputs``
    inputs (``up`` and ``down``, or a common multiple of both).  Returns ``(pad, blocks)``.
    Frame ``k`` reads the input window ``x[k*frame_inputs - pad : (k+1)*frame_inputs + pad]``;
    each block is ``(first_phase, last_phase, first_row, last_row, weights)`` and means
    ``out[k*frame_outputs + first_phase : k*frame_outputs + last_phase]
    = window[first_row:last_row] @ weights``.
    """
    cutoff = ROLLOFF * 0.5 * min(1.0, frame_outputs / frame_inputs)  # cycles per input sample
    half_width = ZERO_CROSSINGS / (2.0 * cutoff)  # kernel support, in input samples
    pad = int(math.ceil(half_width))
    blocks = []
    for first_phase in range(0, frame_outputs, PHASES_PER_GROUP):
        last_phase = min(frame_outputs, first_phase + PHASES_PER_GROUP)
        phases = np.arange(first_phase, last_phase)
        # Output r of a frame sits r * frame_inputs / frame_outputs input samples after the
        # frame's start.  Split into integer and fractional parts: exact for any rates.
        whole, remainder = np.divmod(phases * frame_inputs, frame_outputs)
        offsets = whole + remainder / frame_outputs
        # Window rows that phase r touches: input offsets d with |offset_r - d| <= half_width
        # (row = d + pad; the clip only guards against float rounding at the edges).
        first_row = max(0, int(math.ceil(offsets[0] - half_width)) + pad)
        last_row = min(frame_inputs + 2 * pad, int(math.floor(offsets[-1] + half_width)) + pad + 1)
        input_offsets = np.arange(first_row, last_row) - pad  # d, relative to the frame start
        tau = offsets[None, :] - input_offsets[:, None]  # (rows, phases): t_n - i
        weights = 2.0 * cutoff * np.sinc(2.0 * cutoff * tau) * _kaiser_window(tau / half_width, KAISER_BETA)
        weights = weights.astype(np.float32)
        weights.flags.writeable = False
        blocks.append((first_phase, last_phase, first_row, last_row, weights))
    return pad, tuple(blocks)


def resample(waveform: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample a mono float waveform from ``orig_sr`` to ``new_sr`` Hz (band-limited).

    Args:
        waveform: 1-D array of samples (converted to float32).
        orig_sr: its sample rate in Hz (positive integer).
        new_sr: the wanted sample rate in Hz (positive integer).

    Returns:
        float32 array of length ``resampled_length(len(waveform), orig_sr, new_sr)``; output
        sample ``n`` is the band-limited input evaluated at time ``n / new_sr`` seconds.
        When the rates are equal the input is returned unchanged (as a float32 copy).

    Raises ValueError for a rate pair `check_resample` refuses (a kernel over
    MAX_KERNEL_WEIGHTS), before allocating anything.
    """
    samples = np.asarray(waveform, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"resample expects a 1-D waveform, got shape {samples.shape}")
    check_resample(orig_sr, new_sr)         # before any allocation
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr == new_sr:
        return samples.copy()

    num_outputs = resampled_length(len(samples), orig_sr, new_sr)
    if num_outputs == 0:
        return np.zeros(0, dtype=np.float32)

    # One frame = `up` outputs spanning exactly `down` inputs (several periods when `up` is small).
    frame_outputs, frame_inputs = _frames_per_kernel(orig_sr, new_sr)
    pad, blocks = _kernel_blocks(frame_outputs, frame_inputs)
    num_frames = -(-num_outputs // frame_outputs)
    window_length = frame_inputs + 2 * pad
    # Zero-pad so that every frame window exists: `pad` zeros before x[0], enough after.
    padded = np.zeros(num_frames * frame_inputs + 2 * pad, dtype=np.float32)
    padded[pad : pad + len(samples)] = samples
    # frames[k] = padded[k*frame_inputs : k*frame_inputs + window_length]: a strided view.
    frames = np.lib.stride_tricks.sliding_window_view(padded, window_length)[::frame_inputs]

    output = np.empty((num_frames, frame_outputs), dtype=np.float32)
    largest_block = max(weights.size for *_, weights in blocks)
    frames_per_chunk = max(1, MAX_PRODUCT_SIZE // largest_block)
    for start in range(0, num_frames, frames_per_chunk):
        stop = min(num_frames, start + frames_per_chunk)
        for first_phase, last_phase, first_row, last_row, weights in blocks:
            output[start:stop, first_phase:last_phase] = frames[start:stop, first_row:last_row] @ weights
    return output.reshape(-1)[:num_outputs]


def float_to_pcm16(waveform: np.ndarray) -> np.ndarray:
    """Convert float samples in [-1, 1) to int16 by rounding ``x * 32768`` (clipped).

    Not specified by FLAC; we use the 32768 scale because it is the exact inverse of the
    usual int16 -> float conversion (``x / 32768``, what soundfile returns), so a
    decoded-then-re-encoded file is unchanged.  Values outside [-1, 1) are clipped.
    """
    scaled = np.round(np.asarray(waveform, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def write_flac(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> None:
    """Write a mono waveform as 16-bit FLAC, atomically.

    ``waveform`` may be float (converted with :func:`float_to_pcm16`) or int16 (stored as is).
    The file is written to a temporary name in the same folder and moved into place with
    ``os.replace``, so a reader never sees a half-written file.
    """
    path = Path(path)
    samples = np.asarray(waveform)
    if samples.ndim != 1:
        raise ValueError(f"write_flac expects a 1-D (mono) waveform, got shape {samples.shape}")
    pcm = samples if samples.dtype == np.int16 else float_to_pcm16(samples)
    handle, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as temporary_file:
            soundfile.write(temporary_file, pcm, int(sample_rate), format="FLAC", subtype="PCM_16")
        os.replace(temporary_name, path)
    except BaseException:
        if os.path.exists(temporary_name):
            os.unlink(temporary_name)
        raise


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------

# The FLAC format's largest total-samples value (a 36-bit field).
_MAX_FLAC_SAMPLES = 2**36 - 1
# Implementation detail (memory only): frames per read when decoding a FLAC to its end.
_READ_BLOCK = 2**16


def _streaminfo_samples(stream: BinaryIO) -> tuple[int, int]:
    """(offset of the 5 bytes that hold STREAMINFO's total samples, total samples) of a FLAC.

    FLAC format specification: the stream starts "fLaC", then the mandatory STREAMINFO block
    (a 4-byte block header, type 0, 34 bytes of data); total samples is the low 36 bits of
    data bytes 13..17 (0 = unknown). An ID3v2 tag before "fLaC" (some taggers write one;
    libsndfile skips it) is skipped: 10 bytes of header, a 28-bit "syncsafe" size, and a
    10-byte footer if flag 0x10 is set. ValueError if the layout is not there."""
    stream.seek(0)
    start = 0
    head = stream.read(10)
    if head[:3] == b"ID3" and len(head) == 10:
        size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
        start = 10 + size + (10 if head[5] & 0x10 else 0)
    stream.seek(start)
    header = stream.read(4 + 4 + 34)
    if len(header) < 42 or header[:4] != b"fLaC" or header[4] & 0x7F != 0 \
            or int.from_bytes(header[5:8], "big") != 34:
        raise ValueError("not a FLAC stream starting with its 34-byte STREAMINFO block")
    return start + 8 + 13, int.from_bytes(header[8 + 13 : 8 + 18], "big") & _MAX_FLAC_SAMPLES


class _PatchedStream(io.RawIOBase):
    """A read-only view of an open binary file in which the bytes at `offset` read as `patch`."""

    def __init__(self, stream: BinaryIO, offset: int, patch: bytes):
        super().__init__()
        self._stream, self._offset, self._patch = stream, offset, patch

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def readinto(self, buffer) -> int:
        start = self._stream.tell()
        data = self._stream.read(len(buffer))
        view = memoryview(buffer).cast("B")
        view[: len(data)] = data
        first, last = max(start, self._offset), min(start + len(data), self._offset + len(self._patch))
        if first < last:
            view[first - start : last - start] = self._patch[first - self._offset : last - self._offset]
        return len(data)


def _read_at(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    return stream.read(size)


class _ForwardSoundFile(soundfile.SoundFile):
    """A SoundFile read front to back only. soundfile re-seeks to its own position after every
    read of a seekable file; past the real end of a FLAC whose header we replaced that seek
    fails, so we say the file is not seekable (then soundfile only reads)."""

    def seekable(self) -> bool:
        return False


def _flac_blocks(stream: BinaryIO, offset: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Decode a FLAC to its real end, in blocks of (frames, channels) float32, ignoring the
    total-samples count at `offset` (it is read as the largest value the field holds, so that
    libsndfile stops only when the data ends). With `limit`, stops after `limit` frames."""
    patch = (int.from_bytes(_read_at(stream, offset, 5), "big") | _MAX_FLAC_SAMPLES).to_bytes(5, "big")
    stream.seek(0)
    decoded = 0
    with _ForwardSoundFile(_PatchedStream(stream, offset, patch)) as sound:
        while limit is None or decoded < limit:
            wanted = _READ_BLOCK if limit is None else min(_READ_BLOCK, limit - decoded)
            block = sound.read(wanted, dtype="float32", always_2d=True)
            decoded += len(block)
            if len(block):
                yield block
            if len(block) < wanted:
                return



@dataclass(frozen=True)
class AudioInfo:
    """What `audio_info` found: frames per channel, rate in Hz, channels, libsndfile's format
    name ("FLAC", "WAV", ...)."""
    frames: int
    sample_rate: int
    channels: int
    format: str


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """``soundfile.info`` of a regular file (see `spg.files.open_regular_file`), except for a FLAC whose
    STREAMINFO gives 0 samples, which the FLAC format allows ("unknown"): libsndfile takes that
    as 2^63 - 1, so it is counted by decoding the file instead (constant memory, time in
    proportion to its length). Other FLAC counts are taken from the header (reading only
    headers keeps indexing a corpus fast); `read_audio_file` checks them against the data.
    ValueError or soundfile's errors for a file that is not readable audio."""
    with open_regular_file(path) as stream:
        with soundfile.SoundFile(stream.fileno(), closefd=False) as sound:
            info = AudioInfo(sound.frames, sound.samplerate, sound.channels, sound.format)
        if info.format == "FLAC":
            offset, total = _streaminfo_samples(stream)
            if total == 0:
                frames = sum(len(block) for block in _flac_blocks(stream, offset))
                info = AudioInfo(frames, info.sample_rate, info.channels, info.format)
        return info


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """All samples of a regular audio file as (frames, channels) float32, and its rate in Hz.

    Other formats are read by ``soundfile.read``. A FLAC is decoded to its real end rather than
    to the count in its STREAMINFO block (see the module docstring). When that count is 0
    ("unknown") the file is read whole. When it is not 0 and the data holds a different number
    of samples, the file is refused with a ValueError giving both. Our choice, refusing rather
    than reading all of it: `audio_info` reports the header's count (the corpus index takes
    lengths from headers), so the checks made on that length (--max-seconds, Whisper's 30 s
    window, the model's receptive field, length-sorted batching) would not have seen the real
    audio, and a header that contradicts the data marks a damaged or doctored file. At most
    one frame more than the header says is decoded, so a small header over hours of audio
    costs no memory."""
    with open_regular_file(path) as stream:
        with soundfile.SoundFile(stream.fileno(), closefd=False) as sound:
            sample_rate, channels, format_name = sound.samplerate, sound.channels, sound.format
            if format_name != "FLAC":
                return sound.read(dtype="float32", always_2d=True), sample_rate
        offset, total = _streaminfo_samples(stream)
        blocks = list(_flac_blocks(stream, offset, limit=None if total == 0 else total + 1))
    samples = np.concatenate(blocks) if blocks else np.zeros((0, channels), dtype=np.float32)
    if total and len(samples) != total:
        found = "more" if len(samples) > total else f"only {len(samples)}"
        raise ValueError(f"its FLAC STREAMINFO header says {total} samples ({total / sample_rate:.3f} s at "
                         f"{sample_rate} Hz) but the file holds {found}; the header is wrong or the file damaged "
                         f"(refused, not cut to the header's length; re-encode the file)")
    return samples, sample_rate
