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
from spg.checkpoint import MAX_PARAMETERS, CheckpointError, check_parameter_budget
from spg.safetensors import read_safetensors
from spg.unpickler import _Refused, _RestrictedPickleModule, check_torch_file, read_torch_file, to_plain
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
# 1. numpy dtypes whose state the file chose
# ----------------------------------------------------------------------------------------

def raw_bytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data                 # BINBYTES (protocol 3)


def numpy_dtype(spec: str, state: bytes = b"") -> bytes:
    """numpy.dtype(spec, False, True), then BUILD with `state` if given (numpy's own layout)."""
    out = global_("numpy", "dtype") + text(spec) + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE
    return out + (state + BUILD if state else b"")


def dtype_state(byteorder: str, fields: bytes, itemsize: int, alignment: int, flags: int) -> bytes:
    """(3, byteorder, None, names, fields, itemsize, alignment, flags): a void dtype's state;
    `fields` pushes the (names, {name: (dtype, offset)}) pair."""
    return (MARK + integer(3) + text(byteorder) + NONE + fields + integer(itemsize) + integer(alignment)
            + integer(flags) + TUPLE)


def one_field(field_dtype: bytes, offset: int) -> bytes:
    return (MARK + text("a") + TUPLE + EMPTY_DICT + text("a") + MARK + field_dtype + integer(offset) + TUPLE
            + SETITEM)


def numpy_scalar(dtype: bytes, data: bytes) -> bytes:
    return global_("numpy._core.multiarray", "scalar") + MARK + dtype + raw_bytes(data) + TUPLE + REDUCE


# The attacks: an object field over 8 raw bytes (numpy follows them as a pointer) and
# a 4096-byte field in an 8-byte item (numpy copies the heap after it into the value).
CRAFTED_DTYPES = {
    "object_field": numpy_scalar(numpy_dtype("V8", dtype_state("|", one_field(numpy_dtype("O8"), 0), 8, 1, 0)),
                                 b"\x41" * 8),
    "field_outside_item": numpy_scalar(numpy_dtype("V8", dtype_state("|", one_field(numpy_dtype("V4096"), 0),
                                                                     8, 1, 0)), b"\x41" * 8),
    # a plain spec, then a BUILD that gives it a field outside its 8 bytes
    "plain_spec_crafted_state": numpy_scalar(numpy_dtype("f8", dtype_state("|", one_field(numpy_dtype("f8"), 4096),
                                                                           8, 1, 0)), b"\x41" * 8),
    "object_dtype": numpy_scalar(numpy_dtype("O8"), b"\x41" * 8),
    # an array whose dtype state has an object field: _reconstruct, then BUILD (1, shape, dtype, False, raw)
    "array_with_object_field": (global_("numpy._core.multiarray", "_reconstruct") + global_("numpy", "ndarray")
                                + integer(0) + TUPLE1 + raw_bytes(b"b") + TUPLE3 + REDUCE
                                + MARK + integer(1) + integer(1) + TUPLE1
                                + numpy_dtype("f8", dtype_state("|", one_field(numpy_dtype("O8"), 0), 8, 1, 0))
                                + NEWFALSE + raw_bytes(b"\x41" * 8) + TUPLE + BUILD),
    "array_bytes_short": (global_("numpy._core.multiarray", "_reconstruct") + global_("numpy", "ndarray")
                          + integer(0) + TUPLE1 + raw_bytes(b"b") + TUPLE3 + REDUCE
                          + MARK + integer(1) + integer(4) + TUPLE1 + numpy_dtype("f8") + NEWFALSE
                          + raw_bytes(b"\x41" * 8) + TUPLE + BUILD),
    "array_class_called": global_("numpy", "ndarray") + integer(4) + TUPLE1 + TUPLE1 + REDUCE,
}


