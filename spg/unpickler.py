"""Reading pickles without running code from them (fairseq checkpoints, `pytorch_model.bin`,
our own files): `read_torch_file` tries torch's weights_only loader, then a restricted
unpickler that admits tensors, plain containers and inert stand-ins for fairseq's config
objects; `check_torch_file` follows a file's pickle opcodes and zip records before torch reads
it; `to_plain` turns the unpickled configs into plain dicts and lists. Every refusal is a
`spg.checkpoint.CheckpointError` naming the file; nothing from a file is ever called.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import io
import os
import pickle
import pickletools
import warnings
import zipfile
from typing import Any, BinaryIO, Iterable, Optional

import numpy
import torch

from spg.checkpoint import CheckpointError, element_count, first_line, short_repr

__all__ = ["check_torch_file", "read_torch_file", "to_plain"]

# ========================================================================================
# The restricted unpickler
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
    __name__ = "spg.unpickler restricted pickle"

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
