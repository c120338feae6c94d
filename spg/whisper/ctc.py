"""Whisper's pretrained encoder with a linear CTC head: a speech foundation encoder fine-tuned
with CTC, the setting the compression papers work in (they compress wav2vec2/HuBERT encoders
fine-tuned with CTC; Whisper's encoder is the pretrained encoder we have offline).

    waveform (N,) 16 kHz ──> log-mel (80, N/160), no 30 s padding            (see below)
                         ──> conv1 (k3) + GELU, conv2 (k3, stride 2) + GELU  -> (T, D), T = ceil(N/320)
                         ──> + the first T sinusoidal positions
                         ──> L pre-LN blocks (key-padding mask) + LayerNorm -> (T, D)
                         ──> dropout, lm_head                               -> (T, V) CTC logits

The encoder is `spg.whisper.model.WhisperEncoder`'s modules, weights and names
(`encoder.conv1`, `encoder.layers.i.self_attn.q_proj`, ...); the decoder is dropped. The CTC
head is new: one linear layer over the character vocabulary of `spg.data` (blank = <pad> = 0).

Inputs shorter than 30 s: not specified by the paper (Whisper is trained on 30 s windows only,
padded with zeros); we use the first T positional embeddings and no padding, as whisper.cpp's
`audio_ctx` option does, because padding a 3 s utterance to 30 s makes every step 10x dearer
and CTC then has to learn to ignore 27 s of silence. The log-mel's dynamic-range clamp
(max - 8) is taken over the utterance itself. What this costs the pretrained model is measured
in the README ("Whisper encoder with a CTC head").

Batches: the front end runs on each utterance alone (its log-mel and convs would otherwise
see the zeros of padding), and the blocks take a key-padding mask, so a batched forward
equals the one-utterance forward of each row.

The model speaks the same interface as `spg.wav2vec2.model.Wav2Vec2CTC` to the CTC training
loop (`model(waveforms, lengths) -> (logits, frame_lengths)`, `extract_features`, `vocab`,
`blank_id`) and to the compression methods (`prunable_linears`, `structured_units`,
`rebuild`, `num_parameters`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spg.compress.interface import AttentionUnits, AttentionWeights, FeedForwardUnits, ModuleWeights, StructuredUnits
from spg.config import check_config_fields
from spg.whisper.audio import HOP_LENGTH, N_FFT, log_mel_spectrogram
from spg.whisper.model import ENCODER_MATRICES, WhisperConfig, WhisperEncoder, check_whisper_weights

__all__ = ["WhisperCTCConfig", "WhisperCTC", "ctc_config_from_whisper"]

# The character vocabulary (the same list as spg.data.DEFAULT_VOCAB, repeated so that this model file
# stands alone): wav2vec2's English CTC vocabulary, <pad> = blank first.
DEFAULT_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L",
                 "U", "M", "W", "C", "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z"]


@dataclass
class WhisperCTCConfig:
    """The encoder's dimensions (HF `WhisperConfig` names) and the CTC head's."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500          # 30 s after the stride-2 conv
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0                      # residual dropout in the blocks (Whisper: 0)
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    final_dropout: float = 0.0                # before the CTC head
    vocab_size: int = 32                      # CTC outputs, blank included
    pad_token_id: int = 0                     # the CTC blank
    pretrained: str = ""                      # which Whisper the encoder came from, e.g. "whisper-tiny.en"
    encoder_layer_heads: Optional[list[int]] = None       # per-layer sizes after compression
    encoder_layer_ffn_dims: Optional[list[int]] = None
    # What the CTC training loop asks of a model config (as wav2vec2's): the waveform is not
    # normalised (Whisper's log-mel normalises itself), and batching is exact.
    do_normalize: bool = False

    @property
    def min_input_samples(self) -> int:
        """The log-mel's reflect padding needs more than n_fft / 2 samples; one frame more."""
        return N_FFT // 2 + HOP_LENGTH

    def validate(self) -> None:
        check_config_fields(self, positive_ints=("num_mel_bins", "d_model", "encoder_layers",
                                                 "encoder_attention_heads", "encoder_ffn_dim",
                                                 "max_source_positions", "vocab_size"),
                            non_negative_ints=("pad_token_id",),
                            probabilities=("dropout", "attention_dropout", "activation_dropout", "final_dropout"),
                            positive_floats=("layer_norm_eps",), bools=("do_normalize",),
                            choices={"activation_function": ("gelu", "relu")},
                            optional_size_lists=("encoder_layer_heads", "encoder_layer_ffn_dims"))
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by encoder_attention_heads "
                             f"{self.encoder_attention_heads}")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} must be below vocab_size={self.vocab_size}")
        if self.do_normalize:
            raise ValueError("do_normalize must be false: Whisper's log-mel takes the raw waveform")
        for name in ("encoder_layer_heads", "encoder_layer_ffn_dims"):
            value = getattr(self, name)
            if value is not None and len(value) != self.encoder_layers:
                raise ValueError(f"{name} must list {self.encoder_layers} sizes, got {value}")

    def encoder_config(self) -> WhisperConfig:
        """The `WhisperConfig` that `WhisperEncoder` is built from (its decoder fields are unused)."""
        fields = {f.name for f in dataclasses.fields(WhisperConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in fields and k not in ("vocab_size",
                                                                                                    "pad_token_id")}
        return WhisperConfig(**values, decoder_layers=1, decoder_attention_heads=self.encoder_attention_heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "WhisperCTCConfig":
        """Build from a dict; an unknown key is an error (our files write only these)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        config = cls(**values)
        config.validate()
        return config


def ctc_config_from_whisper(config: WhisperConfig, *, vocab_size: int = len(DEFAULT_VOCAB),
                            pretrained: str = "") -> WhisperCTCConfig:
    """The CTC model's config for the encoder of a Whisper of `config` (its compressed
    per-layer sizes included)."""
    fields = {f.name for f in dataclasses.fields(WhisperCTCConfig)}
    values = {k: copy.deepcopy(v) for k, v in dataclasses.asdict(config).items()
              if k in fields and k not in ("vocab_size", "pad_token_id")}
    return WhisperCTCConfig(**values, vocab_size=vocab_size, pretrained=pretrained)


class WhisperCTC(nn.Module):
    """Whisper encoder + linear CTC head. `model(waveforms, lengths)` returns
    `(logits (B, T, V), frame_lengths (B,))`, as `Wav2Vec2CTC` does."""

    def __init__(self, config: WhisperCTCConfig, vocab: Optional[Sequence[str]] = None):
        super().__init__()
        config.validate()
        self.config = config
        self.vocab = list(vocab) if vocab is not None else list(DEFAULT_VOCAB)
        if len(self.vocab) != config.vocab_size:
            raise ValueError(f"vocabulary has {len(self.vocab)} tokens but config.vocab_size is {config.vocab_size}")
        self.encoder = WhisperEncoder(config.encoder_config())
        self.dropout = nn.Dropout(config.final_dropout)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        self.compression: dict = {}      # free-form metadata saved with the checkpoint

    @classmethod
    def from_whisper(cls, whisper: nn.Module, *, vocab: Optional[Sequence[str]] = None, pretrained: str = "",
                     seed: int = 0) -> "WhisperCTC":
        """The encoder of `whisper` (a `spg.whisper.model.Whisper`, weights copied) and a new
        CTC head drawn with `seed` (nn.Linear's default init)."""
        vocab = list(vocab) if vocab is not None else list(DEFAULT_VOCAB)
        config = ctc_config_from_whisper(whisper.config, vocab_size=len(vocab), pretrained=pretrained)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls(config, vocab)
        model.encoder.load_state_dict(whisper.encoder.state_dict())
        return model.eval()

    # --- what the CTC loop needs -------------------------------------------------
    @property
    def blank_id(self) -> int:
        return self.config.pad_token_id

    @property
    def feature_extractor(self) -> nn.ModuleList:
        """The front end's trained modules (conv1, conv2), as `Wav2Vec2CTC.feature_extractor`:
        what the CTC loop freezes and whose outputs it caches."""
        return nn.ModuleList([self.encoder.conv1, self.encoder.conv2])

    def encoder_blocks(self) -> nn.ModuleList:
        """The transformer blocks in order, each returning its output (B, T, C) (the
        interface's `DistillableModel`: what L0's distillation hooks)."""
        return self.encoder.layers

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames per input length: N // 160 log-mel frames (the STFT's last frame is
        dropped), then ceil(T / 2) after the stride-2 conv."""
        mel_frames = torch.div(lengths, HOP_LENGTH, rounding_mode="floor")
        return torch.div(mel_frames + 1, 2, rounding_mode="floor").clamp(min=0)

    def extract_features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """The front end (log-mel, two convs) of unpadded waveforms: (B, N) -> (B, T, D). The
        compression methods never touch it, so training can cache its output."""
        mel = torch.stack([log_mel_spectrogram(w, self.config.num_mel_bins, n_samples=None) for w in waveforms])
        mel = mel.to(self.encoder.conv1.weight)                               # (B, n_mels, N // 160)
        x = F.gelu(self.encoder.conv1(mel))
        return F.gelu(self.encoder.conv2(x)).transpose(1, 2)                  # (B, T, D)

    def forward(self, waveforms: Optional[torch.Tensor], lengths: Optional[torch.Tensor] = None, *,
                features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms: float (B, N) at 16 kHz, zero-padded; lengths: (B,) valid samples per row,
        or None when nothing is padded. `features` may replace `waveforms` with precomputed
        `extract_features` output (rows padded with anything: they are masked)."""
        if features is None:
            if lengths is None:
                features = self.extract_features(waveforms)
            else:                                          # each row's front end on its own samples
                rows = [self.extract_features(w[None, :n]) for w, n in zip(waveforms, lengths.tolist())]
                features = nn.utils.rnn.pad_sequence([r[0] for r in rows], batch_first=True)   # (B, T, D)
        batch, frames, _ = features.shape
        if lengths is None:
            frame_lengths = torch.full((batch,), frames, dtype=torch.long, device=features.device)
        else:
            frame_lengths = self.frame_lengths(lengths.to(features.device).long()).clamp(max=frames)
        positions = self.encoder.embed_positions.weight
        if frames > positions.shape[0]:
            raise ValueError(f"{frames} frames exceed max_source_positions={positions.shape[0]} (30 s of audio)")
        x = self.encoder.dropout(features + positions[:frames].to(features.dtype))          # (B, T, D)
        mask = None
        if lengths is not None and bool((frame_lengths < frames).any()):
            keys = torch.arange(frames, device=x.device)[None, :] < frame_lengths[:, None]   # (B, T)
            mask = keys[:, None, None, :]                                                   # (B, 1, 1, T)
        for layer in self.encoder.layers:
            x = layer(x, mask=mask)
        hidden = self.encoder.layer_norm(x)                                  # (B, T, D)
        return self.lm_head(self.dropout(hidden)), frame_lengths            # (B, T, V)

    # --- the compression interface (spg.compress.interface.PrunableModel) ----------
    def prunable_linears(self) -> list[tuple[str, nn.Linear]]:
        """The six matrices of every encoder block as (name, module), e.g.
        ("encoder.layers.0.self_attn.q_proj", Linear)."""
        return [(f"encoder.layers.{i}.{path}", layer.get_submodule(path))
                for i, layer in enumerate(self.encoder.layers) for path in ENCODER_MATRICES]

    def num_parameters(self, nonzero_only: bool = False) -> int:
        return sum(int(p.count_nonzero()) if nonzero_only else p.numel() for p in self.parameters())

    def structured_units(self) -> list[StructuredUnits]:
        """Per block, its self-attention ("encoder.layers.i.self_attn", group "encoder_heads")
        and its FFN ("encoder.layers.i.ffn", group "encoder_ffn_units"), as Whisper's encoder.
        Heads are whole: every head keeps the width d_model / encoder_attention_heads."""
        result: list[StructuredUnits] = []
        for i, layer in enumerate(self.encoder.layers):
            a = layer.self_attn
            result.append(AttentionUnits(
                name=f"encoder.layers.{i}.self_attn", stack="encoder", role="self_attn", group="encoder_heads",
                layer=i, q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj, out_proj=a.out_proj,
                qk_head_dims=(a.head_dim,) * a.num_heads, v_head_dims=(a.head_dim,) * a.num_heads,
                head_dim=a.head_dim, head_dims_prunable=False))
            result.append(FeedForwardUnits(name=f"encoder.layers.{i}.ffn", stack="encoder", role="ffn",
                                           group="encoder_ffn_units", layer=i, fc1=layer.fc1, fc2=layer.fc2))
        return result

    @torch.no_grad()
    def rebuild(self, weights: Mapping[str, ModuleWeights]) -> "WhisperCTC":
        """A new model whose named modules (`structured_units` names) hold the given weights;
        their head / neuron counts become the config's `encoder_layer_heads` /
        `encoder_layer_ffn_dims`. Heads keep their full width; k_proj has no bias. Everything
        else is copied; `self` is not modified; same device, dtype, train/eval mode, vocabulary
        and a copy of `compression`."""
        units = {u.name: u for u in self.structured_units()}
        check_whisper_weights(units, weights, self.config.d_model)
        config = copy.deepcopy(self.config)
        config.encoder_layer_heads, config.encoder_layer_ffn_dims = [], []
        state = dict(self.state_dict())
        for i in range(config.encoder_layers):
            attention, ffn = f"encoder.layers.{i}.self_attn", f"encoder.layers.{i}.ffn"
            config.encoder_layer_heads.append((weights[attention] if attention in weights else units[attention]).num_heads)
            config.encoder_layer_ffn_dims.append((weights[ffn] if ffn in weights else units[ffn]).num_units)
        for name, new in weights.items():
            if isinstance(new, AttentionWeights):
                tensors = {f"{name}.q_proj.weight": new.q_weight, f"{name}.q_proj.bias": new.q_bias,
                           f"{name}.k_proj.weight": new.k_weight,
                           f"{name}.v_proj.weight": new.v_weight, f"{name}.v_proj.bias": new.v_bias,
                           f"{name}.out_proj.weight": new.out_weight, f"{name}.out_proj.bias": new.out_bias}
            else:
                layer = name.rpartition(".")[0]
                tensors = {f"{layer}.fc1.weight": new.fc1_weight, f"{layer}.fc1.bias": new.fc1_bias,
                           f"{layer}.fc2.weight": new.fc2_weight, f"{layer}.fc2.bias": new.fc2_bias}
            for key, tensor in tensors.items():
                state[key] = tensor.detach()
        reference = self.lm_head.weight
        new_model = WhisperCTC(config, self.vocab).to(device=reference.device, dtype=reference.dtype)
        new_model.load_state_dict(state)
        new_model.compression = copy.deepcopy(self.compression)
        new_model.train(self.training)
        return new_model