def test_crafted_numpy_dtypes_are_refused_without_reading_memory(tmp_path):
    """Each file is loaded and its config converted in a child process, so that a segfault
    (what the object field did) fails this test instead of killing pytest."""
    paths = []
    for name, payload in CRAFTED_DTYPES.items():
        as_fairseq_file(tmp_path / f"{name}.pt", payload, zip_format=True)
        paths.append(str(tmp_path / f"{name}.pt"))
    script = ("import sys\nimport spg\nfrom spg.unpickler import read_torch_file, to_plain\n"
              "for path in sys.argv[1:]:\n"
              "    try:\n"
              "        to_plain(read_torch_file(path)[0])\n"
              "        print('LOADED', path)\n"
              "    except spg.CheckpointError as error:\n"
              "        print(error)\n")
    result = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, cwd=REPOSITORY,
                            timeout=300)
    assert result.returncode == 0, f"the child died (signal {-result.returncode}): {result.stderr[-2000:]}"
    lines = result.stdout.splitlines()
    assert len(lines) == len(paths), result.stdout
    for path, line in zip(paths, lines):
        assert line.startswith(f"{path}: refused") and "nothing from the file was executed" in line, line


def test_to_plain_refuses_numpy_values_with_fields_or_objects():
    """The second line of defence: to_plain never calls .item() on such a value."""
    structured = np.zeros(1, dtype=[("a", "O"), ("b", "f8")])[0]
    with pytest.raises(CheckpointError, match=r"file.pt: 'cfg': a numpy value of dtype '\|V16'"):
        to_plain({"best": structured}, source="file.pt: 'cfg'")
    assert to_plain({"best": np.float64(1.5), "n": np.int64(-3), "flag": np.bool_(True)}) == \
        {"best": 1.5, "n": -3, "flag": True}


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_fairseq_file_with_real_numpy_values_still_loads(tmp_path, numpy_module):
    """numpy scalars and arrays pickled by numpy itself (protocol 2: their bytes through
    _codecs.encode(..., 'latin1')), as fairseq stores best_loss and friends; numpy 1.x wrote
    the module name numpy.core.multiarray."""
    hf_model = tiny_hf_model("wav2vec2", "group", seed=5)
    pretrain = {"arch": "wav2vec2", **fairseq_pretrain_fields("group")}
    extra = {"best_loss": np.float64(2.25), "num_updates": np.int64(1234), "flag": np.bool_(True),
             "lr": np.float32(5e-5), "history": np.arange(6, dtype=np.float32).reshape(2, 3),
             "scalar_array": np.array(7, dtype=np.int16), "raw": b"\x00\xff\x80"}
    checkpoint = {"model": fairseq_state_dict(hf_model, "group"), "extra_state": extra,
                  "args": argparse.Namespace(arch="wav2vec_ctc", best_checkpoint_metric=np.float64(0.5),
                                             w2v_args=argparse.Namespace(**pretrain))}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    source, target = zipfile.ZipFile(io.BytesIO(buffer.getvalue())), io.BytesIO()
    with zipfile.ZipFile(target, "w") as archive:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data and b"_codecs\nencode" in data
                data = data.replace(b"numpy._core.multiarray\n", numpy_module.encode() + b"\n")
            archive.writestr(info, data)
    (tmp_path / "fairseq.pt").write_bytes(target.getvalue())

    payload, weights_only = read_torch_file(str(tmp_path / "fairseq.pt"))
    assert not weights_only                                  # the restricted unpickler read it
    plain = to_plain(payload["extra_state"])
    assert plain["best_loss"] == 2.25 and type(plain["best_loss"]) is float
    assert plain["num_updates"] == 1234 and type(plain["num_updates"]) is int
    assert plain["flag"] is True and plain["lr"] == float(np.float32(5e-5)) and plain["scalar_array"] == 7
    assert plain["raw"] == b"\x00\xff\x80"
    np.testing.assert_array_equal(plain["history"], extra["history"])
    assert to_plain(payload["args"])["best_checkpoint_metric"] == 0.5
    assert_same_valid_frames(our_logits(load(tmp_path / "fairseq.pt")), hf_logits(hf_model))


