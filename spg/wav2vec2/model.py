"""A wav2vec2 / HuBERT encoder with a CTC head, in one readable file.

The model follows the Hugging Face implementation (`transformers.Wav2Vec2ForCTC`) module for
module, and the attribute names mirror HF's, so loading a checkpoint is mostly a key copy:

    waveform (B, N) ──> feature_extractor (7 strided 1-D convs)       -> (B, C, T)
                    ──> feature_projection (LayerNorm + Linear)       -> (B, T, D)
                    ──> encoder: positional conv + L transformer blocks -> (B, T, D)
                    ──> lm_head (Linear to the character vocabulary)   -> (B, T, V) logits

Two layouts exist (Baevski et al. 2020, "wav2vec 2.0", arXiv 2006.11477):
  * "base"  (`feat_extract_norm="group"`, `do_stable_layer_norm=False`): GroupNorm on the
    first conv only, post-LN blocks, `encoder.layer_norm` *before* the blocks;
  * "large" (`feat_extract_norm="layer"`, `do_stable_layer_norm=True`): LayerNorm on every
    conv, pre-LN blocks, `encoder.layer_norm` *after* the last block.
HuBERT (Hsu et al. 2021, arXiv 2106.07447) is the same network; only the HF key prefix
(`hubert.` instead of `wav2vec2.`) and an optional feature-projection LayerNorm differ.

Compression support: every block can have its own number of heads, its own per-head
query/key and value widths, and its own FFN width (see `ModelConfig.layer_*`), so a model
that was pruned or merged differently in every block is rebuilt from its saved config.

The public call is `logits, frame_lengths = model(waveforms, lengths)`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from spg.compress.interface import (AttentionUnits, AttentionWeights, FeedForwardUnits,
                                    ModuleWeights, StructuredUnits)
from spg.config import check_config_fields

# The 32-token character vocabulary of facebook/wav2vec2-base-960h (id 0 = CTC blank).
DEFAULT_VOCAB: list[str] = [
    "<pad>", "<s>", "</s>", "<unk>", "|",
    "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F", "G",
    "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z",
]
WORD_DELIMITER = "|"

# Names of the six prunable matrices of a block, as (sub-module path, HF name).
PRUNABLE_MATRICES: tuple[str, ...] = (
    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj",
    "feed_forward.intermediate_dense", "feed_forward.output_dense",
)


@dataclass
class ModelConfig:
    """Model dimensions. Field names are Hugging Face's `Wav2Vec2Config` names; the comment
    after each gives the fairseq option it corresponds to."""

    model_type: str = "wav2vec2"              # "wav2vec2" or "hubert" (fairseq: _name)
    hidden_size: int = 768                    # fairseq: encoder_embed_dim
    num_hidden_layers: int = 12               # fairseq: encoder_layers
    num_attention_heads: int = 12             # fairseq: encoder_attention_heads
    intermediate_size: int = 3072             # fairseq: encoder_ffn_embed_dim
    hidden_act: str = "gelu"                  # fairseq: activation_fn
    layer_norm_eps: float = 1e-5
    conv_dim: tuple[int, ...] = (512,) * 7    # fairseq: conv_feature_layers (dim, kernel, stride)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False                   # fairseq: conv_bias
    feat_extract_norm: str = "group"          # fairseq: extractor_mode ("default" -> group, "layer_norm" -> layer)
    feat_extract_activation: str = "gelu"
    feat_proj_layer_norm: bool = True         # HuBERT option; wav2vec2 always has this LayerNorm
    do_stable_layer_norm: bool = False        # fairseq: layer_norm_first
    num_conv_pos_embeddings: int = 128        # fairseq: conv_pos
    num_conv_pos_embedding_groups: int = 16   # fairseq: conv_pos_groups
    vocab_size: int = 32                      # rows of fairseq's w2v_encoder.proj
    pad_token_id: int = 0                     # the CTC blank
    # Regularisation, active only in training mode.
    hidden_dropout: float = 0.1               # fairseq: dropout
    attention_dropout: float = 0.1            # fairseq: attention_dropout
    activation_dropout: float = 0.1           # fairseq: activation_dropout
    feat_proj_dropout: float = 0.0            # fairseq: dropout_input
    final_dropout: float = 0.1                # fairseq: final_dropout
    layerdrop: float = 0.1                    # fairseq: encoder_layerdrop / layerdrop
    mask_time_prob: float = 0.05              # fairseq: mask_prob (SpecAugment over time)
    mask_time_length: int = 10                # fairseq: mask_length
    mask_time_min_masks: int = 2
    # Input normalisation (HF keeps this in preprocessor_config.json; fairseq: normalize).
    do_normalize: bool = True
    # Per-block sizes after compression; None means "the uniform value above".
    layer_num_heads: Optional[list[int]] = None
    layer_intermediate_sizes: Optional[list[int]] = None
    layer_qk_head_dims: Optional[list[list[int]]] = None   # per block, per head
    layer_v_head_dims: Optional[list[list[int]]] = None    # per block, per head

    # --- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one head of the *unpruned* model; sets the attention scale 1/sqrt(d)."""
        return self.hidden_size // self.num_attention_heads

    def block_qk_head_dims(self, block: int) -> list[int]:
        if self.layer_qk_head_dims is not None:
            return list(self.layer_qk_head_dims[block])
        return [self.head_dim] * self.block_num_heads(block)

    def block_v_head_dims(self, block: int) -> list[int]:
        if self.layer_v_head_dims is not None:
            return list(self.layer_v_head_dims[block])
        return [self.head_dim] * self.block_num_heads(block)

    def block_num_heads(self, block: int) -> int:
        if self.layer_qk_head_dims is not None:
            return len(self.layer_qk_head_dims[block])
        if self.layer_num_heads is not None:
            return self.layer_num_heads[block]
        return self.num_attention_heads

    def block_intermediate_size(self, block: int) -> int:
        if self.layer_intermediate_sizes is not None:
            return self.layer_intermediate_sizes[block]
        return self.intermediate_size

    @property
    def min_input_samples(self) -> int:
        """Shortest waveform (in samples) that gives one output frame: the receptive field of
        the conv stack, 1 + sum_i (k_i - 1) * prod_{j<i} s_j (400 samples = 25 ms by default)."""
        samples, jump = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            samples += (kernel - 1) * jump
            jump *= stride
        return samples

    @property
    def is_uniform(self) -> bool:
        """True when every block has the unpruned shape (so HF can represent the model)."""
        return all(
            self.block_qk_head_dims(i) == [self.head_dim] * self.num_attention_heads
            and self.block_v_head_dims(i) == [self.head_dim] * self.num_attention_heads
            and self.block_intermediate_size(i) == self.intermediate_size
            for i in range(self.num_hidden_layers)
        )

    def validate(self) -> None:
        """Raise ValueError, naming the field, for values that make no model."""
        check_config_fields(self, positive_ints=(
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "vocab_size", "mask_time_length"),
            non_negative_ints=("pad_token_id", "mask_time_min_masks"),
            probabilities=("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout",
                           "final_dropout", "layerdrop", "mask_time_prob"),
            positive_floats=("layer_norm_eps",),
            bools=("conv_bias", "feat_proj_layer_norm", "do_stable_layer_norm", "do_normalize"),
            choices={"hidden_act": ("gelu", "relu"), "feat_extract_activation": ("gelu",),
                     "feat_extract_norm": ("group", "layer"), "model_type": ("wav2vec2", "hubert")},
            positive_int_lists=("conv_dim", "conv_kernel", "conv_stride"),
            optional_size_lists=("layer_num_heads", "layer_intermediate_sizes"),
            optional_nested_size_lists=("layer_qk_head_dims", "layer_v_head_dims"))
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} must be below vocab_size={self.vocab_size}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_conv_pos_embedding_groups "
                             f"{self.num_conv_pos_embedding_groups}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride)):
            raise ValueError("conv_dim, conv_kernel and conv_stride must have the same length, got "
                             f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}")
        for name in ("layer_num_heads", "layer_intermediate_sizes", "layer_qk_head_dims", "layer_v_head_dims"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(value)} entries, expected num_hidden_layers="
                                 f"{self.num_hidden_layers}")
        if (self.layer_qk_head_dims is None) != (self.layer_v_head_dims is None):
            raise ValueError("layer_qk_head_dims and layer_v_head_dims must be given together")
        if self.layer_qk_head_dims is not None:
            for block, (qk, v) in enumerate(zip(self.layer_qk_head_dims, self.layer_v_head_dims)):
                if len(qk) != len(v):
                    raise ValueError(f"block {block}: {len(qk)} query/key head widths but {len(v)} value widths")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Build from a dict, ignoring keys this model does not use (HF configs carry many)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        for key in ("conv_dim", "conv_kernel", "conv_stride"):
            if isinstance(kwargs.get(key), (list, tuple)):
                kwargs[key] = tuple(kwargs[key])
        config = cls(**kwargs)
        config.validate()
        return config


