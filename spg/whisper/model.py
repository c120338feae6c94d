"""Whisper (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision",
arXiv 2212.04356): the encoder-decoder network and greedy decoding with a KV cache. The
log-mel front end is `spg.whisper.audio`, the tokenizer `spg.whisper.tokenizer`, checkpoint
I/O `spg.whisper.io` (and `spg.whisper.ct2`); `spg.load` reads any of them.

    waveform (N,) 16 kHz ──> log_mel_spectrogram (30 s window)          -> (n_mels, 3000)
                         ──> encoder: 2 convs (stride 1, 2) + sinusoids
                                      + L pre-LN blocks + LayerNorm      -> (1500, D)
    tokens (S,)          ──> decoder: token + learned positions, L pre-LN blocks with causal
                                      self-attention and cross-attention, LayerNorm,
                                      logits = x @ embed_tokens^T (tied)  -> (S, V)

Module and parameter names mirror Hugging Face's `WhisperForConditionalGeneration` (minus its
`model.` prefix), so loading an HF folder is a key copy; `spg.whisper.ct2` converts CTranslate2
files.

What is shared with `spg.wav2vec2.model` and what is not, and why:
  * shared: the checkpoint plumbing of `spg.checkpoint` (`CheckpointError`, strict key
    checking), `spg.hf_weights` (safetensors / state-dict readers) and `spg.files` (atomic
    writes), the config checks of `spg.config`, and the conventions (HF field names,
    per-layer size lists so a compressed model rebuilds from its saved config);
  * not shared: the network blocks. `spg.wav2vec2.model.Attention` is bidirectional self-attention with
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

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spg.compress.interface import (AttentionUnits, AttentionWeights, FeedForwardUnits,
                                    ModuleWeights, StructuredUnits)
from spg.config import check_config_fields
from spg.whisper.audio import log_mel_spectrogram

__all__ = ["WhisperConfig", "Whisper", "Tokenizer", "MultiHeadAttention", "ResidualAttentionBlock", "WhisperEncoder",
           "WhisperDecoder", "sinusoids", "ENCODER_MATRICES", "DECODER_MATRICES", "STRUCTURED_MODULES"]


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
# 2. The network
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

# Structured modules per layer: (stack, attribute on the layer, role, report group, the config
# field holding the per-layer sizes). The FFN's fc1/fc2 sit on the layer itself ("ffn").
STRUCTURED_MODULES = (
    ("encoder", "self_attn", "self_attn", "encoder_heads", "encoder_layer_heads"),
    ("encoder", "ffn", "ffn", "encoder_ffn_units", "encoder_layer_ffn_dims"),
    ("decoder", "self_attn", "self_attn", "decoder_heads", "decoder_layer_heads"),
    ("decoder", "encoder_attn", "cross_attn", "decoder_cross_heads", "decoder_layer_cross_heads"),
    ("decoder", "ffn", "ffn", "decoder_ffn_units", "decoder_layer_ffn_dims"),
)


class Tokenizer(Protocol):
    """What the model needs of a tokenizer: ids -> text (`spg.whisper.tokenizer.WhisperTokenizer`)."""

    def decode(self, ids: Sequence[int]) -> str: ...



def check_whisper_weights(units: Mapping[str, StructuredUnits], weights: Mapping[str, ModuleWeights],
                          d_model: int) -> None:
    """ValueError unless every entry of `weights` names a module of `units` (the model's
    `structured_units` by name), is of its kind, has consistent shapes, keeps Whisper's full
    head width and has no k_proj bias (Whisper's k_proj has none): the checks `rebuild` of
    Whisper and of the Whisper-CTC model share."""
    for name, new in weights.items():
        if name not in units:
            raise ValueError(f"no module {name!r} in this Whisper")
        module = units[name]
        if isinstance(module, AttentionUnits) != isinstance(new, AttentionWeights):
            raise ValueError(f"{name}: expected {'attention' if isinstance(module, AttentionUnits) else 'feed-forward'} weights")
        new.validate(d_model)
        if isinstance(new, AttentionWeights):
            if any(w != module.head_dim for w in new.qk_head_dims + new.v_head_dims):
                raise ValueError(f"{name}: Whisper heads keep their width {module.head_dim}; "
                                 f"got {new.qk_head_dims} / {new.v_head_dims}")
            if new.k_bias is not None:
                raise ValueError(f"{name}: Whisper's k_proj has no bias")


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
        self.tokenizer: Optional[Tokenizer] = None   # a WhisperTokenizer, set by the loaders; saved with the model

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
                   tokenizer: Optional[Tokenizer] = None, batch_size: int = 8) -> list[str]:
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

    # --- structured units and rebuilding (spg.compress.interface.PrunableModel) ------
    def structured_units(self) -> list[StructuredUnits]:
        """Layer by layer: encoder (self_attn, ffn), then decoder (self_attn, encoder_attn =
        role "cross_attn", ffn). Names are module paths ("decoder.layers.1.encoder_attn"),
        the FFN's "encoder.layers.0.ffn" (its fc1/fc2 sit on the layer). Heads are whole:
        every head keeps the width d_model / attention_heads."""
        result: list[StructuredUnits] = []
        for stack in ("encoder", "decoder"):
            for i, layer in enumerate(getattr(self, stack).layers):
                for module_stack, attribute, role, group, _ in STRUCTURED_MODULES:
                    if module_stack != stack:
                        continue
                    name = f"{stack}.layers.{i}.{attribute}"
                    if role == "ffn":
                        result.append(FeedForwardUnits(name=name, stack=stack, role=role, group=group, layer=i,
                                                       fc1=layer.fc1, fc2=layer.fc2))
                        continue
                    a = getattr(layer, attribute)
                    result.append(AttentionUnits(
                        name=name, stack=stack, role=role, group=group, layer=i,
                        q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj, out_proj=a.out_proj,
                        qk_head_dims=(a.head_dim,) * a.num_heads, v_head_dims=(a.head_dim,) * a.num_heads,
                        head_dim=a.head_dim, head_dims_prunable=False))
        return result

    @torch.no_grad()
    def rebuild(self, weights: Mapping[str, ModuleWeights]) -> "Whisper":
        """A new Whisper whose named modules (`structured_units` names) hold the given
        weights; their head / neuron counts go into the config's per-layer size lists
        (`encoder_layer_heads`, ...; written for every module kind). Heads must have the
        full width; k_proj has no bias (k_bias None). Everything else is copied; `self` is
        not modified; same device, dtype, train/eval mode, tokenizer and a copy of
        `compression`."""
        units = {u.name: u for u in self.structured_units()}
        check_whisper_weights(units, weights, self.config.d_model)
        config = copy.deepcopy(self.config)
        for stack, attribute, role, _, field_name in STRUCTURED_MODULES:
            sizes = []
            for i in range(len(getattr(self, stack).layers)):
                name = f"{stack}.layers.{i}.{attribute}"
                new = weights.get(name)
                if new is None:
                    new_size = units[name].num_units if role == "ffn" else units[name].num_heads
                else:
                    new_size = new.num_units if role == "ffn" else new.num_heads
                sizes.append(new_size)
            setattr(config, field_name, sizes)
        state = dict(self.state_dict())
        reference = self.decoder.embed_tokens.weight
        for name, new in weights.items():
            layer_path = name.rpartition(".")[0]
            if isinstance(new, AttentionWeights):
                tensors = {f"{name}.q_proj.weight": new.q_weight, f"{name}.q_proj.bias": new.q_bias,
                           f"{name}.k_proj.weight": new.k_weight,
                           f"{name}.v_proj.weight": new.v_weight, f"{name}.v_proj.bias": new.v_bias,
                           f"{name}.out_proj.weight": new.out_weight, f"{name}.out_proj.bias": new.out_bias}
            else:
                tensors = {f"{layer_path}.fc1.weight": new.fc1_weight, f"{layer_path}.fc1.bias": new.fc1_bias,
                           f"{layer_path}.fc2.weight": new.fc2_weight, f"{layer_path}.fc2.bias": new.fc2_bias}
            for key, tensor in tensors.items():
                state[key] = tensor.detach().to(device=reference.device, dtype=reference.dtype)
        new_model = Whisper(config).to(device=reference.device, dtype=reference.dtype)
        new_model.load_state_dict(state)
        new_model.train(self.training)
        new_model.tokenizer = self.tokenizer
        new_model.compression = copy.deepcopy(self.compression)
        return new_model
