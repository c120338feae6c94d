"""Our one checkpoint format, for every model family (`write_checkpoint`, `read_checkpoint`,
with sparse storage of pruned matrices), the errors and small helpers every file reader
shares (`CheckpointError`, budgets counted from a config before anything is built), and
copying a state dict into a model with strict key, shape and dtype checks.

Nothing here knows a network: the family readers (`spg.wav2vec2.io`, `spg.whisper.io`,
`spg.whisper.ct2`) translate key names and configs and call these helpers. The other files
a model comes in are read by their own modules, none of which runs code from a file:
  * `spg.unpickler`: torch.save files and other pickles (fairseq's): torch's
    weights_only loader, else a restricted unpickler (`read_torch_file`), after a scan that
    refuses what costs more than the file's size (`check_torch_file`);
  * `spg.safetensors`: safetensors, parsed by hand, accepting what the reference reader accepts;
  * `spg.hf_weights`: Hugging Face folders' weight files (either kind, possibly sharded);
  * `spg.files`: atomic writes and regular-file checks.
Loaders count a model's parameters from its config before building it
(`check_parameter_budget`, `check_layer_budget`). Every failure raises `CheckpointError`,
whose message names the file and the offending keys.

Sections: 1. errors and small helpers   2. our file: sparse storage, one format for every
          model family   3. installing and checking weights
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Union

import numpy
import torch

from spg.files import atomic_write

__all__ = ["CheckpointError", "format_keys", "read_json", "first_line", "short_repr", "MAX_PARAMETERS", "MAX_LAYERS",
           "check_parameter_budget", "check_layer_budget", "encode_state_dict", "decode_state_dict", "payload_bytes",
           "FORMAT_NAME", "FORMAT_VERSION", "FAMILIES", "OLD_FORMATS", "FORMAT_NAMES", "write_checkpoint",
           "checkpoint_family", "read_checkpoint", "non_finite_entries", "element_count",
           "install_state_dict", "check_finite", "plain_data", "PathLike"]

PathLike = Union[str, os.PathLike]


# ========================================================================================
# 1. Errors and small helpers (shared by every reader of files)
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
    compression = plain_data(compression, "model.compression")
    extras = plain_data(extras or {}, f"the {family} entries")
    weights = encode_state_dict(state, half=half)
    version = 3 if family != "wav2vec2" else 2 if "sparse" in weights else 1
    checkpoint = {"format": FORMAT_NAME, "version": version, "family": family, "config": config,
                  **extras, **weights, "compression": compression}
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
# 3. Installing and checking weights
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


def plain_data(value: Any, where: str = "state") -> Any:
    """`value` made of what torch.load(weights_only=True) reads back (tensors, bool, int,
    float, str, None, and lists, tuples and dicts of them), as a copy: NumPy scalars become
    Python numbers and NumPy arrays tensors; anything else is a TypeError naming where it is
    (`where` names `value`: "state", "model.compression", ...). What our files and the
    training loop's resume states store goes through it."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, dict):
        return {plain_data(key, f"{where} key"): plain_data(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_data(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, numpy.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, numpy.generic):
        return value.item()
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}; checkpoints and resume states "
                    "hold only tensors, bool, int, float, str, None, lists, tuples and dicts")