# ----------------------------------------------------------------------------------------
# 2. codecs other than latin-1
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("zip_format", [True, False])
def test_codecs_other_than_latin1_are_refused_quickly(tmp_path, zip_format):
    """40k distinct characters of punycode took 290 s (in torch's weights_only loader, which
    admits _codecs.encode, and in ours); latin-1 is what pickles of bytes use."""
    encode = global_("_codecs", "encode")
    cases = {
        "punycode.pt": (encode + text("".join(map(chr, range(0x10000, 0x10000 + 40_000)))) + text("punycode")
                        + TUPLE2 + REDUCE, "refused _codecs.encode with encoding 'punycode': only 'latin1'"),
        "default_codec.pt": (encode + text("abc") + TUPLE1 + REDUCE, "refused _codecs.encode with encoding 'utf-8'"),
        "errors_handler.pt": (encode + MARK + text("abc") + text("latin1") + text("ignore") + TUPLE + REDUCE,
                              "refused _codecs.encode with encoding 'latin1' and errors 'ignore'"),
        "bytearray_codec.pt": (global_("builtins", "bytearray") + text("abc") + text("punycode") + TUPLE2 + REDUCE,
                               "refused builtins.bytearray on anything but bytes or latin-1 text"),
        "bytearray_size.pt": (global_("__builtin__", "bytearray") + integer(2**30) + TUPLE1 + REDUCE,
                              "refused builtins.bytearray on anything but bytes or latin-1 text"),
    }
    for name, (payload, message) in cases.items():
        as_fairseq_file(tmp_path / name, payload, zip_format=zip_format)
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=rf"{name}: {message}.*nothing from the file was executed"):
            load(tmp_path / name)
        assert time.perf_counter() - start < 10
    as_fairseq_file(tmp_path / "latin1.pt", encode + text("\u00ff\u0000A") + text("latin1") + TUPLE2 + REDUCE,
                    zip_format=zip_format)
    if zip_format:
        assert read_torch_file(str(tmp_path / "latin1.pt"))[0]["cfg"] == b"\xff\x00A"
    else:              # a bare pickle is no torch file, but gets as far as torch's magic number
        with pytest.raises(CheckpointError, match="latin1.pt: not a readable checkpoint .*magic number"):
            load(tmp_path / "latin1.pt")


@pytest.mark.parametrize("zip_format", [True, False])
def test_codecs_in_the_restricted_unpickler_are_latin1_only(tmp_path, zip_format):
    """str and bytes take a codec too; torch's weights_only loader admits neither, so the
    restricted unpickler meets them (bytearray, which torch admits, is refused before torch
    reads the file: see above; the restricted unpickler refuses it as well)."""
    for function in ("str", "bytes"):
        argument = raw_bytes(b"abc") if function == "str" else text("abc")
        payload = global_("builtins", function) + argument + text("punycode") + TUPLE2 + REDUCE
        as_fairseq_file(tmp_path / f"{function}.pt", payload, zip_format=zip_format)
        with pytest.raises(CheckpointError, match=f"{function}.pt: refused to call builtins.{function} with a codec "
                                                  "other than latin-1.*nothing from the file was executed"):
            load(tmp_path / f"{function}.pt")
    payload = PROTO + global_("builtins", "bytearray") + text("abc") + text("punycode") + TUPLE2 + REDUCE + STOP
    with pytest.raises(_Refused, match="refused to call builtins.bytearray with a codec other than latin-1"):
        _RestrictedPickleModule.load(io.BytesIO(payload))


# ----------------------------------------------------------------------------------------
# 9. Models larger than any file should hold
# ----------------------------------------------------------------------------------------

def whisper_config(**overrides) -> WhisperConfig:
    values = dict(vocab_size=60, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=96, max_source_positions=20,
                  max_target_positions=10, eos_token_id=50, pad_token_id=50, bos_token_id=51,
                  decoder_start_token_id=51, no_timestamps_token_id=52, begin_suppress_tokens=[])
    return WhisperConfig.from_dict({**values, **overrides})


