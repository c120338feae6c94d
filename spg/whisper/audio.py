"""Whisper's log-mel front end (numpy, float64; matches transformers' WhisperFeatureExtractor
and openai's whisper/audio.py): 16 kHz waveform -> (n_mels, 3000) features of one 30 s window."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

__all__ = ["SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "CHUNK_LENGTH", "N_SAMPLES", "N_FRAMES", "mel_filter_bank",
           "hann_window", "pad_or_trim", "log_mel_spectrogram"]

# Audio front end constants (whisper/audio.py). One window is 30 s = 3000 frames of 10 ms;
# the encoder's stride-2 conv turns it into 1500 positions of 20 ms.
SAMPLE_RATE = 16000
N_FFT = 400                       # 25 ms window
HOP_LENGTH = 160                  # 10 ms hop
CHUNK_LENGTH = 30                 # seconds
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE   # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH       # 3000


def _hertz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    freq = np.asarray(freq, dtype=np.float64)
    linear = 3.0 * freq / 200.0                              # 1000 Hz -> 15 mel
    log = 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(freq >= 1000.0, log, linear)


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    linear = 200.0 * mels / 3.0
    log = 1000.0 * np.exp((mels - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mels >= 15.0, log, linear)


def mel_filter_bank(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-style triangular mel filters with area normalisation, as librosa.filters.mel
    (norm="slaney", htk=False) and HF's mel_filter_bank. Returns (n_mels, n_fft // 2 + 1)."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)                   # (F,)
    mel_points = np.linspace(_hertz_to_mel(0.0), _hertz_to_mel(sample_rate / 2), n_mels + 2)
    edges = _mel_to_hertz(mel_points)                                               # (n_mels + 2,) Hz
    widths = np.diff(edges)                                                         # (n_mels + 1,)
    slopes = edges[None, :] - fft_freqs[:, None]                                    # (F, n_mels + 2)
    rising = -slopes[:, :-2] / widths[:-1]                                          # (F, n_mels)
    falling = slopes[:, 2:] / widths[1:]                                            # (F, n_mels)
    filters = np.maximum(0.0, np.minimum(rising, falling))                          # (F, n_mels)
    filters *= 2.0 / (edges[2:] - edges[:-2])                                       # equal area per filter
    return filters.T                                                                # (n_mels, F)


def hann_window(length: int = N_FFT) -> np.ndarray:
    """The periodic Hann window (torch.hann_window's default), as Whisper uses."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)


def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """Zero-pad at the end or cut to `length` samples, as whisper.audio.pad_or_trim."""
    if audio.shape[-1] >= length:
        return audio[..., :length]
    return np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, length - audio.shape[-1])])


def log_mel_spectrogram(audio: Union[np.ndarray, torch.Tensor], n_mels: int = 80,
                        n_samples: Optional[int] = N_SAMPLES) -> torch.Tensor:
    """Whisper's input features for one 16 kHz waveform: (N,) -> (n_mels, n_samples / 160).

    Steps, as openai's log_mel_spectrogram and HF's WhisperFeatureExtractor:
      1. pad with zeros / trim to `n_samples` (30 s; None keeps the length as is);
      2. STFT: reflect-pad n_fft/2 at both ends ("center"), 400-sample periodic Hann
         frames every 160 samples, |X|^2; the last frame is dropped (3001 -> 3000);
      3. slaney mel filterbank, log10 of max(power, 1e-10);
      4. dynamic range: max(x, x.max() - 8), then (x + 4) / 4.
    Computed in float64 numpy and returned as float32 torch."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    if n_samples is not None:
        audio = pad_or_trim(audio, n_samples)
    padded = np.pad(audio, (N_FFT // 2, N_FFT // 2), mode="reflect")              # (N + 400,)
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]  # (T + 1, 400)
    spectrum = np.fft.rfft(frames * hann_window(N_FFT), axis=-1)                    # (T + 1, 201)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    mel = power[:-1] @ mel_filter_bank(n_mels).T                                    # (T, n_mels)
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return torch.from_numpy(log_spec.T.astype(np.float32))                         # (n_mels, T)
