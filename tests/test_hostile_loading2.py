"""Hostile and broken checkpoints, round 2 (issue 24): numpy dtype states that read memory a
value does not own, slow codecs in pickles, configs and zip records that exhaust memory, JSON
that Python's parser chokes on, wrong types in tokenizer files and sparse shapes, and
safetensors headers that the reference reader (the `safetensors` package) refuses. Pickles are
written opcode by opcode, safetensors headers byte by byte; parameter counts are checked
against the built models; the safetensors reader against the reference on the same file."""

import argparse
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoint_format import prune_half, tiny_wav2vec2, tiny_whisper
from test_hostile_loading import (MARK, NONE, PROTO, REDUCE, SETITEM, STOP, TUPLE, TUPLE1, TUPLE2, as_fairseq_file,
                                  global_, integer, text)
from test_loading import (assert_same_valid_frames, fairseq_pretrain_fields, fairseq_state_dict, hf_logits,
                          our_logits, small_config, tiny_hf_model)
from test_whisper import ct2_variables_from_hf, write_ct2_folder, write_model_bin, write_tiny_tokenizer
from test_whisper import tiny_hf_model as tiny_hf_whisper

import spg
from spg.checkpoint import (CheckpointError, read_safetensors)
from spg.loading import load, save
from spg.wav2vec2 import io as wav2vec2_io
from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC, preset
from spg.whisper import ct2
from spg.whisper import io as whisper_io
from spg.whisper.model import Whisper, WhisperConfig
from spg.whisper.tokenizer import WhisperTokenizer

REPOSITORY = Path(__file__).resolve().parent.parent
NEWTRUE, NEWFALSE, TUPLE3, BUILD, EMPTY_DICT = b"\x88", b"\x89", b"\x87", b"b", b"}"