@pytest.mark.parametrize("config", [
    preset("tiny"), preset("hubert-base"),
    ModelConfig(**small_config()),
    ModelConfig(**small_config(), conv_bias=True, feat_extract_norm="layer", mask_time_prob=0.0),
    ModelConfig(**small_config(), model_type="hubert", feat_proj_layer_norm=False, vocab_size=40),
    ModelConfig(**small_config(), layer_intermediate_sizes=[0, 17], layer_qk_head_dims=[[8, 3], []],
                layer_v_head_dims=[[2, 8], []]),
    ModelConfig(**small_config(), layer_num_heads=[1, 4]),
], ids=["tiny", "hubert-base", "small", "layer-norm-conv-bias-no-mask", "hubert-no-proj-norm", "pruned-heads",
        "per-layer-heads"])
def test_wav2vec2_parameter_count_equals_the_built_model(config):
    config.validate()
    vocab = [str(i) for i in range(config.vocab_size)]
    model = Wav2Vec2CTC(config, vocab)
    assert wav2vec2_io.parameter_count(config) == model.num_parameters()
    assert model.num_parameters() == sum(tensor.numel() for tensor in model.state_dict().values())


@pytest.mark.parametrize("overrides", [
    {}, {"activation_function": "relu", "num_mel_bins": 128},
    {"encoder_layer_heads": [1, 4], "encoder_layer_ffn_dims": [0, 7], "decoder_layer_heads": [2, 0, 1],
     "decoder_layer_cross_heads": [0, 2, 1], "decoder_layer_ffn_dims": [5, 0, 96]},
    "tiny.en",
], ids=["small", "relu-128-mels", "per-layer", "tiny.en"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_whisper_parameter_count_equals_the_built_model(overrides):
    config = WhisperConfig() if overrides == "tiny.en" else whisper_config(**overrides)
    model = Whisper(config)
    assert whisper_io.parameter_count(config) == model.num_parameters()
    assert whisper_io.parameter_count(config, buffers=True) == sum(t.numel() for t in model.state_dict().values())
    assert whisper_io.encoder_parameter_count(config) == sum(p.numel() for p in model.encoder.parameters())


def test_budget_check_and_its_override(monkeypatch):
    check_parameter_budget(MAX_PARAMETERS, "x.pt")
    with pytest.raises(CheckpointError, match=re.escape(
            f"x.pt: the config describes a model of {MAX_PARAMETERS + 1:,} parameters, more than the limit of "
            f"{MAX_PARAMETERS:,} (set SPG_MAX_PARAMETERS to load it anyway)")):
        check_parameter_budget(MAX_PARAMETERS + 1, "x.pt")
    monkeypatch.setenv("SPG_MAX_PARAMETERS", str(10 * MAX_PARAMETERS))
    check_parameter_budget(MAX_PARAMETERS + 1, "x.pt")
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv("SPG_MAX_PARAMETERS", bad)
        with pytest.raises(CheckpointError, match=re.escape(f"SPG_MAX_PARAMETERS={bad!r}: expected a positive")):
            check_parameter_budget(1, "x.pt")


def test_the_limits_apply_to_real_loads_and_can_be_moved(tmp_path, monkeypatch):
    model = tiny_wav2vec2()
    save(model, tmp_path / "model.pt")
    count = model.num_parameters()
    monkeypatch.setenv("SPG_MAX_PARAMETERS", str(count - 1))
    with pytest.raises(CheckpointError, match=f"model.pt: the config describes a model of {count:,} parameters"):
        load(tmp_path / "model.pt")
    monkeypatch.setenv("SPG_MAX_PARAMETERS", str(count))
    load(tmp_path / "model.pt")
    monkeypatch.setenv("SPG_MAX_LAYERS", "1")
    with pytest.raises(CheckpointError, match=re.escape("model.pt: num_hidden_layers asks for 2 layers, more than "
                                                        "the limit of 1 (set SPG_MAX_LAYERS")):
        load(tmp_path / "model.pt")


TOO_MANY_PARAMETERS = r"the config describes a model of [\d,]+ parameters, more than the limit of 3,000,000,000"


@pytest.mark.parametrize("field,value,message", [
    ("intermediate_size", 3 * 10**7, TOO_MANY_PARAMETERS),
    ("num_hidden_layers", 10**9, "num_hidden_layers asks for 1,000,000,000 layers"),
    ("hidden_size", 10**9, TOO_MANY_PARAMETERS),
    ("layer_intermediate_sizes", [48, 10**12], TOO_MANY_PARAMETERS),
    ("conv_dim", [1] * 5000, "conv_dim asks for 5,000 layers"),
])
def test_small_files_asking_for_huge_models_are_refused_before_building(tmp_path, field, value, message):
    """The issue's 2.6 KB checkpoint asked for an FFN of 3·10^7 (7.8 GB, then a traceback)."""
    save(tiny_wav2vec2(), tmp_path / "huge.pt")
    edits = {field: value}
    if field == "hidden_size":
        edits.update(num_conv_pos_embedding_groups=1, num_attention_heads=1)
    if field == "conv_dim":
        edits.update(conv_kernel=[1] * 5000, conv_stride=[1] * 5000)
    edited_checkpoint(tmp_path / "huge.pt", lambda checkpoint: checkpoint["config"].update(edits))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"huge.pt: {message}") as error:
        load(tmp_path / "huge.pt")
    assert time.perf_counter() - start < 20 and one_line(error)


def test_hf_and_fairseq_configs_asking_for_huge_models_are_refused(tmp_path):
    folder = tmp_path / "hf"
    tiny_hf_model("wav2vec2", "group").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for edit, message in [({"num_hidden_layers": 10**6}, "num_hidden_layers asks for 1,000,000 layers"),
                          ({"intermediate_size": 10**9}, TOO_MANY_PARAMETERS)]:
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(CheckpointError, match=f"config.json: {message}"):
            load(folder)

    hf_model = tiny_hf_model("wav2vec2", "group", seed=5)
    for edit, message in [({"encoder_ffn_embed_dim": 3 * 10**7}, TOO_MANY_PARAMETERS),
                          ({"encoder_layers": 10**9}, "num_hidden_layers asks for 1,000,000,000 layers"),
                          ({"conv_feature_layers": "[(1, 1, 1)] * 100 * 100 * 100 * 100 * 100"},
                           r"w2v_args.model.conv_feature_layers='\[\(1, 1, 1\)\] \* 100 .*': the list grows past "
                           "1000 layers")]:
        pretrain = {"arch": "wav2vec2", **fairseq_pretrain_fields("group"), **edit}
        torch.save({"model": fairseq_state_dict(hf_model, "group"),
                    "args": argparse.Namespace(arch="wav2vec_ctc", w2v_args=argparse.Namespace(**pretrain))},
                   tmp_path / "fairseq.pt")
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=f"fairseq.pt: {message}"):
            load(tmp_path / "fairseq.pt")
        assert time.perf_counter() - start < 20


