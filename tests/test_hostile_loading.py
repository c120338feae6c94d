"""Hostile and broken checkpoints (issue 13): pickles that try to change torch for the rest of
the process or to exhaust memory, non-finite weights, dtype lies in safetensors headers and
configs that make no model. Each hostile case checks that nothing ran and that a legitimate
load afterwards, in the same process, still equals transformers."""

import argparse
import io
import json
import re
import struct
import time
import zipfile

import pytest
import torch
from test_loading import (assert_same_valid_frames, fairseq_pretrain_fields, fairseq_state_dict, hf_logits,
                          our_logits, small_config, tiny_hf_model)

import spg
from spg.loading import CheckpointError, load, save
from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC
from spg.whisper.io import save_whisper
from spg.whisper.model import Whisper, WhisperConfig

# ----------------------------------------------------------------------------------------
# Hand-written pickles (protocol 2 opcodes), so that no Python object is built to write them
# ----------------------------------------------------------------------------------------

PROTO, STOP, MARK, NONE, EMPTY_DICT, EMPTY_LIST = b"\x80\x02", b".", b"(", b"N", b"}", b"]"
TUPLE, TUPLE1, TUPLE2, SETITEM, APPEND, BUILD, REDUCE, POP = b"t", b"\x85", b"\x86", b"s", b"a", b"b", b"R", b"0"


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def integer(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def global_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def put(slot: int) -> bytes:
    return b"r" + struct.pack("<I", slot)


def get(slot: int) -> bytes:
    return b"j" + struct.pack("<I", slot)


def as_fairseq_file(path, payload: bytes, *, zip_format: bool) -> None:
    """{"cfg": <payload>, "model": {}}: a raw pickle, or a torch zip file whose data.pkl it is."""
    pickle_bytes = PROTO + EMPTY_DICT + text("cfg") + payload + SETITEM + text("model") + EMPTY_DICT + SETITEM + STOP
    if not zip_format:
        path.write_bytes(pickle_bytes)
        return
    buffer = io.BytesIO()
    torch.save({"model": {}}, buffer)
    source, target = zipfile.ZipFile(io.BytesIO(buffer.getvalue())), io.BytesIO()
    with zipfile.ZipFile(target, "w") as archive:
        for info in source.infolist():
            data = source.read(info.filename)
            archive.writestr(info, pickle_bytes if info.filename.endswith("data.pkl") else data)
    path.write_bytes(target.getvalue())


@pytest.fixture
def legitimate_fairseq_file(tmp_path):
    """An old-style fairseq file (argparse Namespaces, so it needs the restricted unpickler)
    and the transformers model it was made from."""
    hf_model = tiny_hf_model("wav2vec2", "group", seed=5)
    pretrain = {"arch": "wav2vec2", **fairseq_pretrain_fields("group")}
    checkpoint = {"model": fairseq_state_dict(hf_model, "group"),
                  "args": argparse.Namespace(arch="wav2vec_ctc", w2v_args=argparse.Namespace(**pretrain))}
    path = tmp_path / "legitimate.pt"
    torch.save(checkpoint, path)
    return path, hf_model


def assert_legitimate_load_exact(legitimate_fairseq_file):
    path, hf_model = legitimate_fairseq_file
    assert_same_valid_frames(our_logits(load(path)), hf_logits(hf_model))


# ----------------------------------------------------------------------------------------
# Tampering with torch through the unpickler
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("zip_format", [True, False])
def test_build_cannot_change_admitted_functions(tmp_path, zip_format, legitimate_fairseq_file):
    """BUILD with a (None, {"__defaults__": ...}) state would set the defaults of torch's tensor
    rebuild function for the whole process (the issue's attack negated every later tensor)."""
    rebuild = torch._utils._rebuild_tensor_v2
    original = rebuild.__defaults__
    payload = (global_("torch._utils", "_rebuild_tensor_v2") + NONE + EMPTY_DICT + text("__defaults__")
               + MARK + integer(7) + TUPLE + SETITEM + TUPLE2 + BUILD)
    as_fairseq_file(tmp_path / "hostile.pt", payload, zip_format=zip_format)
    try:
        with pytest.raises(CheckpointError, match=r"hostile.pt: refused to set the state of "
                                                  r"torch._utils._rebuild_tensor_v2.*nothing from the file"):
            load(tmp_path / "hostile.pt")
        assert rebuild.__defaults__ == original
    finally:
        rebuild.__defaults__ = original        # on a failing (old) loader, do not poison later tests
    assert_legitimate_load_exact(legitimate_fairseq_file)


def test_build_and_append_cannot_change_classes(tmp_path, legitimate_fairseq_file):
    add = torch.Tensor.__add__
    cases = {
        "class_state": global_("torch", "Tensor") + NONE + EMPTY_DICT + text("__add__")
        + global_("torch", "Size") + SETITEM + TUPLE2 + BUILD,
        "append_to_class": global_("collections", "OrderedDict") + text("x") + APPEND,
        "item_of_dtype": global_("torch", "float32") + text("x") + text("y") + SETITEM,
    }
    try:
        for name, payload in cases.items():
            as_fairseq_file(tmp_path / f"{name}.pt", payload, zip_format=False)
            with pytest.raises(CheckpointError, match=rf"{name}.pt: refused to .*nothing from the file"):
                load(tmp_path / f"{name}.pt")
        assert torch.Tensor.__add__ is add
    finally:
        torch.Tensor.__add__ = add
    assert_legitimate_load_exact(legitimate_fairseq_file)


# ----------------------------------------------------------------------------------------
# Bounded work
# ----------------------------------------------------------------------------------------

def shared_list_dag(depth: int) -> list:
    """A list of two references to a list of two references to ... : 2**depth leaves."""
    node: list = ["leaf"]
    for _ in range(depth):
        node = [node, node]
    return node


def test_config_made_of_shared_lists_is_refused_quickly(tmp_path, legitimate_fairseq_file):
    """A few KB that expand to 2**60 objects when converted to plain data (the issue's file:
    111 KB, MemoryError after 9 s under a 4 GB cap)."""
    checkpoint = {"cfg": {"model": {"w2v_args": shared_list_dag(60)}}, "model": {"w2v_encoder.proj.weight":
                                                                                torch.zeros(2, 2)}}
    torch.save(checkpoint, tmp_path / "dag.pt")
    assert (tmp_path / "dag.pt").stat().st_size < 20_000
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="config too large: it expands to more than 10,000,000"):
        load(tmp_path / "dag.pt")
    assert time.perf_counter() - start < 30
    assert_legitimate_load_exact(legitimate_fairseq_file)