def preset(name: str) -> ModelConfig:
    """Configs of the public checkpoints (shapes only) and the tiny CPU model."""
    base = dict(model_type="wav2vec2")
    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    presets = {
        "wav2vec2-base": dict(base),                                   # facebook/wav2vec2-base-100h
        "wav2vec2-large-lv60": dict(base, **large),                    # facebook/wav2vec2-large-960h-lv60-self
        "hubert-base": dict(model_type="hubert", feat_proj_layer_norm=False, do_normalize=False),
        "hubert-large": dict(model_type="hubert", **large),            # facebook/hubert-large-ls960-ft
        # The built-in CPU model: a real wav2vec2 "large"-layout network, scaled down.
        # Layer-norm feature extractor + pre-LN blocks make batched and single-utterance
        # outputs identical, and train more stably from scratch than the post-LN layout.
        "tiny": dict(base, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                     conv_dim=(128,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                     num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=16),
    }
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    config = ModelConfig(**presets[name])
    config.validate()
    return config


# ----------------------------------------------------------------------------------------
# Feature extractor: raw waveform -> frames (stride 320 samples = 20 ms with the defaults)
# ----------------------------------------------------------------------------------------

class ConvLayer(nn.Module):
    """Conv1d -> (GroupNorm | LayerNorm | nothing) -> GELU. HF: Wav2Vec2*ConvLayer."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        in_channels = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_channels = config.conv_dim[layer_id]
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=config.conv_kernel[layer_id],
                              stride=config.conv_stride[layer_id], bias=config.conv_bias)
        self.norm_kind = "none"
        if config.feat_extract_norm == "layer":
            self.norm_kind = "layer"
            self.layer_norm = nn.LayerNorm(out_channels)
        elif layer_id == 0:  # "group" mode normalises only the first conv, one group per channel
            self.norm_kind = "group"
            self.layer_norm = nn.GroupNorm(num_groups=out_channels, num_channels=out_channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)                                            # (B, C, T)
        if self.norm_kind == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)  # normalise over C
        elif self.norm_kind == "group":
            x = self.layer_norm(x)                                  # normalise each channel over T
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.conv_layers = nn.ModuleList(ConvLayer(config, i) for i in range(len(config.conv_dim)))

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        x = waveforms[:, None, :]                   # (B, 1, N)
        for conv_layer in self.conv_layers:
            x = conv_layer(x)
        return x.transpose(1, 2)                    # (B, T, C)


class FeatureProjection(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps) \
            if config.feat_proj_layer_norm else None
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.layer_norm is not None:
            features = self.layer_norm(features)
        return self.dropout(self.projection(features))      # (B, T, D)


# ----------------------------------------------------------------------------------------
# Transformer encoder
# ----------------------------------------------------------------------------------------

class WeightNormConv(nn.Module):
    """A grouped Conv1d whose weight is g * v / ||v|| (weight norm with dim=2, as HF/fairseq).

    The norm is taken per kernel position k over the (out, in) dimensions. Parameters keep
    the legacy names `weight_g` (1, 1, K) and `weight_v` (D, D/groups, K)."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.groups = groups
        self.padding = kernel_size // 2
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel_size * channels)))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def weight(self) -> torch.Tensor:
        # = weight_v * (weight_g / weight_v.norm(dim=(0, 1), keepdim=True)), as one fused kernel
        # (the one torch.nn.utils.parametrizations.weight_norm calls; ~5x faster on CPU).
        return torch._weight_norm(self.weight_v, self.weight_g, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    """Relative positions from a wide grouped convolution over time, then GELU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.conv = WeightNormConv(config.hidden_size, config.num_conv_pos_embeddings,
                                   config.num_conv_pos_embedding_groups)
        self.remove_last = config.num_conv_pos_embeddings % 2 == 0  # "same" padding for even K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))                # (B, D, T + 1 if K even)
        if self.remove_last:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)                # (B, T, D)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """nn.Linear that may have zero rows or columns (a fully pruned block) without torch's
    "Initializing zero-element tensors is a no-op" warning."""
    if in_features and out_features:
        return nn.Linear(in_features, out_features)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features)


class Attention(nn.Module):
    """Multi-head self-attention whose heads may have different widths.

    q/k/v/out are ordinary Linear layers over the *packed* head dimensions (head 0's dims,
    then head 1's, ...). When every head has the same width the packed tensor is simply
    viewed as (B, T, H, d). When widths differ (fine-grained pruning), each head is
    zero-padded to the widest head of the block with one precomputed index copy: the zero
    query/key dims add nothing to q·k, and the padded value dims are dropped again before
    `out_proj`, so the result is exact and attention still runs as one batched call.
    The scale stays 1/sqrt(head width of the unpruned model), as in the original network."""

    def __init__(self, hidden_size: int, qk_head_dims: list[int], v_head_dims: list[int],
                 scaling: float, dropout: float):
        super().__init__()
        self.num_heads = len(qk_head_dims)
        self.qk_head_dims = list(qk_head_dims)
        self.v_head_dims = list(v_head_dims)
        self.scaling = scaling
        self.dropout = dropout
        self.q_proj = _linear(hidden_size, sum(qk_head_dims))
        self.k_proj = _linear(hidden_size, sum(qk_head_dims))
        self.v_proj = _linear(hidden_size, sum(v_head_dims))
        self.out_proj = _linear(sum(v_head_dims), hidden_size)
        self.max_qk = max(qk_head_dims, default=0)
        self.max_v = max(v_head_dims, default=0)
        self.uniform = len(set(qk_head_dims)) <= 1 and len(set(v_head_dims)) <= 1
        self.register_buffer("qk_slots", self._slots(qk_head_dims), persistent=False)
        self.register_buffer("v_slots", self._slots(v_head_dims), persistent=False)

    @staticmethod
    def _slots(head_dims: list[int]) -> torch.Tensor:
        """Position of every packed dim inside the padded (H * max_width) layout."""
        width = max(head_dims, default=0)
        return torch.tensor([h * width + j for h, d in enumerate(head_dims) for j in range(d)], dtype=torch.long)

    def _split_heads(self, packed: torch.Tensor, slots: torch.Tensor, width: int) -> torch.Tensor:
        batch, frames, _ = packed.shape
        if not self.uniform:  # scatter into zero-padded per-head slots
            padded = packed.new_zeros(batch, frames, self.num_heads * width)
            packed = padded.index_copy(2, slots, packed)
        return packed.view(batch, frames, self.num_heads, width).transpose(1, 2)   # (B, H, T, d)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, frames, _ = x.shape
        if self.num_heads == 0 or self.max_v == 0:       # fully pruned: only the output bias remains
            return self.out_proj(x.new_zeros(batch, frames, self.out_proj.in_features))
        q = self._split_heads(self.q_proj(x), self.qk_slots, self.max_qk)   # (B, H, T, dqk)
        k = self._split_heads(self.k_proj(x), self.qk_slots, self.max_qk)   # (B, H, T, dqk)
        v = self._split_heads(self.v_proj(x), self.v_slots, self.max_v)     # (B, H, T, dv)
        attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, T)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scaling,
                                                 dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, dv)
        context = context.transpose(1, 2).reshape(batch, frames, self.num_heads * self.max_v)   # (B, T, H*dv)
        if not self.uniform:
            context = context.index_select(2, self.v_slots)                   # (B, T, sum dv)
        return self.out_proj(context)


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, config: ModelConfig):
        super().__init__()
        self.intermediate_dense = _linear(hidden_size, intermediate_size)
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.output_dense = _linear(intermediate_size, hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)
        if config.hidden_act not in ("gelu", "relu"):
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (use 'gelu' or 'relu')")
        self.activation = F.gelu if config.hidden_act == "gelu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.intermediate_dropout(self.activation(self.intermediate_dense(x)))   # (B, T, F)
        return self.output_dropout(self.output_dense(x))                              # (B, T, D)


class EncoderLayer(nn.Module):
    """One transformer block; post-LN ("base") or pre-LN ("stable layer norm", "large")."""

    def __init__(self, config: ModelConfig, block: int):
        super().__init__()
        self.pre_layer_norm = config.do_stable_layer_norm
        self.attention = Attention(config.hidden_size, config.block_qk_head_dims(block),
                                   config.block_v_head_dims(block), config.head_dim ** -0.5,
                                   config.attention_dropout)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config.hidden_size, config.block_intermediate_size(block), config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.pre_layer_norm:
            x = x + self.dropout(self.attention(self.layer_norm(x), key_padding_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, key_padding_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_layer_norm = config.do_stable_layer_norm
        self.layerdrop = config.layerdrop
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if frame_mask is not None:
            x = x * frame_mask[:, :, None].to(x.dtype)       # padded frames are zero, as in HF
        x = x + self.pos_conv_embed(x)
        if not self.pre_layer_norm:
            x = self.layer_norm(x)
        x = self.dropout(x)
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue                                     # LayerDrop (Fan et al. 2019)
            x = layer(x, frame_mask)
        if self.pre_layer_norm:
            x = self.layer_norm(x)
        return x                                             # (B, T, D)


# ----------------------------------------------------------------------------------------
# The full CTC model
# ----------------------------------------------------------------------------------------

class Wav2Vec2CTC(nn.Module):
    """wav2vec2 / HuBERT encoder + linear CTC head. `model(waveforms, lengths)` returns
    `(logits (B, T, V), frame_lengths (B,))`."""

    def __init__(self, config: ModelConfig, vocab: Optional[list[str]] = None):
        super().__init__()
        config.validate()
        self.config = config
        self.vocab = list(vocab) if vocab is not None else list(DEFAULT_VOCAB)
        if len(self.vocab) != config.vocab_size:
            raise ValueError(f"vocabulary has {len(self.vocab)} tokens but config.vocab_size is {config.vocab_size}")
        self.feature_extractor = FeatureExtractor(config)
        self.feature_projection = FeatureProjection(config)
        # HF creates the SpecAugment mask embedding only when masking is enabled.
        self.masked_spec_embed = nn.Parameter(torch.rand(config.hidden_size)) if config.mask_time_prob > 0 else None
        self.encoder = Encoder(config)
        self.dropout = nn.Dropout(config.final_dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.compression: dict = {}      # free-form metadata saved with the checkpoint

    @property
    def blank_id(self) -> int:
        """The CTC blank: the config's `pad_token_id` (0 in the default vocabulary; the last id
        in the common Hugging Face fine-tuning recipe). The loss and every decoding use it."""
        return self.config.pad_token_id

    def encoder_blocks(self) -> nn.ModuleList:
        """The transformer blocks in order, each returning its output (B, T, C) (the
        interface's `DistillableModel`: what L0's distillation hooks)."""
        return self.encoder.layers

    # --- lengths -----------------------------------------------------------------
    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames per input length: floor((L - k) / s) + 1 for every conv."""
        for kernel, stride in zip(self.config.conv_kernel, self.config.conv_stride):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=0)

    # --- forward -----------------------------------------------------------------
    def extract_features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """The convolutional front end alone: (B, N) -> (B, T, C). The compression methods
        never touch it, so training can cache its output (see `forward(features=...)`)."""
        return self.feature_extractor(waveforms)

    def forward(self, waveforms: Optional[torch.Tensor], lengths: Optional[torch.Tensor] = None, *,
                features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms: float (B, N) at 16 kHz (already normalised if `config.do_normalize`);
        lengths: (B,) valid samples per row, or None when nothing is padded.
        `features` may replace `waveforms` with precomputed `extract_features` output."""
        if features is None:
            features = self.extract_features(waveforms)                     # (B, T, C)
        batch, frames, _ = features.shape
        if lengths is None:
            frame_lengths = torch.full((batch,), frames, dtype=torch.long, device=features.device)
            frame_mask = None
        else:
            frame_lengths = self.frame_lengths(lengths.to(features.device).long()).clamp(max=frames)
            frame_mask = torch.arange(frames, device=features.device)[None, :] < frame_lengths[:, None]  # (B, T)
        hidden = self.feature_projection(features)                           # (B, T, D)
        if self.training and self.masked_spec_embed is not None:
            hidden = self._mask_time(hidden, frame_lengths)
        hidden = self.encoder(hidden, frame_mask)                            # (B, T, D)
        logits = self.lm_head(self.dropout(hidden))                          # (B, T, V)
        return logits, frame_lengths

    def _mask_time(self, hidden: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        """SpecAugment-style time masking (Park et al. 2019) with the learned embedding.
        HF's sampler is approximated: per utterance, round(p * T / span + u) spans, at least
        `mask_time_min_masks`, of `mask_time_length` frames at uniform random starts.
        Not a detail the compression papers specify; it only regularises fine-tuning."""
        span = self.config.mask_time_length
        mask = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        for row, length in enumerate(frame_lengths.tolist()):
            if length <= span:
                continue
            num_spans = max(self.config.mask_time_min_masks,
                            int(self.config.mask_time_prob * length / span + float(torch.rand(()))))
            starts = torch.randint(0, length - span + 1, (num_spans,))
            for start in starts.tolist():
                mask[row, start:start + span] = True
        return torch.where(mask[:, :, None], self.masked_spec_embed.to(hidden.dtype), hidden)

    # --- helpers -----------------------------------------------------------------
    def prunable_linears(self) -> list[tuple[str, nn.Linear]]:
        """The six prunable matrices of every block as (name, module), e.g.
        ("encoder.layers.0.attention.q_proj", Linear)."""
        result = []
        for i, layer in enumerate(self.encoder.layers):
            for path in PRUNABLE_MATRICES:
                result.append((f"encoder.layers.{i}.{path}", layer.get_submodule(path)))
        return result

    def num_parameters(self, nonzero_only: bool = False) -> int:
        return sum(int(p.count_nonzero()) if nonzero_only else p.numel() for p in self.parameters())

    # --- structured units and rebuilding (spg.compress.interface.PrunableModel) ------
    def structured_units(self) -> list[StructuredUnits]:
        """Per block, its self-attention ("encoder.layers.i.attention", report group
        "heads"; heads of any width) and its FFN ("encoder.layers.i.feed_forward", group
        "ffn_units"; intermediate_dense = fc1, output_dense = fc2)."""
        result: list[StructuredUnits] = []
        for i, layer in enumerate(self.encoder.layers):
            a, f = layer.attention, layer.feed_forward
            result.append(AttentionUnits(
                name=f"encoder.layers.{i}.attention", stack="encoder", role="self_attn", group="heads", layer=i,
                q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj, out_proj=a.out_proj,
                qk_head_dims=tuple(a.qk_head_dims), v_head_dims=tuple(a.v_head_dims),
                head_dim=self.config.head_dim, head_dims_prunable=True))
            result.append(FeedForwardUnits(
                name=f"encoder.layers.{i}.feed_forward", stack="encoder", role="ffn", group="ffn_units", layer=i,
                fc1=f.intermediate_dense, fc2=f.output_dense))
        return result

    @torch.no_grad()
    def rebuild(self, weights: Mapping[str, ModuleWeights]) -> "Wav2Vec2CTC":
        """A new model in which the named modules (`structured_units` names) hold the given
        weights. Their sizes (number of heads, per-head query/key and value widths, FFN
        neurons; zero included) become that block's sizes in the new config
        (`layer_num_heads`, `layer_intermediate_sizes`, and `layer_qk_head_dims` /
        `layer_v_head_dims` only when some head is not of width `config.head_dim`, so whole-
        head pruning keeps the simpler config; the attention scale stays
        1/sqrt(config.head_dim)). Everything else (feature extractor, projections, layer
        norms, positional conv, CTC head) is copied; `self` is not modified. The new model
        has this model's device and dtype (those of its CTC head), vocabulary, train/eval
        mode and a deep copy of `compression` (callers add their own record)."""
        config, hidden = self.config, self.config.hidden_size
        units = {u.name: u for u in self.structured_units()}
        for name, new in weights.items():
            if name not in units:
                raise ValueError(f"no module {name!r} in this model")
            if isinstance(units[name], AttentionUnits) != isinstance(new, AttentionWeights):
                raise ValueError(f"{name}: expected {'attention' if isinstance(units[name], AttentionUnits) else 'feed-forward'} weights")
            new.validate(hidden)
            if isinstance(new, AttentionWeights) and new.k_bias is None:
                raise ValueError(f"{name}: wav2vec2 attention needs a k_proj bias")
        qk_dims, v_dims, ffn_sizes = [], [], []
        for i in range(config.num_hidden_layers):
            attention = weights.get(f"encoder.layers.{i}.attention")
            current = units[f"encoder.layers.{i}.attention"]
            qk_dims.append(list(attention.qk_head_dims if attention else current.qk_head_dims))
            v_dims.append(list(attention.v_head_dims if attention else current.v_head_dims))
            ffn = weights.get(f"encoder.layers.{i}.feed_forward")
            ffn_sizes.append(ffn.num_units if ffn else units[f"encoder.layers.{i}.feed_forward"].num_units)
        new_config = copy.deepcopy(config)
        new_config.layer_num_heads = [len(dims) for dims in qk_dims]
        new_config.layer_intermediate_sizes = list(ffn_sizes)
        if all(d == config.head_dim for dims in qk_dims + v_dims for d in dims):
            new_config.layer_qk_head_dims = new_config.layer_v_head_dims = None
        else:
            new_config.layer_qk_head_dims = [list(dims) for dims in qk_dims]
            new_config.layer_v_head_dims = [list(dims) for dims in v_dims]
        new_config.validate()

        state = self.state_dict()
        for name, new in weights.items():
            if isinstance(new, AttentionWeights):
                tensors = [("q_proj.weight", new.q_weight), ("q_proj.bias", new.q_bias),
                           ("k_proj.weight", new.k_weight), ("k_proj.bias", new.k_bias),
                           ("v_proj.weight", new.v_weight), ("v_proj.bias", new.v_bias),
                           ("out_proj.weight", new.out_weight), ("out_proj.bias", new.out_bias)]
            else:
                tensors = [("intermediate_dense.weight", new.fc1_weight), ("intermediate_dense.bias", new.fc1_bias),
                           ("output_dense.weight", new.fc2_weight), ("output_dense.bias", new.fc2_bias)]
            for suffix, tensor in tensors:
                key = f"{name}.{suffix}"
                state[key] = tensor.detach().to(dtype=state[key].dtype, device=state[key].device)

        new_model = Wav2Vec2CTC(new_config, self.vocab)
        # Match device and dtype first (load_state_dict copies values, it keeps the target's dtype).
        reference = self.lm_head.weight
        new_model.to(device=reference.device, dtype=reference.dtype)
        new_model.load_state_dict(state, strict=True)
        new_model.compression = copy.deepcopy(self.compression)
        new_model.train(self.training)
        return new_model

    @torch.no_grad()
    def transcribe(self, waveforms: list[torch.Tensor]) -> list[str]:
        """Greedy-decode a list of 1-D 16 kHz waveforms, one at a time (exact for any layout)."""
        was_training = self.training
        self.eval()
        texts = []
        for waveform in waveforms:
            waveform = waveform.float().reshape(1, -1)
            if self.config.do_normalize:
                waveform = normalize_waveforms(waveform)
            logits, frame_lengths = self(waveform.to(self.lm_head.weight.device))
            texts.extend(ctc_greedy_decode(logits, frame_lengths, self.vocab, self.blank_id))
        self.train(was_training)
        return texts


def normalize_waveforms(waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its valid samples, as HF's
    Wav2Vec2FeatureExtractor: (x - mean) / sqrt(var + 1e-7); padding stays 0."""
    if lengths is None:
        lengths = torch.full((waveforms.shape[0],), waveforms.shape[1], device=waveforms.device)
    valid = torch.arange(waveforms.shape[1], device=waveforms.device)[None, :] < lengths[:, None]  # (B, N)
    count = lengths.clamp(min=1)[:, None].to(waveforms.dtype)
    mean = (waveforms * valid).sum(1, keepdim=True) / count
    var = (((waveforms - mean) * valid) ** 2).sum(1, keepdim=True) / count
    return torch.where(valid, (waveforms - mean) / torch.sqrt(var + 1e-7), torch.zeros_like(waveforms))


def ctc_greedy_decode(logits: torch.Tensor, frame_lengths: torch.Tensor, vocab: list[str],
                      blank_id: int = 0) -> list[str]:
    """Best path decoding: argmax per frame, merge repeats, drop blanks, `|` -> space.
    Special tokens (<s>, </s>, <unk>) are dropped. `blank_id`: the model's `blank_id` (the
    default 0 is the default vocabulary's `<pad>`)."""
    best = logits.argmax(dim=-1).cpu()                                  # (B, T)
    texts = []
    for row, length in zip(best, frame_lengths.tolist()):
        ids = row[:length].tolist()
        tokens = [vocab[i] for j, i in enumerate(ids) if i != blank_id and (j == 0 or ids[j - 1] != i)]
        text = "".join(" " if t == WORD_DELIMITER else t for t in tokens if not (t.startswith("<") and t.endswith(">")))
        texts.append(" ".join(text.split()))
    return texts
