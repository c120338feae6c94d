"""safetensors files read and written by hand, without the `safetensors` package:
`read_safetensors` accepts what the reference reader accepts and refuses what it refuses (see
below), with a CheckpointError naming the file and the tensors; `write_safetensors` writes the
layout every reader reads. The format: https://github.com/huggingface/safetensors.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, BinaryIO, Optional

import torch

from spg.checkpoint import CheckpointError, PathLike, element_count, first_line, format_keys, short_repr

__all__ = ["read_safetensors", "write_safetensors"]

# ========================================================================================
# The format
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