def test_exponential_keys_and_allocations_are_refused(tmp_path):
    """Hashing a DAG of tuples used as a dict key is exponential; bytes(n) allocates n bytes."""
    key = text("x") + TUPLE1 + put(0) + POP
    for level in range(40):
        key += get(level) + get(level) + TUPLE2 + put(level + 1) + POP
    cases = {
        "dag_key.pt": (EMPTY_DICT + key + get(40) + integer(1) + SETITEM, "refused a dict key or set item that expands"),
        "huge_bytes.pt": (global_("builtins", "bytes") + integer(2**31 - 1) + TUPLE1 + REDUCE,
                          "refused to call builtins.bytes on anything but a string or number"),
        "repr_of_list.pt": (global_("builtins", "str") + EMPTY_LIST + TUPLE1 + REDUCE,
                            "refused to call builtins.str on anything but a string or number"),
    }
    for name, (payload, message) in cases.items():
        as_fairseq_file(tmp_path / name, payload, zip_format=True)
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=rf"{name}: {message}.*nothing from the file was executed"):
            load(tmp_path / name)
        assert time.perf_counter() - start < 10


# ----------------------------------------------------------------------------------------
# Silent wrong numbers
# ----------------------------------------------------------------------------------------

def test_non_finite_weights_are_refused_by_name(tmp_path):
    model = Wav2Vec2CTC(ModelConfig(**small_config()))
    with torch.no_grad():
        model.encoder.layers[1].feed_forward.output_dense.weight[3, 5] = float("nan")
        model.lm_head.bias[0] = float("inf")
    save(model, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=re.escape(
            "broken.pt: non-finite weights (NaN or inf) in encoder.layers.1.feed_forward.output_dense.weight "
            "(1 of 1,536 values), lm_head.bias (1 of 32 values); pass spg.load(..., allow_nonfinite=True)")):
        load(tmp_path / "broken.pt")
    inspected = load(tmp_path / "broken.pt", allow_nonfinite=True)
    assert torch.isnan(inspected.encoder.layers[1].feed_forward.output_dense.weight[3, 5])

    whisper = Whisper(WhisperConfig(vocab_size=60, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                    encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2,
                                    decoder_ffn_dim=32, max_source_positions=20, max_target_positions=10,
                                    eos_token_id=50, pad_token_id=50, bos_token_id=51, decoder_start_token_id=51,
                                    no_timestamps_token_id=52, begin_suppress_tokens=[]))
    with torch.no_grad():
        whisper.decoder.layers[0].fc1.weight[0, 0] = float("-inf")
    save_whisper(whisper, tmp_path / "whisper.pt")
    with pytest.raises(CheckpointError, match=r"whisper.pt: non-finite weights .* decoder.layers.0.fc1.weight"):
        spg.load(tmp_path / "whisper.pt")