def one_line(error: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be one line."""
    message = str(error.value)
    assert "\n" not in message, message
    return message


def edited_checkpoint(path: Path, edit) -> None:
    """Read a file of ours with torch.load, let `edit` change it, write it back."""
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)


# ----------------------------------------------------------------------------------------
# 11. Tracebacks instead of the named error
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model_type": "wav2vec2", "hidden_size": ' + b"7" * 5000 + b"}", "Exceeds the limit"),
    (b'{"model_type": "wav2vec2\xff"}', "'utf-8' codec can't decode byte 0xff"),
])
def test_json_python_cannot_parse_is_a_named_error(tmp_path, content, message):
    for family_folder in ("wav2vec2", "whisper"):
        folder = tmp_path / family_folder
        if family_folder == "wav2vec2":
            tiny_hf_model("wav2vec2", "group").save_pretrained(folder)
        else:
            tiny_hf_whisper().save_pretrained(folder)
        (folder / "config.json").write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"config.json: not readable JSON \(.*{message}") as error:
            load(folder)
        assert one_line(error)


def test_whisper_files_with_invalid_utf8_are_named_errors(tmp_path):
    hf = tiny_hf_whisper()
    write_ct2_folder(tmp_path, hf)
    for name in ("vocabulary.json", "config.json"):
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original[:5] + b"\xc3\x28" + original[5:])
        with pytest.raises(CheckpointError, match=rf"{name}: not readable JSON \(.*utf-8"):
            load(tmp_path)
        (tmp_path / name).write_bytes(original)
    vocabulary = json.loads((tmp_path / "vocabulary.json").read_text())
    os.remove(tmp_path / "vocabulary.json")
    (tmp_path / "vocabulary.txt").write_bytes("\n".join(vocabulary).encode() + b"\n\xff\xfe\n")
    with pytest.raises(CheckpointError, match=r"vocabulary.txt: not readable UTF-8 text"):
        load(tmp_path)
    os.remove(tmp_path / "vocabulary.txt")
    write_tiny_tokenizer(tmp_path / "tokenizer.json")
    data = (tmp_path / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(data.replace(b"<|endoftext|>", b"<|end\xffoftext|>", 1))
    with pytest.raises(CheckpointError, match=r"tokenizer.json: not readable JSON \(.*utf-8"):
        load(tmp_path)

    os.remove(tmp_path / "tokenizer.json")
    write_ct2_folder(tmp_path, hf)
    variables = ct2_variables_from_hf(hf, torch.float16)
    write_model_bin(tmp_path / "model.bin", {**variables, "encoder/extra~~": torch.zeros(1)}, {})
    (tmp_path / "model.bin").write_bytes((tmp_path / "model.bin").read_bytes().replace(b"extra~~", b"extra\xff\xfe"))
    with pytest.raises(CheckpointError, match=r"model.bin: the name at offset \d+ is not UTF-8"):
        load(tmp_path)


def test_ct2_scalars_and_sizes_that_make_no_model_are_named_errors(tmp_path):
    hf = tiny_hf_whisper()
    write_ct2_folder(tmp_path, hf)
    variables = ct2_variables_from_hf(hf, torch.float16)
    for edit, message in [({"encoder/num_heads": torch.tensor(0, dtype=torch.int16)},
                           "encoder/num_heads=0: expected a positive divisor of the model width 64"),
                          ({"decoder/num_heads": torch.tensor(5, dtype=torch.int16)},
                           "decoder/num_heads=5: expected a positive divisor"),
                          ({"decoder/num_heads": torch.zeros(0, dtype=torch.int16)},
                           r"decoder/num_heads has shape \[0\] and dtype torch.int16; expected one integer"),
                          ({"encoder/conv2/weight": torch.zeros(0, 64, 3, dtype=torch.float16)},
                           "encoder/conv2/weight has 0 rows; expected the model width")]:
        write_model_bin(tmp_path / "model.bin", {**variables, **edit},
                        {"decoder/projection/weight": "decoder/embeddings/weight"})
        with pytest.raises(CheckpointError, match=message) as error:
            load(tmp_path)
        assert one_line(error)
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": ["3", None]}))
    write_model_bin(tmp_path / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    with pytest.raises(CheckpointError, match=r"config.json: suppress_ids is \['3', None\]; expected a list of token"):
        load(tmp_path)


TOKENIZER_EDITS = [
    (lambda data: data["model"].update(vocab=["a", "b"]), "model: vocab is a list; expected an object"),
    (lambda data: data["model"]["vocab"].update(a="1"), "model: vocab entry 'a': '1'; expected a string token"),
    (lambda data: data["model"]["vocab"].update(a=1.0), "model: vocab entry 'a': 1.0"),
    (lambda data: data["model"]["vocab"].update(a=True), "model: vocab entry 'a': True"),
    (lambda data: data["model"]["vocab"].update(a=-1), "model: vocab entry 'a': -1"),
    (lambda data: data["model"].update(merges=[["a"]]), r"model.merges: merge 0 is \['a'\]"),
    (lambda data: data["model"].update(merges=[[1, 2]]), r"model.merges: merge 0 is \[1, 2\]"),
    (lambda data: data["model"].update(merges="a b"), "model.merges: merges must be a list"),
    (lambda data: data.update(added_tokens={"id": 1}), "added_tokens is a dict; expected a list"),
    (lambda data: data["added_tokens"].append({"content": "x"}), r"added_tokens\[\d+\] is \{'content': 'x'\}"),
    (lambda data: data["added_tokens"].append({"id": "7", "content": "x"}), r"added_tokens\[\d+\] is"),
    (lambda data: data["added_tokens"].append({"id": 7, "content": 7}), r"added_tokens\[\d+\] is"),
    (lambda data: data["added_tokens"].append("x"), r"added_tokens\[\d+\] is 'x'"),
    (lambda data: data.update(decoder=["ByteLevel"]), "decoder type None is not supported"),
]


@pytest.mark.parametrize("edit,message", TOKENIZER_EDITS)
def test_tokenizer_files_with_wrong_types_are_named_errors(tmp_path, edit, message):
    write_tiny_tokenizer(tmp_path / "tokenizer.json")
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    WhisperTokenizer.from_file(tmp_path / "tokenizer.json")                  # the unedited file reads
    edit(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"tokenizer.json: {message}") as error:
        WhisperTokenizer.from_file(tmp_path / "tokenizer.json")
    assert one_line(error)


def test_saved_tokenizer_with_wrong_types_is_a_named_error(tmp_path):
    save(tiny_whisper(), tmp_path / "whisper.pt")
    for edit, message in [(lambda t: t["vocab"].update(a="x"), "vocab entry 'a': 'x'"),
                          (lambda t: t.update(added_tokens=[{"id": None, "content": "x"}]), r"added_tokens\[0\]"),
                          (lambda t: t.update(vocab=[1, 2]), "vocab is a list")]:
        original = torch.load(tmp_path / "whisper.pt", weights_only=True)
        edit(original["tokenizer"])
        torch.save(original, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=f"bad.pt: 'tokenizer': {message}"):
            load(tmp_path / "bad.pt")


@pytest.mark.parametrize("shape,message", [
    ([-4, -8], "shape [-4, -8] is not a list of sizes"),
    ([4.0, 8.0], "shape [4.0, 8.0] is not a list of sizes"),
    ([True, 32], "shape [True, 32] is not a list of sizes"),
    ([2**64, 1], "shape [18446744073709551616, 1] is not a list of sizes"),
    ([0, 2**63], "shape [0, 9223372036854775808] is not a list of sizes"),
    ([2**40, 2**40, 0], "shape [1099511627776, 1099511627776, 0] is not a list of sizes"),
    ([10**600], f"shape {repr([10**600])[:80]}... is not a list of sizes"),
    ([0, 2**62, 2**62], "shape mismatch for encoder.layers.0.attention.q_proj.weight: got shape (0, "
                        "4611686018427387904, 4611686018427387904), expected (32, 32)"),
])
def test_sparse_shapes_that_are_no_tensor_are_named_errors(tmp_path, shape, message):
    model = tiny_wav2vec2()
    prune_half(model)
    save(model, tmp_path / "pruned.pt")
    name = "encoder.layers.0.attention.q_proj.weight"

    def edit(checkpoint):
        entry = checkpoint["sparse"][name]
        entry["shape"] = shape
        if shape[-1] == 0 or shape[0] == 0:                  # zero elements: an empty mask and no values
            entry["mask"], entry["values"] = torch.zeros(0, dtype=torch.uint8), torch.zeros(0)
    edited_checkpoint(tmp_path / "pruned.pt", edit)
    with pytest.raises(CheckpointError, match=re.escape(f"pruned.pt: {message}" if "mismatch" in message
                                                        else f"pruned.pt: sparse entry {name}: {message}")) as error:
        load(tmp_path / "pruned.pt")
    assert one_line(error)


# ----------------------------------------------------------------------------------------
# 12. safetensors: the reference reader refuses <=> we refuse
# ----------------------------------------------------------------------------------------

ENTRY = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
EMPTY = '{"u": %s, "t": {"dtype": "F32", "shape": %%s, "data_offsets": [0, 0]}}' % ENTRY
EXTRA = '{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": %s}}'
HEADERS = {
    "plain": '{"t": %s}' % ENTRY,
    "utf16": ('{"t": %s}' % ENTRY).encode("utf-16"),
    "utf16_le": ('{"t": %s}' % ENTRY).encode("utf-16-le"),
    "utf8_bom": b"\xef\xbb\xbf" + ('{"t": %s}' % ENTRY).encode(),
    "invalid_utf8": ('{"__metadata__": {"a": "\xff"}, "t": %s}' % ENTRY).encode("latin-1"),
    "metadata_null": '{"__metadata__": null, "t": %s}' % ENTRY,
    "metadata_strings": '{"__metadata__": {"format": "pt", "a": "b"}, "t": %s}' % ENTRY,
    "metadata_list": '{"__metadata__": [], "t": %s}' % ENTRY,
    "metadata_number": '{"__metadata__": 0, "t": %s}' % ENTRY,
    "metadata_string": '{"__metadata__": "x", "t": %s}' % ENTRY,
    "metadata_int_value": '{"__metadata__": {"a": 1}, "t": %s}' % ENTRY,
    "metadata_nested": '{"__metadata__": {"a": {"b": "c"}}, "t": %s}' % ENTRY,
    "metadata_twice": '{"__metadata__": {}, "__metadata__": {}, "t": %s}' % ENTRY,
    "metadata_key_twice": '{"__metadata__": {"a": "1", "a": "2"}, "t": %s}' % ENTRY,
    "true_dimension": '{"t": {"dtype": "BOOL", "shape": [true, 8], "data_offsets": [0, 8]}}',
    "float_dimension": '{"t": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}',
    "exponent_dimension": '{"t": {"dtype": "F32", "shape": [2e0], "data_offsets": [0, 8]}}',
    "negative_dimension": '{"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}',
    "minus_zero_dimension": EMPTY % "[-0, 2]",
    "dimension_2_64": EMPTY % "[0, 18446744073709551616]",
    "dimension_2_64_minus_1": EMPTY % "[0, 18446744073709551615]",
    "dimension_2_63": EMPTY % "[0, 9223372036854775808]",
    "dimension_2_63_minus_1": EMPTY % "[0, 9223372036854775807, 9223372036854775807]",
    "running_product_overflows": EMPTY % "[4294967296, 4294967296, 0]",
    "running_product_fits": EMPTY % "[4294967296, 2147483648, 0]",
    "dimension_5000_digits": '{"t": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 8]}}' % ("1" * 5000),
    "count_overflows_bytes": '{"t": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 8]}}',
    "scalar": ('{"t": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}', 4),
    "offsets_three": '{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}',
    "offsets_float": '{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}',
    "offsets_true": '{"t": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, true]}}',
    "offsets_minus_zero": '{"t": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}',
    "offsets_beyond_u64": '{"t": {"dtype": "F32", "shape": [2], "data_offsets": [18446744073709551616, 8]}}',
    "field_twice": '{"t": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
    "unknown_field_twice": EXTRA.replace('"x": %s', '"x": 1, "x": 2'),
    "tensor_twice": '{"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "t": %s}' % ENTRY,
    "entry_as_list": '{"t": ["F32", [2], [0, 8]]}',
    "entry_as_short_list": '{"t": ["F32", [2]]}',
    "entry_as_long_list": '{"t": ["F32", [2], [0, 8], 1]}',
    "entry_null": '{"t": null}',
    "shape_missing": '{"t": {"dtype": "F32", "data_offsets": [0, 8]}}',
    "dtype_list": '{"t": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}',
    "dtype_lowercase": '{"t": {"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}}',
    "dtype_u32": '{"t": {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}}',
    "dtype_f8_e4m3": '{"t": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}',
    "dtype_c64": '{"t": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}',
    "nan": EXTRA % "NaN",
    "infinity": EXTRA % "-Infinity",
    "float_overflow": EXTRA % "1e400",
    "float_underflow": EXTRA % "-1e-400",
    "float_large": EXTRA % "1e300",
    "integer_309_digits": EXTRA % ("9" * 309),
    "integer_300_digits": EXTRA % ("9" * 300),
    "negative_extra": EXTRA % "-1",
    "lone_surrogate": EXTRA % '"\\ud800"',
    "surrogate_pair": EXTRA % '"\\ud83d\\ude00"',
    "control_character": EXTRA % '"\x01"',
    "depth_127": EXTRA % ("[" * 125 + "]" * 125),
    "depth_128": EXTRA % ("[" * 126 + "]" * 126),
    "depth_100000": EXTRA % ("[" * 100_000 + "]" * 100_000),
    "leading_whitespace": ' \t\n\r{"t": %s}' % ENTRY,
    "form_feed": '\x0c{"t": %s}' % ENTRY,
    "trailing_garbage": '{"t": %s} x' % ENTRY,
    "nul_padding": ('{"t": %s}\0\0\0' % ENTRY, 8, False),
    "not_an_object": "[1]",
    "empty": ("{}", 0),
    "empty_header": ("", 0, False),
    "empty_name": '{"": %s}' % ENTRY,
}


def write_safetensors_file(path: Path, header, data_bytes: int = 8, pad: bool = True) -> None:
    raw = header.encode() if isinstance(header, str) else header
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))


@pytest.mark.parametrize("name", list(HEADERS))
def test_safetensors_headers_are_refused_exactly_when_the_reference_refuses(tmp_path, name):
    from safetensors.torch import load_file
    case = HEADERS[name] if isinstance(HEADERS[name], tuple) else (HEADERS[name],)
    path = tmp_path / f"{name}.safetensors"
    write_safetensors_file(path, *case)
    try:
        reference = load_file(path)
    except Exception:          # SafetensorError, or torch's TypeError for sizes it cannot hold
        reference = None
    if reference is None:
        with pytest.raises(CheckpointError, match=re.escape(str(path))) as error:
            read_safetensors(path)
        assert one_line(error)
    else:
        ours, _ = read_safetensors(path)
        assert ours.keys() == reference.keys()
        for key, tensor in reference.items():
            assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape
            assert torch.equal(ours[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def test_safetensors_header_size_limit_is_the_references(tmp_path):
    from safetensors.torch import load_file
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as file:                         # "{}" and spaces: 10^8 bytes of header
        file.write(struct.pack("<Q", 100_000_000) + b"{}" + b" " * (100_000_000 - 2))
    assert load_file(path) == {} and read_safetensors(path) == ({}, {})
    with open(path, "r+b") as file:                        # one byte more, claimed and there
        file.write(struct.pack("<Q", 100_000_001))
        file.seek(0, os.SEEK_END)
        file.write(b" ")
    with pytest.raises(Exception, match="header too large"):
        load_file(path)
    with pytest.raises(CheckpointError, match="big.safetensors: corrupt safetensors header: it claims 100,000,001 "
                                              "bytes, more than the 100,000,000 the format allows"):
        read_safetensors(path)


def test_safetensors_metadata_and_sub_byte_dtypes(tmp_path):
    """Metadata comes back as the reference gives it; F4 (two values a byte), which the
    reference reads and torch has no plain dtype for, is refused by name (our choice)."""
    from safetensors import safe_open
    path = tmp_path / "meta.safetensors"
    write_safetensors_file(path, HEADERS["metadata_strings"])
    with safe_open(path, framework="pt") as reference:
        assert read_safetensors(path)[1] == reference.metadata() == {"format": "pt", "a": "b"}
    write_safetensors_file(path, '{"t": {"dtype": "F4", "shape": [16], "data_offsets": [0, 8]}}')
    with pytest.raises(CheckpointError, match=r"meta.safetensors: .* t \(dtype 'F4' is not one of F64, F32"):
        read_safetensors(path)


def test_hf_folder_with_a_refused_safetensors_header_is_a_named_error(tmp_path):
    tiny_hf_model("wav2vec2", "group").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = []
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    weights.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header: __metadata__ is "
                                              r"\[\]; expected null or an object of strings"):
        load(tmp_path)