def test_whisper_configs_asking_for_huge_models_are_refused_before_the_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper", "encoder_ffn_dim": 10**9}))
    with pytest.raises(CheckpointError, match=f"config.json: {TOO_MANY_PARAMETERS}"):
        load(tmp_path)                                        # no weights file: never read
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper", "decoder_layers": 10**6}))
    with pytest.raises(CheckpointError, match="config.json: decoder_layers asks for 1,000,000 layers"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper", "max_source_positions": 10**10}))
    with pytest.raises(CheckpointError, match=f"config.json: {TOO_MANY_PARAMETERS}"):
        load(tmp_path)                                        # the position table is a buffer, counted too
    model = tiny_whisper()
    save(model, tmp_path / "whisper.pt")
    edited_checkpoint(tmp_path / "whisper.pt", lambda checkpoint: checkpoint["config"].update(d_model=2**20))
    with pytest.raises(CheckpointError, match=f"whisper.pt: {TOO_MANY_PARAMETERS}"):
        load(tmp_path / "whisper.pt")


def rezipped(source: Path, target: Path, edit=lambda name, data: data) -> None:
    """`source`'s records, each passed through `edit`, deflated into `target` (torch.save stores them)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in archive.infolist():
            out.writestr(info.filename, edit(info.filename, archive.read(info.filename)))


def test_zip_records_that_inflate_past_what_the_pickle_declares_are_refused(tmp_path):
    model = tiny_wav2vec2()
    save(model, tmp_path / "model.pt")
    rezipped(tmp_path / "model.pt", tmp_path / "deflated.pt")                 # compressed, but honest
    check_torch_file(str(tmp_path / "deflated.pt"))
    assert_same_valid_frames(our_logits(load(tmp_path / "deflated.pt")), our_logits(model), atol=0)

    storage = next(name for name in zipfile.ZipFile(tmp_path / "model.pt").namelist() if name.endswith("/data/0"))
    # a deflated record of 200 MB of zeros: ~200 KB in the file
    rezipped(tmp_path / "model.pt", tmp_path / "bomb.pt",
             lambda name, data: data + bytes(200 * 2**20) if name == storage else data)
    assert (tmp_path / "bomb.pt").stat().st_size < 2**20
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"bomb.pt: its compressed records would inflate it by [\d,]+ bytes "
                                              rf"\(record {storage}: .* more than the 67,108,864 allowed") as error:
        load(tmp_path / "bomb.pt")
    assert time.perf_counter() - start < 10 and one_line(error)

    # within the allowance, but larger than the storage data.pkl declares, or not declared at all
    rezipped(tmp_path / "model.pt", tmp_path / "padded.pt",
             lambda name, data: data + bytes(1000) if name == storage else data)
    declared = zipfile.ZipFile(tmp_path / "model.pt").getinfo(storage).file_size
    with pytest.raises(CheckpointError, match=f"padded.pt: record {storage} inflates to {declared + 1000:,} "
                                              f"bytes, but data.pkl declares a storage of {declared:,}"):
        load(tmp_path / "padded.pt")
    undeclared = storage.replace("/data/0", "/data/999")
    with zipfile.ZipFile(tmp_path / "deflated.pt", "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(undeclared, bytes(10**6))
    with pytest.raises(CheckpointError, match=f"deflated.pt: record {undeclared} is a storage that data.pkl "
                                              "does not declare"):
        load(tmp_path / "deflated.pt")


def test_zip_bombs_are_refused_by_every_torch_reader(tmp_path):
    """pytorch_model.bin in a Hugging Face folder and Whisper files of ours take other paths."""
    def bomb(name: str, data: bytes) -> bytes:
        return data + bytes(100 * 2**20) if name.endswith("data.pkl") else data

    folder = tmp_path / "hf"
    hf_model = tiny_hf_model("wav2vec2", "group")
    hf_model.save_pretrained(folder)
    os.remove(folder / "model.safetensors")
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    rezipped(tmp_path / "pytorch_model.bin", folder / "pytorch_model.bin", bomb)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: its compressed records would inflate it"):
        load(folder)
    save(tiny_whisper(), tmp_path / "whisper.pt")
    rezipped(tmp_path / "whisper.pt", tmp_path / "bomb.pt", bomb)
    with pytest.raises(CheckpointError, match="bomb.pt: its compressed records would inflate it"):
        load(tmp_path / "bomb.pt")
    with pytest.raises(CheckpointError, match="bomb.pt: its compressed records would inflate it"):
        whisper_io.load_spg_whisper(str(tmp_path / "bomb.pt"), strict=True)


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