def rewrite_safetensors_header(path, edit) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])


def test_safetensors_dtype_lies_and_overlaps_are_refused(tmp_path):
    tiny_hf_model("wav2vec2", "group").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    original = weights.read_bytes()
    name = "wav2vec2.encoder.layers.0.attention.q_proj.weight"

    rewrite_safetensors_header(weights, lambda header: header[name].update(dtype="I32"))
    with pytest.raises(CheckpointError, match=re.escape(
            "model.safetensors: wrong dtype for encoder.layers.0.attention.q_proj.weight: got torch.int32, "
            "expected a floating-point tensor")):
        load(tmp_path)

    def overlap(header):          # point the q_proj weight at the bytes of another tensor of its size
        others = [key for key, entry in header.items() if key not in ("__metadata__", name)
                  and entry["shape"] == header[name]["shape"]]
        header[name]["data_offsets"] = header[others[0]]["data_offsets"]
    weights.write_bytes(original)
    rewrite_safetensors_header(weights, overlap)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header: tensor .* "
                                              "(overlaps the tensor before it|leaves a gap)"):
        load(tmp_path)
    from safetensors.torch import load_file          # the reference reader refuses it too
    with pytest.raises(Exception):
        load_file(weights)
    weights.write_bytes(original)
    assert_same_valid_frames(our_logits(load(tmp_path)), hf_logits(tiny_hf_model("wav2vec2", "group")))


@pytest.mark.parametrize("field,value,message", [
    ("num_attention_heads", 0, "num_attention_heads=0: expected a positive integer"),
    ("num_attention_heads", -4, "num_attention_heads=-4: expected a positive integer"),
    ("intermediate_size", -48, "intermediate_size=-48: expected a positive integer"),
    ("hidden_size", None, "hidden_size=None: expected a positive integer"),
    ("num_hidden_layers", 2.5, "num_hidden_layers=2.5: expected a positive integer"),
    ("conv_dim", [], "conv_dim=(): expected a non-empty list of positive integers"),
    ("conv_stride", [5, 0, 2], "conv_stride=(5, 0, 2): expected a non-empty list of positive integers"),
    ("layer_norm_eps", -1e-5, "layer_norm_eps=-1e-05: expected a positive number"),
    ("hidden_dropout", 1.5, "hidden_dropout=1.5: expected a probability in [0, 1]"),
    ("hidden_act", None, "hidden_act=None: expected one of 'gelu', 'relu'"),
    ("do_stable_layer_norm", "yes", "do_stable_layer_norm='yes': expected true or false"),
    ("layer_intermediate_sizes", [48, -1], "layer_intermediate_sizes=[48, -1]: expected null or a list"),
    ("num_conv_pos_embedding_groups", 5, "hidden_size 32 is not divisible by num_conv_pos_embedding_groups 5"),
])
def test_configs_that_make_no_model_are_refused_by_field(tmp_path, field, value, message):
    save(Wav2Vec2CTC(ModelConfig(**small_config())), tmp_path / "good.pt")
    checkpoint = torch.load(tmp_path / "good.pt", weights_only=True)
    checkpoint["config"][field] = value
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"bad.pt: invalid 'config': {message}")):
        load(tmp_path / "bad.pt")


def test_whisper_configs_that_make_no_model_are_refused():
    for field, value, message in [("encoder_attention_heads", -6, "encoder_attention_heads=-6"),
                                  ("decoder_layers", 0, "decoder_layers=0"),
                                  ("layer_norm_eps", 0.0, "layer_norm_eps=0.0"),
                                  ("eos_token_id", 99999, "eos_token_id=99999: expected a token id below")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            WhisperConfig.from_dict({field: value})


def test_errors_are_exported_from_the_package():
    from spg.data import DataError
    assert spg.CheckpointError is CheckpointError and spg.DataError is DataError
