"""Checkpoint plumbing shared by every model family: our one file format (`write_checkpoint`,
`read_checkpoint`, with sparse storage of pruned matrices), errors, atomic writes, safetensors,
Hugging Face weight files, a restricted unpickler, and copying a state dict into a model with
strict key, shape and dtype checks.

Nothing here knows a network: the family readers (`spg.wav2vec2.io`, `spg.whisper.io`,
`spg.whisper.ct2`) translate key names and configs and call these helpers. Loading never runs
code from a file:
  * our files and `pytorch_model.bin` go through `torch.load(weights_only=True)`;
  * safetensors files are parsed here, by hand (the format is a JSON header + raw bytes),
    accepting what the reference reader accepts;
  * other pickles (fairseq's) go through a restricted unpickler that admits tensors, plain
    containers and inert stand-ins for argparse/omegaconf/fairseq config objects, and refuses
    the rest (`read_torch_file`);
  * before torch reads a file, `check_torch_file` refuses the calls torch's loader admits
    that cost more than the file's size, and zip records that would inflate past it.
Loaders count a model's parameters from its config before building it
(`check_parameter_budget`, `check_layer_budget`). Every failure raises `CheckpointError`,
whose message names the file and the offending keys.

Sections: 1. errors and small helpers   2. our file: sparse storage, one format for every
          model family   3. Hugging Face weight files
          4. safetensors   5. restricted unpickler   6. installing and checking weights
          7. atomic writes
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import copyreg
import io
import json
import math
import os
import pickle
import pickletools
import sys
import tempfile
import warnings
import zipfile
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Optional, Union

import numpy
import torch

__all__ = ["CheckpointError", "format_keys", "read_json", "first_line", "short_repr", "MAX_PARAMETERS", "MAX_LAYERS",
           "check_parameter_budget", "check_layer_budget", "encode_state_dict", "decode_state_dict",
           "FORMAT_NAME", "FORMAT_VERSION", "FAMILIES", "OLD_FORMATS", "FORMAT_NAMES", "write_checkpoint",
           "checkpoint_family", "read_checkpoint", "non_finite_entries", "element_count",
           "read_hf_weights", "read_safetensors", "write_safetensors", "check_torch_file", "read_torch_file",
           "to_plain",
           "install_state_dict", "check_finite", "check_plain_data", "atomic_write"]

PathLike = Union[str, os.PathLike]


# ========================================================================================
# 1. Errors and small helpers
# ========================================================================================

class CheckpointError(ValueError):
    """A checkpoint could not be read. The message names the file and what was wrong."""


def format_keys(keys: Iterable[str], limit: int = 10) -> str:
    """'a, b, c' for short lists, 'a, ..., j ... and 7 more' for long ones."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def read_json(path: str) -> Any:
    """The content of a JSON file (config.json, tokenizer.json, ...), or CheckpointError naming
    the file: for invalid UTF-8 or JSON, nesting too deep for Python's parser (RecursionError)
    and integers of more than 4300 digits (which Python refuses to convert)."""
    try:
        with open(path, "rb") as file:
            return json.loads(file.read().decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: not readable JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:      # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not readable JSON ({first_line(error)})") from None


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for messages about values read from a file
    (which may be huge, or hold integers too long for repr)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 100:
        return f"<a {type(value).__name__} of {len(value):,} items>"
    try:
        text = repr(value)
    except ValueError:                               # an int of more than 4300 digits inside
        return f"<a {type(value).__name__} holding an integer too long to print>"
    return text if len(text) <= limit else text[:limit] + "..."


_MAX_DIMENSION = 2**63 - 1      # torch sizes are int64


def element_count(shape: Any) -> Optional[int]:
    """The number of elements of a tensor of shape `shape`, or None unless `shape` is a list of
    integers (not bools) in 0..2^63-1, the sizes torch can hold, whose running product (left
    to right, as the safetensors reference computes it) stays below 2^64."""
    if not isinstance(shape, (list, tuple)):
        return None
    count = 1
    for size in shape:
        if type(size) is not int or not 0 <= size <= _MAX_DIMENSION:
            return None
        count *= size
        if count >= 2**64:
            return None
    return count


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# The largest model a config may describe: the largest released speech models have about
# 2·10^9 parameters (wav2vec2 XLS-R 2B: 2.2·10^9; Whisper large: 1.55·10^9), 3·10^9 take
# 12 GB in fp32. A few bytes of config can ask for far more (an FFN of 10^9 units), so every
# loader counts the parameters from the config before it allocates anything. Layers are
# bounded separately: a 10^6-layer model of width 1 has few parameters but takes minutes and
# gigabytes of Python objects to build (the largest released models have 48).
MAX_PARAMETERS = 3_000_000_000
MAX_LAYERS = 1000
PARAMETERS_VARIABLE, LAYERS_VARIABLE = "SPG_MAX_PARAMETERS", "SPG_MAX_LAYERS"


def _limit(variable: str, default: int) -> int:
    """The limit set by environment variable `variable`, else `default`."""
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise CheckpointError(f"{variable}={text!r}: expected a positive integer")
    return value


def check_parameter_budget(count: int, source: str) -> None:
    """Raise CheckpointError unless a model of `count` parameters (counted from its config,
    before anything is allocated) is within MAX_PARAMETERS, or the limit that the environment
    variable SPG_MAX_PARAMETERS sets."""
    limit = _limit(PARAMETERS_VARIABLE, MAX_PARAMETERS)
    if count > limit:
        raise CheckpointError(f"{source}: the config describes a model of {count:,} parameters, more than the "
                              f"limit of {limit:,} (set {PARAMETERS_VARIABLE} to load it anyway)")


def check_layer_budget(count: int, source: str, field: str) -> None:
    """Raise CheckpointError unless `count` layers (config field `field`) are within
    MAX_LAYERS, or the limit that the environment variable SPG_MAX_LAYERS sets."""
    limit = _limit(LAYERS_VARIABLE, MAX_LAYERS)
    if count > limit:
        raise CheckpointError(f"{source}: {field} asks for {count:,} layers, more than the limit of {limit:,} "
                              f"(set {LAYERS_VARIABLE} to load it anyway)")


# ========================================================================================
# 2. Our file: sparse storage of pruned matrices, one format for every model family
# ========================================================================================

def encode_state_dict(state: dict[str, torch.Tensor], *, half: bool) -> dict[str, Any]:
    """The checkpoint entries that hold the weights: {"state_dict": {name: dense tensor}} and,
    when some matrix is worth storing sparse, {"sparse": {name: {"shape", "mask", "values"}}}.

    Sparse form of a tensor with n entries, k of them non-zero: "mask" is the n-bit keep
    mask packed 8 per byte (uint8, most significant bit first, like np.packbits) and
    "values" the k non-zero entries in row-major order, in the stored dtype. It takes
    n/8 + k·b bytes against n·b dense (b = 4 for fp32, 2 for fp16), so it is used for a
    floating-point matrix exactly when its zero fraction exceeds 1/(8·b), i.e. when it is
    smaller. (Zeros are found after the fp16 cast, so the stored values round-trip exactly;
    a −0.0 comes back as +0.0, which computes the same.)"""
    dense, sparse = {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        if tensor.is_floating_point() and tensor.ndim >= 2 and tensor.numel() > 0:
            keep = tensor != 0
            zeros = tensor.numel() - int(keep.sum())
            if zeros * 8 * tensor.element_size() > tensor.numel():
                sparse[name] = {"shape": list(tensor.shape), "mask": _pack_bits(keep.flatten()),
                                "values": tensor[keep].clone()}
                continue
        dense[name] = tensor
    return {"state_dict": dense, "sparse": sparse} if sparse else {"state_dict": dense}


def payload_bytes(state: dict[str, torch.Tensor], *, half: bool) -> int:
    """Bytes of weight data `encode_state_dict` stores for `state`: the values (fp16 with
    `half`, else as they are) plus one mask bit per entry of each sparse matrix, without the
    container's overhead. With half=True this is the limit a file of fp16 non-zeros and a
    1-bit keep mask can reach."""
    encoded = encode_state_dict(state, half=half)
    total = sum(t.numel() * t.element_size() for t in encoded["state_dict"].values())
    for entry in encoded.get("sparse", {}).values():
        total += entry["mask"].numel() * entry["mask"].element_size()
        total += entry["values"].numel() * entry["values"].element_size()
    return total


def decode_state_dict(checkpoint: dict, source: str) -> dict[str, torch.Tensor]:
    """Inverse of `encode_state_dict`: {name: tensor} in whatever dtype was stored (the
    copy into the model casts fp16 back to the model's fp32)."""
    dense = checkpoint.get("state_dict")
    if not isinstance(dense, dict):
        raise CheckpointError(f"{source}: 'state_dict' is missing or not a dict")
    sparse = checkpoint.get("sparse", {})
    if not isinstance(sparse, dict):
        raise CheckpointError(f"{source}: 'sparse' is not a dict")
    state = dict(dense)
    for name, entry in sparse.items():
        if name in state:
            raise CheckpointError(f"{source}: {name} is stored both dense and sparse")
        state[name] = _decode_sparse(entry, f"{source}: sparse entry {name}")
    return state


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """1-D bool (n,) -> uint8 (ceil(n/8),), 8 bits per byte, most significant bit first."""
    padded = torch.zeros(-(-bits.numel() // 8) * 8, dtype=torch.uint8)
    padded[:bits.numel()] = bits
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `_pack_bits`: uint8 (ceil(n/8),) -> bool (count,)."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & 1).flatten()[:count].bool()


def _decode_sparse(entry: Any, where: str) -> torch.Tensor:
    if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("mask"), torch.Tensor) and isinstance(entry.get("values"), torch.Tensor)):
        raise CheckpointError(f"{where}: expected {{'shape': list, 'mask': tensor, 'values': tensor}}")
    shape, mask, values = entry["shape"], entry["mask"], entry["values"]
    count = element_count(shape)
    if count is None or count > _MAX_DIMENSION:
        raise CheckpointError(f"{where}: shape {short_repr(shape)} is not a list of sizes in 0..2^63-1 "
                              "with at most 2^63-1 elements")
    if mask.dtype != torch.uint8 or mask.ndim != 1 or mask.numel() != -(-count // 8):
        raise CheckpointError(f"{where}: the mask should be {-(-count // 8)} uint8 bytes for shape {shape}, "
                              f"got {mask.dtype} {tuple(mask.shape)}")
    keep = _unpack_bits(mask, count)
    if values.ndim != 1 or values.numel() != int(keep.sum()):
        raise CheckpointError(f"{where}: the mask keeps {int(keep.sum())} entries but "
                              f"{tuple(values.shape)} values are stored")
    dense = torch.zeros(count, dtype=values.dtype)
    dense[keep] = values
    return dense.reshape(shape)            # (an empty tensor may have any dimensions beside its 0)


# ----------------------------------------------------------------------------------------
# Our file, for every model family: torch.save of a plain dict (readable with
# torch.load(weights_only=True); nothing executable), written atomically:
#     {"format": "spg", "version": 1 | 2 | 3, "family": "wav2vec2" | "whisper" | "whisper-ctc",
#      "config": the model config's to_dict(), "state_dict" (+ "sparse"): see encode_state_dict,
#      "compression": model.compression, and the family's own entries:
#      "vocab": [token, ...] (wav2vec2) or "tokenizer": {...} (Whisper, when it has one)}
# Versions: 1 every tensor dense, wav2vec2/HuBERT only ("family" may be absent before 3, and
# can only be "wav2vec2"); 2 adds "sparse"; 3 adds families other than wav2vec2. A file says the oldest version that holds it (a dense
# wav2vec2 is 1, a pruned one 2, any Whisper 3), so older readers keep reading what they can,
# and refuse a Whisper file by its version instead of misreading it as wav2vec2.
# Also read: {"format": "spg-whisper", "version": 1} (Whisper, dense, before version 3).
# ----------------------------------------------------------------------------------------

FORMAT_NAME = "spg"
FORMAT_VERSION = 3                              # the newest version this spg reads and writes
FAMILIES = ("wav2vec2", "whisper", "whisper-ctc")
OLD_FORMATS = {"spg-whisper": ("whisper", 1)}   # older format names: (family, newest version)
FORMAT_NAMES = (FORMAT_NAME, *OLD_FORMATS)


def write_checkpoint(path: PathLike, *, family: str, config: dict, state: dict[str, torch.Tensor],
                     compression: dict, extras: Optional[dict] = None, half: bool = False) -> None:
    """Write a model of `family` in our format (above), atomically. `extras` are the family's
    own entries; half=True stores floating-point weights as fp16 (loaded back as fp32)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    check_plain_data(compression, "model.compression")
    check_plain_data(extras or {}, f"the {family} entries")
    weights = encode_state_dict(state, half=half)
    version = 3 if family != "wav2vec2" else 2 if "sparse" in weights else 1
    checkpoint = {"format": FORMAT_NAME, "version": version, "family": family, "config": config,
                  **(extras or {}), **weights, "compression": compression}
    atomic_write(os.fspath(path), lambda file: torch.save(checkpoint, file))


def checkpoint_family(checkpoint: Any, source: str) -> Optional[str]:
    """The model family of a file of ours already read with torch.load, once its format
    version is checked; None when `checkpoint` is not ours (no format name we write)."""
    name = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if not isinstance(name, str) or name not in FORMAT_NAMES:
        return None
    family, newest = OLD_FORMATS.get(name, (None, FORMAT_VERSION))
    version = checkpoint.get("version")
    if type(version) is not int or not 1 <= version <= newest:
        raise CheckpointError(f"{source}: format {name!r} version {version!r} is not supported "
                              f"(this spg reads versions 1..{newest}; a newer spg wrote it?)")
    if family is None:
        family = checkpoint.get("family", "wav2vec2" if version < 3 else None)
        if family not in FAMILIES:
            raise CheckpointError(f"{source}: 'family' is {family!r}; this spg knows "
                                  f"{', '.join(map(repr, FAMILIES))}")
        if version < 3 and family != "wav2vec2":
            raise CheckpointError(f"{source}: a {family} model needs format version 3, the file says {version}")
    return family


def read_checkpoint(checkpoint: Any, source: str, *, family: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config values, {name: tensor}, compression) of a file of ours already read with
    torch.load, after checking that it holds a model of `family`. The family's own entries
    ("vocab", "tokenizer") are left to its reader."""
    found = checkpoint_family(checkpoint, source)
    expected = f"format {FORMAT_NAME!r} with family {family!r}" + "".join(
        f" or format {old!r}" for old, (holds, _) in OLD_FORMATS.items() if holds == family)
    if found is None:
        raise CheckpointError(f"{source}: not an spg checkpoint (expected {expected}, written by spg.save)")
    if found != family:
        raise CheckpointError(f"{source}: holds a {found} model, not {family} (expected {expected})")
    if not isinstance(checkpoint.get("config"), dict):
        raise CheckpointError(f"{source}: 'config' is missing or not a dict")
    state = decode_state_dict(checkpoint, source)
    compression = checkpoint.get("compression") or {}
    if not isinstance(compression, dict):
        raise CheckpointError(f"{source}: 'compression' is not a dict")
    return checkpoint["config"], state, compression


# ========================================================================================
# 3. Hugging Face weight files (safetensors or pytorch_model.bin, possibly sharded)
# ========================================================================================

def read_hf_weights(folder: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(file name for messages, {HF key: tensor}) from the first weights file found, in
    transformers' order of preference: safetensors, sharded safetensors, .bin, sharded .bin."""
    for name, read in [("model.safetensors", _read_safetensors_file), ("pytorch_model.bin", _read_torch_state_dict)]:
        single, index = os.path.join(folder, name), os.path.join(folder, name + ".index.json")
        if os.path.isfile(single):
            return single, read(single)
        if os.path.isfile(index):
            return index, _read_sharded(index, read)
    raise CheckpointError(f"{folder}: no weights found (expected model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin)")


def _read_sharded(index_path: str, read_shard: Callable[[str], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' object")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise CheckpointError(f"{index_path}: shard name {shard!r} must be a plain file name in the same folder")
        tensors.update(read_shard(os.path.join(os.path.dirname(index_path), shard)))
    listed_but_absent = [key for key in weight_map if key not in tensors]
    if listed_but_absent:
        raise CheckpointError(f"{index_path}: keys listed in weight_map but absent from their shards: "
                              f"{format_keys(listed_but_absent)}")
    return tensors


def _read_torch_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin`: a pickled {name: tensor}, read with weights_only=True."""
    check_torch_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


# ========================================================================================
# 4. safetensors, by hand
#
# Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
# N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
# {str: str}}, then the raw little-endian tensor bytes; offsets count from the end of the
# header. Readers (the Rust library included) require the tensors to tile the data section
# with no gaps, so the writer packs them back to back and pads the header with spaces to a
# multiple of 8 bytes, which keeps every fp32 tensor 4-byte aligned.
#
# The reader accepts what the reference reader (the `safetensors` package, 0.8, whose header
# is parsed by Rust's serde_json) accepts, and refuses what it refuses: a header of at most
# 10^8 bytes in strict UTF-8 (no byte-order mark, no UTF-16) holding RFC 8259 JSON (no NaN or
# Infinity, no number beyond float64, no unpaired surrogate escape, at most 127 nested
# containers), an object whose "__metadata__" (once at most) is null or {str: str}, and whose
# tensor entries each have dtype, shape and data_offsets once (an entry may also be written as
# the list [dtype, shape, data_offsets]; other fields are ignored), sizes and offsets plain
# non-negative integers ("-0", 2.0 and true are not) below 2^64, and element counts whose
# running product stays below 2^64. Beyond the reference: sizes above 2^63 - 1, which it
# parses and torch cannot hold, and sub-byte dtypes (F4, F6_*), which no speech model uses,
# are refused here with a message instead of an error from torch.
# ========================================================================================

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    **{name: getattr(torch, dtype) for name, dtype in [
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("C64", "complex64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu")]
       if hasattr(torch, dtype)},               # (older torch versions lack some)
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_SAFETENSORS_FIELDS = ("dtype", "shape", "data_offsets")
_MAX_HEADER_BYTES = 100_000_000            # the reference reader's limit
_MAX_JSON_DEPTH = 127                      # serde_json's: 128 nested arrays or objects fail


class _JsonObject(dict):
    """A parsed JSON object that remembers the keys it had more than once (json keeps the last)."""

    repeated: frozenset = frozenset()


class _SignedInt(int):
    """An integer written with a minus sign, "-0" included: serde_json reads "-0" as a float,
    so it is never a size or an offset."""

    def __repr__(self) -> str:
        return "-0" if self == 0 else int.__repr__(self)


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    result = _JsonObject(pairs)
    if len(result) != len(pairs):
        seen, repeated = set(), set()
        for key, _ in pairs:
            (repeated if key in seen else seen).add(key)
        result.repeated = frozenset(repeated)
    return result


def _json_int(text: str) -> int:
    """An integer literal; one beyond float64's range is refused (serde_json reads integers
    that do not fit 64 bits as floats and refuses those that overflow)."""
    if len(text) > 400:                        # certainly beyond float64 (and Python's 4300 digits)
        raise ValueError("number out of range")
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError("number out of range") from None
    return _SignedInt(value) if text.startswith("-") else value


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_safetensors_header(raw: bytes) -> tuple[Optional[dict], str]:
    """(the header as a dict, "") or (None, why the reference reader would refuse it)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_json_object, parse_int=_json_int,
                            parse_float=_json_float, parse_constant=_json_constant)
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 ({error})"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as error:                 # json.JSONDecodeError included
        return None, first_line(error)
    if not isinstance(header, dict):
        return None, "not a JSON object"
    pending = [(header, 1)]                     # walk the tree without recursion
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return None, "a string holds an unpaired surrogate escape (\\ud800-\\udfff)"
        elif isinstance(value, (dict, list)):
            if depth > _MAX_JSON_DEPTH:
                return None, f"nested more than {_MAX_JSON_DEPTH} levels deep"
            items = [*value, *value.values()] if isinstance(value, dict) else value
            pending.extend((item, depth + 1) for item in items)
    if "__metadata__" in header.repeated:
        return None, "__metadata__ occurs twice"
    return header, ""


def read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a .safetensors file: ({name: tensor}, metadata). Validates the header as the
    reference reader does (see the section comment) and against the file size, so a truncated,
    corrupt or hostile file raises CheckpointError naming the tensors."""
    path = os.fspath(path)
    if sys.byteorder != "little":
        raise CheckpointError(f"{path}: reading safetensors needs a little-endian machine")
    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        length_bytes = file.read(8)
        if len(length_bytes) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({file_size} bytes; "
                                  "the header length alone takes 8)")
        header_size = int.from_bytes(length_bytes, "little")
        if header_size > file_size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt: the header claims {header_size} bytes "
                                  f"but the file has {file_size - 8} after the length field")
        if header_size > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt safetensors header: it claims {header_size:,} bytes, more "
                                  f"than the {_MAX_HEADER_BYTES:,} the format allows")
        header, problem = _parse_safetensors_header(file.read(header_size))
        if header is None:
            raise CheckpointError(f"{path}: corrupt safetensors header ({problem})")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not (isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())):
            raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ is "
                                  f"{short_repr(metadata)}; expected null or an object of strings")
        data_start = 8 + header_size
        data_size = file_size - data_start

        entries, problems = {}, []
        for name, entry in header.items():
            entry, problem = _check_safetensors_entry(entry, data_size)
            if problem:
                problems.append(f"{name} ({problem})")
            else:
                entries[name] = entry
        if problems:
            raise CheckpointError(f"{path}: truncated or corrupt ({data_size} data bytes after the header); "
                                  f"bad tensors: {format_keys(problems)}")
        # Like the reference reader, require the tensors to tile the data section exactly:
        # overlapping tensors would share bytes (one write shows in both), gaps hide data.
        position, previous = 0, None
        for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
            begin, end = entry["data_offsets"]
            if begin != position:
                where = f"after {previous}, which ends at byte {position}" if previous else "at the start"
                kind = "overlaps the tensor before it" if begin < position else "leaves a gap"
                raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} (bytes {begin}..{end}) "
                                      f"{kind} {where}")
            position, previous = end, name
        if position != data_size:
            raise CheckpointError(f"{path}: corrupt safetensors file: the tensors end at byte {position} of the "
                                  f"data section but it has {data_size} bytes")

        tensors = {}
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            if end == begin:                    # no elements: any sizes beside the 0 are fine
                tensors[name] = torch.empty(0, dtype=dtype).reshape(entry["shape"])
                continue
            buffer = bytearray(end - begin)
            file.seek(data_start + begin)
            if file.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{path}: truncated while reading tensor {name}")
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
    return tensors, dict(metadata)


def _check_safetensors_entry(entry: Any, data_size: int) -> tuple[Optional[dict], Optional[str]]:
    """(the entry as {"dtype", "shape", "data_offsets"}, None), or (None, why it is unusable)."""
    if isinstance(entry, list) and len(entry) == len(_SAFETENSORS_FIELDS):
        entry = dict(zip(_SAFETENSORS_FIELDS, entry))          # serde reads a struct from a list too
    if not isinstance(entry, dict) or not set(_SAFETENSORS_FIELDS) <= set(entry):
        return None, "entry lacks dtype/shape/data_offsets"
    repeated = [field for field in _SAFETENSORS_FIELDS if field in getattr(entry, "repeated", ())]
    if repeated:
        return None, f"{repeated[0]} occurs twice"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        return None, f"dtype {short_repr(dtype)} is not one of {', '.join(_SAFETENSORS_DTYPES)}"
    count = element_count(shape)
    if count is None:
        return None, (f"bad shape {short_repr(shape)}: expected a list of sizes in 0..2^63-1 whose running "
                      "product stays below 2^64")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(n) is int and 0 <= n < 2**64 for n in offsets)):
        return None, f"bad data_offsets {short_repr(offsets)}: expected [begin, end], integers in 0..2^64-1"
    begin, end = offsets
    expected_bytes = count * _SAFETENSORS_DTYPES[dtype].itemsize
    if not begin <= end:
        return None, f"bad data_offsets {offsets}"
    if end > data_size:
        return None, f"bytes {begin}..{end} lie beyond the end of the file"
    if end - begin != expected_bytes:
        return None, f"holds {end - begin} bytes, but shape {shape} of {dtype} needs {expected_bytes}"
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}, None


def _read_safetensors_file(path: str) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def write_safetensors(file: BinaryIO, tensors: dict[str, torch.Tensor],
                      metadata: Optional[dict[str, str]] = None) -> None:
    """Write {name: tensor} to an open binary file in the safetensors layout (tensors in
    name order, our choice; any order is valid)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors")
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        blobs.append(data)
        offset += data.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    file.write(len(header_bytes).to_bytes(8, "little"))
    file.write(header_bytes)
    for data in blobs:
        file.write(memoryview(data))


# ========================================================================================
# 5. A restricted unpickler (for fairseq files)
#
# Pickle runs code by design: a GLOBAL opcode names any importable callable and REDUCE calls
# it. torch.load lets us pass our own `pickle_module`; its Unpickler.find_class is the only
# way a pickle reaches a Python object, so it admits exactly:
#   * what torch needs to rebuild tensors (its storage classes are resolved by torch itself),
#   * builtin containers and scalars, OrderedDict, copyreg's reconstructors,
#   * `_codecs.encode` with latin-1 only: pickles of bytes (protocol 2) call
#     _codecs.encode(text, 'latin1'); other codecs can take minutes (40k characters of
#     punycode: 290 s), so they are refused,
#   * numpy scalars and arrays of the plain numeric dtypes (fairseq stores e.g. best_loss as a
#     numpy float), through checking replacements of numpy's functions: a crafted dtype state
#     (a field outside the item, an object field over raw bytes) would make numpy leak heap
#     bytes or dereference a pointer chosen by the file,
#   * argparse.Namespace, omegaconf, typing and fairseq classes, which are replaced by
#     `_Record`, an inert stand-in that only stores what the pickle hands it.
# Everything else raises, before it is called.
#
# Admitting an object is not enough: the opcodes that mutate (BUILD sets attributes or state,
# APPEND(S)/SETITEM(S)/ADDITEMS add items) could otherwise change an admitted module-level
# object, e.g. set `torch._utils._rebuild_tensor_v2.__defaults__` so that every later
# torch.load in the process returns wrong tensors. So the unpickler is pickle's pure-Python
# one with those opcodes checked: they may only target objects the file itself created, of
# the types a checkpoint needs (`_MUTABLE_TARGETS`); never anything find_class returned.
# Work is bounded too: a pickle can describe a DAG of shared lists whose expansion (by repr,
# hashing or conversion) is exponential in the file size. Arguments of calls and dict keys may
# expand to at most `_MAX_ARGUMENT_OBJECTS` objects, and `to_plain` stops after
# `_MAX_CONFIG_SIZE` objects and characters.
# ========================================================================================

_MAX_ARGUMENT_OBJECTS = 100_000      # a tensor rebuild takes ~10; fairseq's largest config call far fewer
_MAX_KEY_OBJECTS = 1_000             # dict keys and set items are strings and ints in checkpoints
_MAX_CONFIG_SIZE = 10_000_000        # objects + characters of the plain configs (real ones: ~10^4)


class _Refused(Exception):
    """Raised inside the unpickler; `read_torch_file` turns it into a CheckpointError."""


class _RefusedGlobal(_Refused):
    def __init__(self, qualified_name: str):
        super().__init__(f"refused to unpickle {qualified_name}")
        self.qualified_name = qualified_name


class _Record:
    """Stand-in for a class we do not import (argparse.Namespace, omegaconf DictConfig and its
    nodes, fairseq Dictionary, enums). It records constructor arguments and pickled state and
    has no other behaviour; `to_plain` turns it into plain dicts, lists and values."""

    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Record":
        record = object.__new__(cls)
        record.args, record.state, record.contents = args, None, []
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:              # pickle's APPEND(S) opcodes
        self.contents.append(item)

    def extend(self, items: Iterable[Any]) -> None:
        self.contents.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:  # pickle's SETITEM(S) opcodes
        self.contents.append((key, value))


_RECORD_CLASSES: dict[str, type] = {}
_RECORD_MODULE_PREFIXES = ("omegaconf", "fairseq", "typing")


def _record_class(qualified_name: str) -> type:
    if qualified_name not in _RECORD_CLASSES:
        name = qualified_name.rsplit(".", 1)[-1]
        _RECORD_CLASSES[qualified_name] = type(name, (_Record,), {"origin": qualified_name})
    return _RECORD_CLASSES[qualified_name]


_LATIN1_NAMES = ("latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1")


def _encode_latin1(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """_codecs.encode(text, 'latin1'), how pickle protocol 2 stores bytes (each character is
    one byte, so the work is linear in the file); any other codec is refused."""
    if not (isinstance(text, str) and encoding in _LATIN1_NAMES and errors == "strict"):
        handler = f" and errors {short_repr(errors)}" if errors != "strict" else ""
        raise _Refused(f"refused _codecs.encode with encoding {short_repr(encoding)}{handler}: only 'latin1' (how "
                       "pickles store bytes) is admitted")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise _Refused("refused _codecs.encode(..., 'latin1') of characters beyond U+00FF") from None


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2, which calls `func(*args)` itself, admitted only
    with one of torch's tensor rebuild functions and a tensor type."""
    if func not in _TENSOR_REBUILDERS or not (isinstance(new_type, type) and issubclass(new_type, torch.Tensor)):
        raise _Refused(f"refused torch._tensor._rebuild_from_type_v2({_qualified(func)}, {_qualified(new_type)})")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


_TENSOR_REBUILDERS = tuple(f for f in (
    torch._utils._rebuild_tensor, torch._utils._rebuild_tensor_v2, getattr(torch._utils, "_rebuild_tensor_v3", None),
    torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state) if f is not None)


def _allowed_global(module: str, name: str) -> Any:
    """The object a pickle may refer to as module.name, or raise _RefusedGlobal."""
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)   # Python 2 names
    plain = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        ("copyreg", "__newobj__"): copyreg.__newobj__,
        ("_codecs", "encode"): _encode_latin1,    # how pickle protocol 2 stores bytes
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): getattr(torch._utils, "_rebuild_tensor_v3", None),
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    }
    found = plain.get((module, name))
    if found is not None:
        return found
    if module == "builtins" and name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                                         "bool", "str", "bytes", "bytearray", "slice", "object"):
        return getattr(builtins, name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
        return getattr(torch, name)
    if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        numpy_global = _numpy_global(name)
        if numpy_global is not None:
            return numpy_global
    if (module, name) == ("argparse", "Namespace") or module.split(".")[0] in _RECORD_MODULE_PREFIXES:
        return _record_class(f"{module}.{name}")
    raise _RefusedGlobal(f"{module}.{name}")


def _numpy_global(name: str) -> Any:
    """What a numpy global of a pickle stands for: checking replacements of the functions
    numpy's pickles call (`_numpy_dtype`, `_numpy_scalar`, `_numpy_empty_array`), and the
    ndarray class, which `_reconstruct` takes as its first argument but which is never called."""
    return {"scalar": _numpy_scalar, "_reconstruct": _numpy_empty_array, "dtype": _numpy_dtype,
            "ndarray": numpy.ndarray}.get(name)


# numpy's own pickles name the plain numeric dtypes by kind and item size ('f8', 'b1', ...).
_PLAIN_NUMPY_DTYPES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")


def _plain_numpy_dtype(dtype: Any) -> bool:
    """Whether `dtype` is one of numpy's plain numeric dtypes (bool, integers, floats,
    complex) in little-endian or native byte order: no fields, objects or subarrays, so that
    reading a value of it reads only its own bytes."""
    return (isinstance(dtype, numpy.dtype) and dtype.str[1:] in _PLAIN_NUMPY_DTYPES
            and dtype.byteorder in "<|=" and dtype.fields is None and dtype.subdtype is None
            and not dtype.hasobject)


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> Any:
    """numpy.dtype(spec, align, copy) as numpy's pickles call it, for the plain numeric dtypes
    only. Other dtypes (structured/void, object, string, datetime) can make numpy read bytes
    outside a value or dereference a pointer chosen by the file, so they are refused."""
    if not (isinstance(spec, str) and spec in _PLAIN_NUMPY_DTYPES and isinstance(align, bool)
            and isinstance(copy, bool)):
        raise _Refused(f"refused numpy.dtype({short_repr(spec)}): only the plain numeric dtypes "
                       f"{', '.join(_PLAIN_NUMPY_DTYPES)} are admitted")
    return numpy.dtype(spec)


def _check_numpy_dtype_state(dtype: Any, state: Any) -> None:
    """A BUILD of a numpy dtype must repeat the state the dtype already has (what numpy's
    pickles write, (3, '<', None, None, None, -1, -1, 0) for 'f8'), with '=' allowed for the
    byte order. Anything else (fields, an item size, flags) is refused: it is never applied."""
    own = dtype.__reduce__()[2]
    if not (isinstance(state, tuple) and len(state) == len(own) and state[1] in (own[1], "=")
            and state[:1] + state[2:] == own[:1] + own[2:]):
        raise _Refused(f"refused to set the state of numpy.dtype({dtype.str[1:]!r}) to {short_repr(state)} "
                       f"(only its own state {own} is admitted)")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's multiarray.scalar(dtype, data) for a plain numeric dtype and exactly its item
    size of bytes."""
    try:
        from numpy._core import multiarray           # numpy >= 2
    except ImportError:
        from numpy.core import multiarray            # numpy 1.x
    if not (_plain_numpy_dtype(dtype) and isinstance(data, bytes) and len(data) == dtype.itemsize):
        raise _Refused("refused a numpy scalar that is not a plain numeric dtype with its item size of bytes")
    return multiarray.scalar(dtype, data)


def _numpy_empty_array(subtype: Any, shape: Any, typecode: Any) -> Any:
    """numpy's multiarray._reconstruct(ndarray, (0,), b'b'), the empty array that numpy's
    pickles create and then fill with BUILD (checked by `_check_numpy_array_state`)."""
    if not (subtype is numpy.ndarray and shape == (0,) and typecode in (b"b", "b")):
        raise _Refused("refused numpy's _reconstruct with arguments other than (numpy.ndarray, (0,), b'b')")
    return numpy.ndarray((0,), numpy.int8)


def _check_numpy_array_state(state: Any) -> None:
    """The state numpy's pickles give an array: (1, shape, dtype, is_fortran, raw bytes), with
    a plain numeric dtype and exactly the bytes the shape needs."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise _Refused("refused a numpy array state that is not (1, shape, dtype, is_fortran, bytes)")
    _, shape, dtype, fortran, data = state
    count = element_count(shape) if isinstance(shape, tuple) else None
    if count is None or not _plain_numpy_dtype(dtype) or not isinstance(fortran, bool) or \
            not isinstance(data, bytes) or len(data) != count * dtype.itemsize:
        raise _Refused(f"refused a numpy array state: expected a shape, a plain numeric dtype and "
                       f"shape x item size bytes, got shape {short_repr(shape)}")


def _qualified(value: Any) -> str:
    """A readable name for an object in an error message (never its repr, which may be huge)."""
    target = value if isinstance(value, type) or callable(value) else type(value)
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    name = f"{module}.{name}" if module and name else type(value).__name__
    return name if target is value else f"a {name} object"


def _expanded_size(value: Any, limit: int) -> int:
    """How many objects `value` expands to, counting a shared object each time it is reached
    (the work repr, hashing or conversion does); stops counting past `limit`."""
    count, pending = 0, [value]
    while pending and count <= limit:
        item = pending.pop()
        count += 1
        if isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, _Record):
            pending.extend((item.args, item.contents, item.state))
    return count


def _is_numpy_array_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, numpy.ndarray)


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None))
# Callables whose arguments must be atoms: str()/hash of a container could be exponential, and
# bytes(n)/bytearray(n) would allocate n bytes.
_ATOM_ARGUMENTS = (str, bytes, bytearray, int, float, complex, bool, slice)


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with find_class restricted and the calling and mutating
    opcodes checked (see the section comment)."""

    _MUTABLE_TARGETS: tuple = (_Record, torch.Tensor, collections.OrderedDict, dict, list, set)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted_ids: set[int] = set()          # everything find_class returned
        self._admitted: list = []                      # keeps those objects alive, so ids stay unique

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        self._admitted_ids.add(id(found))
        self._admitted.append(found)
        return found

    # --- checks ------------------------------------------------------------------------
    def _check_target(self, target: Any, action: str, extra_types: tuple = ()) -> None:
        if id(target) in self._admitted_ids or isinstance(target, type) or \
                not isinstance(target, self._MUTABLE_TARGETS + extra_types):
            raise _Refused(f"refused to {action} {_qualified(target)} (a checkpoint may only fill in objects "
                           "it created itself)")

    def _check_key(self, key: Any) -> None:
        if _expanded_size(key, _MAX_KEY_OBJECTS) > _MAX_KEY_OBJECTS:
            raise _Refused(f"refused a dict key or set item that expands to more than {_MAX_KEY_OBJECTS} objects")

    def _check_call(self, func: Any, args: Any) -> None:
        if _expanded_size(args, _MAX_ARGUMENT_OBJECTS) > _MAX_ARGUMENT_OBJECTS:
            raise _Refused(f"refused to call {_qualified(func)} with arguments that expand to more than "
                           f"{_MAX_ARGUMENT_OBJECTS:,} objects")
        if func in _ATOM_ARGUMENTS or func is copyreg.__newobj__ and args and args[0] in _ATOM_ARGUMENTS:
            plain = args[1:] if func is copyreg.__newobj__ else args
            if not all(isinstance(arg, _ATOMS) for arg in plain) or \
                    func in (bytes, bytearray) and any(isinstance(arg, int) for arg in plain):
                raise _Refused(f"refused to call {_qualified(func)} on anything but a string or number")
            codec = plain[1] if len(plain) > 1 else None
            if func in (str, bytes, bytearray) and (len(plain) > 2 or codec is not None and codec not in _LATIN1_NAMES):
                raise _Refused(f"refused to call {_qualified(func)} with a codec other than latin-1 (how pickles "
                               "store bytes)")
        if func is copyreg._reconstructor and len(args) == 3:
            self._check_call(args[1], (args[2],) if args[2] is not None else ())
        cls = args[0] if func is copyreg.__newobj__ and args else func
        if _is_numpy_array_class(cls):
            raise _Refused("refused to call numpy.ndarray (numpy's pickles only pass it to _reconstruct)")

    # --- opcodes -------------------------------------------------------------------------
    def load_reduce(self) -> None:
        args, func = self.stack[-1], self.stack[-2]
        self._check_call(func, args if isinstance(args, tuple) else ())
        super().load_reduce()

    def load_newobj(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._check_call(self.stack[-3], (self.stack[-2], self.stack[-1]))
        super().load_newobj_ex()

    def _instantiate(self, klass: Any, args: list) -> None:     # INST and OBJ (protocols 0-1)
        self._check_call(klass, tuple(args))
        super()._instantiate(klass, args)

    def load_build(self) -> None:
        target, state = self.stack[-2], self.stack[-1]
        if isinstance(target, numpy.dtype):          # checked, never applied
            _check_numpy_dtype_state(target, state)
            self.stack.pop()
            return
        if type(target) is numpy.ndarray:
            _check_numpy_array_state(state)
        else:
            self._check_target(target, "set the state of")
        super().load_build()

    def load_append(self) -> None:
        self._check_target(self.stack[-2], "append to")
        super().load_append()

    # After a MARK, pickle keeps the items since the mark in self.stack and the older stack,
    # whose last item is the container being filled, in self.metastack[-1].
    def load_appends(self) -> None:
        self._check_target(self.metastack[-1][-1], "append to")
        super().load_appends()

    def load_setitem(self) -> None:
        self._check_target(self.stack[-3], "set an item of")
        self._check_key(self.stack[-2])
        super().load_setitem()

    def load_setitems(self) -> None:
        self._check_target(self.metastack[-1][-1], "set an item of")
        for key in self.stack[::2]:
            self._check_key(key)
        super().load_setitems()

    def load_additems(self) -> None:
        self._check_target(self.metastack[-1][-1], "add to")
        for item in self.stack:
            self._check_key(item)
        super().load_additems()

    def load_dict(self) -> None:
        for key in self.stack[::2]:
            self._check_key(key)
        super().load_dict()

    def load_frozenset(self) -> None:
        for item in self.stack:
            self._check_key(item)
        super().load_frozenset()

    dispatch = dict(pickle._Unpickler.dispatch)
    for _opcode, _method in [(pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj),
                             (pickle.NEWOBJ_EX, load_newobj_ex), (pickle.BUILD, load_build),
                             (pickle.APPEND, load_append), (pickle.APPENDS, load_appends),
                             (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                             (pickle.ADDITEMS, load_additems), (pickle.DICT, load_dict),
                             (pickle.FROZENSET, load_frozenset)]:
        dispatch[_opcode[0]] = _method
    del _opcode, _method


class _RestrictedPickleModule:
    """The part of the `pickle` module that torch.load uses, with the restricted Unpickler."""
    Unpickler = _RestrictedUnpickler
    __name__ = "spg.checkpoint restricted pickle"

    @staticmethod
    def load(file: BinaryIO, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


# ----------------------------------------------------------------------------------------
# Before torch reads a file. torch.load(weights_only=True), which every reader tries first,
# admits no code, but two of the calls it admits cost more than the file's size:
# _codecs.encode(text, codec) with any codec (40k distinct characters of punycode take
# minutes) and bytearray(n) (n bytes). `check_torch_file` follows the pickles' opcodes
# (pickletools parses them; nothing is built or called) and refuses those calls first.
#
# It also bounds torch's zip archives (torch.save since 1.6): <name>/data.pkl, whose
# persistent ids ('storage', <torch.XStorage>, key, location, numel) name the records
# <name>/data/<key> that hold the tensor bytes, and a few small records (version, byteorder).
# torch reads each record whole, inflating it to the size the zip's central directory
# declares, before it checks anything: a 4 MB record of deflated zeros becomes 4 GB.
# torch.save stores records uncompressed; other archives may inflate by at most
# `_MAX_INFLATED_BYTES` in all, and no storage record past the size data.pkl declares for it.
# ----------------------------------------------------------------------------------------

_MAX_INFLATED_BYTES = 64 * 1024 * 1024     # beyond the stored bytes, over all records of an archive
_LEGACY_PICKLES = 5                        # torch's legacy format: magic, protocol, system info, data, keys


def check_torch_file(path: str) -> None:
    """Refuse, before torch reads `path`: the costly calls above in its pickles; for a zip
    archive, records that would inflate to more than they store plus `_MAX_INFLATED_BYTES`
    in all and, when some record is compressed, a storage record data/<key> larger than the
    storage data.pkl declares for it (or that data.pkl does not declare). Reads the zip's
    central directory and the pickles' opcodes only."""
    try:
        with open(path, "rb") as file:
            if file.read(4) != b"PK\x03\x04":              # a pickle, or torch's legacy format
                file.seek(0)
                reader = _CappedReader(file, os.path.getsize(path))
                for _ in range(_LEGACY_PICKLES):
                    if not _scan_pickle(reader, path)[1]:
                        break
                return
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            for record in records:
                if record.compress_type == zipfile.ZIP_STORED and record.file_size != record.compress_size:
                    raise CheckpointError(f"{path}: corrupt zip archive: stored record {record.filename} declares "
                                          f"{record.file_size:,} bytes but holds {record.compress_size:,}")
            inflation = sum(max(0, record.file_size - record.compress_size) for record in records)
            if inflation > _MAX_INFLATED_BYTES:
                largest = max(records, key=lambda record: record.file_size - record.compress_size)
                raise CheckpointError(f"{path}: its compressed records would inflate it by {inflation:,} bytes (record "
                                      f"{largest.filename}: {largest.compress_size:,} bytes stored, "
                                      f"{largest.file_size:,} inflated), more than the {_MAX_INFLATED_BYTES:,} allowed "
                                      "(torch.save stores records uncompressed)")
            pickles = [record for record in records if record.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                return         # not an archive torch.load reads; it will say so
            data = archive.read(pickles[0])
            if inflation == 0 and b"_codecs" not in data and b"bytearray" not in data:
                return         # records no larger than the file, whose sizes torch checks; no costly call
            declared, _ = _scan_pickle(io.BytesIO(data), path)
            if inflation == 0:
                return
            prefix = pickles[0].filename[:-len("data.pkl")] + "data/"
            for record in records:
                if not record.filename.startswith(prefix):
                    continue
                key = record.filename[len(prefix):]
                if key not in declared:
                    raise CheckpointError(f"{path}: record {record.filename} is a storage that data.pkl does not "
                                          "declare")
                if record.file_size > declared[key]:
                    raise CheckpointError(f"{path}: record {record.filename} inflates to {record.file_size:,} bytes, "
                                          f"but data.pkl declares a storage of {declared[key]:,}")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, RuntimeError,
            ValueError) as error:
        raise CheckpointError(f"{path}: not a readable torch file ({first_line(error)})") from None


class _CappedReader:
    """A binary file whose read(n) asks for at most what is left of it (pickletools reads an
    argument of the length the pickle declares in one call, and a file object allocates it)."""

    def __init__(self, file: BinaryIO, size: int):
        self.file, self.size = file, size

    def read(self, count: int = -1) -> bytes:
        left = max(0, self.size - self.file.tell())
        return self.file.read(left if count < 0 else min(count, left))

    def readline(self) -> bytes:
        return self.file.readline(max(0, self.size - self.file.tell()))

    def tell(self) -> int:
        return self.file.tell()


def _scan_pickle(stream: Any, source: str) -> tuple[dict[str, int], bool]:
    """Follow one pickle's opcodes (pickletools.genops: parsed, never run) with a stack of its
    literal values; raise CheckpointError for a call torch's weights_only loader would make
    at a cost beyond the file's size (`_check_scanned_call`). Returns ({storage key: bytes}
    of torch's persistent ids, whether the pickle ended with STOP); stops quietly where it is
    malformed, as the loaders do."""
    mark, unknown = object(), object()
    stack: list = []
    memo: dict = {}
    declared: dict[str, int] = {}

    def pop(count: int) -> list:
        if count > len(stack) or mark in stack[len(stack) - count:]:
            raise _Malformed
        items = stack[len(stack) - count:]
        del stack[len(stack) - count:]
        return items

    def pop_to_mark() -> list:
        if mark not in stack:
            raise _Malformed
        position = len(stack) - 1 - stack[::-1].index(mark)
        items = stack[position + 1:]
        del stack[position:]
        return items

    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name == "MARK":
                stack.append(mark)
            elif name == "GLOBAL":
                stack.append(("global", *arg.split(" ", 1)))
            elif name == "STACK_GLOBAL":
                module, qualified = pop(2)
                stack.append(("global", module, qualified))
            elif name == "TUPLE":
                stack.append(tuple(pop_to_mark()))
            elif name in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                stack.append(tuple(pop(("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3").index(name))))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack:
                    raise _Malformed
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, unknown))
            elif name == "REDUCE":
                function, arguments = pop(2)
                _check_scanned_call(function, arguments, source)
                stack.append(unknown)
            elif name == "BINPERSID":
                pid = pop(1)[0]
                size = _storage_bytes(pid)
                if size is not None:
                    declared[pid[2]] = max(size, declared.get(pid[2], 0))
                stack.append(unknown)
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif opcode.arg is not None and not opcode.stack_before and len(opcode.stack_after) == 1:
                stack.append(arg)                               # a literal: string, number, bytes
            else:                                               # any other opcode: only its stack effect
                before = opcode.stack_before
                if pickletools.markobject in before:
                    pop_to_mark()
                    pop(before.index(pickletools.markobject))
                else:
                    pop(len(before))
                stack.extend(unknown for _ in opcode.stack_after)
            if name == "STOP":
                return declared, True
    except CheckpointError:                                     # (a ValueError too)
        raise
    except (_Malformed, ValueError):                            # pickletools: unknown opcode, truncated
        pass
    return declared, False


class _Malformed(Exception):
    """A pickle `_scan_pickle` cannot follow further (the loaders fail there too)."""


def _check_scanned_call(function: Any, arguments: Any, source: str) -> None:
    """Refuse _codecs.encode other than (text, 'latin1') and bytearray of a size or with a
    codec other than latin-1, in a pickle that `_scan_pickle` follows."""
    if not (isinstance(function, tuple) and function[0] == "global"):
        return
    module, name = {"__builtin__": "builtins"}.get(function[1], function[1]), function[2]
    plain = arguments if isinstance(arguments, tuple) else None
    if (module, name) == ("_codecs", "encode"):
        try:
            if plain is None or not 1 <= len(plain) <= 3:
                raise _Refused("refused _codecs.encode with arguments other than (text, 'latin1')")
            _encode_latin1(*plain)            # raises unless latin-1, which is a linear copy
        except _Refused as refused:
            raise CheckpointError(f"{source}: {refused}; nothing from the file was executed") from None
    elif (module, name) == ("builtins", "bytearray"):
        if plain is None or any(isinstance(item, int) for item in plain) or len(plain) > 2 or \
                len(plain) == 2 and plain[1] not in _LATIN1_NAMES:
            raise CheckpointError(f"{source}: refused builtins.bytearray on anything but bytes or latin-1 text (a "
                                  "size would allocate that many bytes); nothing from the file was executed")


def _storage_bytes(pid: Any) -> Optional[int]:
    """The bytes of the storage a torch persistent id declares, or None if it is not one.
    Typed storages (torch.FloatStorage, ...) hold numel elements of their dtype,
    torch.storage.UntypedStorage numel bytes."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)
            and type(pid[4]) is int and pid[4] >= 0 and isinstance(pid[1], tuple) and len(pid[1]) == 3):
        return None
    _, module, name = pid[1]
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return pid[4]
    if module != "torch" or not name.endswith("Storage"):
        return None
    with warnings.catch_warnings():           # "TypedStorage is deprecated"
        warnings.simplefilter("ignore")
        dtype = getattr(getattr(torch, name, None), "dtype", None)
    return pid[4] * dtype.itemsize if isinstance(dtype, torch.dtype) else None


def read_torch_file(path: str) -> tuple[Any, bool]:
    """Unpickle a torch.save / pickle file without running code from it: first with
    torch's weights_only loader (enough for our files), then, for files that need more
    (fairseq's Namespace/omegaconf configs), with the restricted unpickler.
    Returns (content, whether the weights_only loader sufficed). `check_torch_file` checks
    the file first."""
    check_torch_file(path)
    try:
        with warnings.catch_warnings():       # e.g. "protocol 4": the second reader handles it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True), True
    except Exception:
        pass  # not necessarily an error: fairseq files need the restricted unpickler below
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule), False
    except _RefusedGlobal as refused:
        raise CheckpointError(f"refused to unpickle {refused.qualified_name} in {path}: only tensors, plain "
                              "containers and fairseq/omegaconf/argparse config objects are admitted; "
                              "nothing from the file was executed") from None
    except _Refused as refused:
        raise CheckpointError(f"{path}: {refused}; nothing from the file was executed") from None
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: "
                              f"{first_line(error)})") from None


def to_plain(value: Any, budget: Optional[list[int]] = None, depth: int = 0, source: str = "config") -> Any:
    """Replace `_Record`s (and numpy scalars) by plain dicts, lists and values, recursively.
    omegaconf containers keep their data in state["_content"], its value nodes in
    state["_val"]; a Namespace's state is its attribute dict; an enum member is its value.
    The result is a tree: each object reached twice is copied twice, so the work is bounded by
    `budget` (objects + characters, `_MAX_CONFIG_SIZE` by default) and refused past it.
    `source` names the file (and entry) in error messages."""
    if budget is None:
        budget = [_MAX_CONFIG_SIZE]
    budget[0] -= 1 + (len(value) if isinstance(value, (str, bytes, bytearray)) else 0)
    if budget[0] < 0:
        raise CheckpointError(f"{source}: config too large: it expands to more than {_MAX_CONFIG_SIZE:,} objects "
                              "and characters (real fairseq configs have about 10^4; shared or self-referencing "
                              "containers?)")
    if depth > 100:
        raise CheckpointError(f"{source}: config nested more than 100 levels deep")
    deeper = depth + 1
    if isinstance(value, _Record):
        state = value.state if isinstance(value.state, dict) else {}
        if value.origin.startswith("omegaconf.") and "_content" in state:
            return to_plain(state["_content"], budget, deeper, source)
        if value.origin.startswith("omegaconf.") and "_val" in state:
            return to_plain(state["_val"], budget, deeper, source)
        if value.state is None and len(value.args) == 1 and not value.contents:
            return to_plain(value.args[0], budget, deeper, source)        # enum member: Enum(value)
        if value.contents and not state:
            return to_plain(value.contents, budget, deeper, source)       # a list-like object
        return {str(k): to_plain(v, budget, deeper, source) for k, v in state.items()}
    if isinstance(value, dict):
        return {to_plain(k, budget, deeper, source): to_plain(v, budget, deeper, source) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v, budget, deeper, source) for v in value)
    if isinstance(value, (numpy.generic, numpy.ndarray)) and value.shape == ():
        # The unpickler admits plain numeric dtypes only; .item() of a dtype with fields or
        # objects would read memory the value does not own, so check again here.
        if not _plain_numpy_dtype(value.dtype):
            raise CheckpointError(f"{source}: a numpy value of dtype {value.dtype.str!r}; only plain numeric "
                                  "dtypes are read")
        return value.item()
    return value


# ========================================================================================
# 6. Installing and checking weights
# ========================================================================================

def install_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *, strict: bool,
                       unknown_source_keys: Iterable[str] = (), optional_keys: Iterable[str] = ()) -> None:
    """Copy `state` (already in our key names) into `model`, casting to the model's dtypes.

    Wrong shapes always fail; missing and unexpected keys fail when `strict`, else warn.
    `unknown_source_keys` are file keys that have no name in our model (reported as unexpected);
    `optional_keys` are dropped without complaint when the model has no such entry (e.g.
    wav2vec2's training-only mask embedding)."""
    expected = model.state_dict()
    optional_keys = set(optional_keys)
    state = {key: value for key, value in state.items()
             if not (key in optional_keys and key not in expected)}
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: these entries are not tensors: {format_keys(not_tensors)}")
    missing = [key for key in expected if key not in state]
    unexpected = list(unknown_source_keys) + [key for key in state if key not in expected]
    mismatched = [f"{key}: got shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
                  for key in expected if key in state and state[key].shape != expected[key].shape]
    # Casting is only safe within a kind: int32 bits read as float32 weights are garbage.
    wrong_kind = [f"{key}: got {state[key].dtype}, expected a {_dtype_kind(expected[key].dtype)} tensor"
                  for key in expected if key in state
                  and _dtype_kind(state[key].dtype) != _dtype_kind(expected[key].dtype)]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {format_keys(mismatched)}")
    if wrong_kind:
        problems.append(f"wrong dtype for {format_keys(wrong_kind)}")
    if missing and strict:
        problems.append(f"missing keys: {format_keys(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {format_keys(unexpected)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    if missing or unexpected:
        warnings.warn(f"{source}: missing keys: {format_keys(missing) or 'none'}; "
                      f"unexpected keys: {format_keys(unexpected) or 'none'}", stacklevel=3)
    model.load_state_dict({key: value for key, value in state.items() if key in expected}, strict=False)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "boolean" if dtype == torch.bool else "integer"


def non_finite_entries(state: Mapping[str, Any]) -> list[str]:
    """"name (k of n values)" for every floating-point tensor of `state` that holds NaN or ±inf."""
    broken = []
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                broken.append(f"{name} ({bad:,} of {tensor.numel():,} values)")
    return broken


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Raise CheckpointError naming every parameter or buffer that holds NaN or ±inf (one
    such weight among millions turns every output into NaN, with no other sign)."""
    broken = non_finite_entries(model.state_dict())
    if broken:
        raise CheckpointError(f"{source}: non-finite weights (NaN or inf) in {format_keys(broken)}; "
                              "pass spg.load(..., allow_nonfinite=True) to inspect the file anyway")


def check_plain_data(value: Any, where: str) -> None:
    """Raise ValueError unless `value` is made of types torch.load(weights_only=True) reads back."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain_data(key, f"{where} key")
            check_plain_data(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain_data(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool, torch.Tensor))):
        raise ValueError(f"{where} is a {type(value).__name__}; checkpoints store only dicts, lists, tuples, "
                         "str, int, float, bool, None and tensors")


# ========================================================================================
# 7. Atomic writes
# ========================================================================================

def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file so that `path` holds either the old or the complete new content: write to
    a temporary file in the same folder, flush and fsync it, then os.replace it onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)              # mkstemp creates 0600; use the usual mode
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if hasattr(os, "O_DIRECTORY"):                      # make the rename itself durable (POSIX)
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
