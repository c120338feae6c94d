"""Tests for spg.loading: transformers is the reference for logits; fairseq files are built here
from an HF model by the reverse key mapping (fairseq itself is not needed)."""

import argparse
import json
import os
import pickle
import re
import sys
import types
import typing

import pytest
import torch
from transformers import HubertConfig, HubertForCTC, Wav2Vec2Config, Wav2Vec2ForCTC

import spg
from spg.safetensors import read_safetensors, write_safetensors
from spg.loading import CheckpointError, export_hf, load, save
from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC

LAYOUTS = [("wav2vec2", "group"), ("wav2vec2", "layer"), ("hubert", "group"), ("hubert", "layer")]
LENGTHS = torch.tensor([3200, 2300])          # samples: a batch of unequal lengths


# ----------------------------------------------------------------------------------------
# Tiny reference models
# ----------------------------------------------------------------------------------------

def tiny_hf_model(model_type: str, layout: str, seed: int = 0, **overrides):
    """A random-weight HF CTC model: hidden 32, 2 blocks, 3 small convs. Every parameter is
    perturbed so that LayerNorm weights/biases differ from 1/0 and a swapped key shows up."""
    torch.manual_seed(seed)
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32)
    if layout == "layer":
        fields.update(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    fields.update(overrides)
    if model_type == "wav2vec2":
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**fields))
    else:
        model = HubertForCTC(HubertConfig(**fields))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def batch():
    torch.manual_seed(1)
    waveforms = torch.randn(len(LENGTHS), int(LENGTHS.max()))
    for row, length in enumerate(LENGTHS):
        waveforms[row, length:] = 0.0
    mask = (torch.arange(waveforms.shape[1])[None, :] < LENGTHS[:, None]).long()
    return waveforms, mask


@torch.no_grad()
def hf_logits(hf_model):
    waveforms, mask = batch()
    logits = hf_model(waveforms, attention_mask=mask).logits
    return logits, hf_model._get_feat_extract_output_lengths(LENGTHS)


@torch.no_grad()
def our_logits(model):
    waveforms, _ = batch()
    return model.eval()(waveforms, LENGTHS)


def assert_same_valid_frames(ours, reference, atol=1e-4):
    (logits, frames), (ref_logits, ref_frames) = ours, reference
    assert frames.tolist() == ref_frames.tolist()
    for row, count in enumerate(frames.tolist()):
        difference = (logits[row, :count] - ref_logits[row, :count]).abs().max().item()
        assert difference <= atol, f"row {row}: max abs difference {difference}"


def legacy_weight_norm_names(state):
    return {key.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): value for key, value in state.items()}


# ----------------------------------------------------------------------------------------
# Hugging Face folders, export and our own format
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,layout", LAYOUTS)
def test_hf_folders_export_and_round_trip(tmp_path, model_type, layout):
    hf_model = tiny_hf_model(model_type, layout)
    reference = hf_logits(hf_model)

    # model.safetensors (parametrizations.weight.original0/1 names), written by transformers.
    hf_model.save_pretrained(tmp_path / "safetensors")
    model = load(tmp_path / "safetensors")
    assert_same_valid_frames(our_logits(model), reference)
    assert not model.training and model.config.model_type == model_type

    # pytorch_model.bin with the legacy weight_g / weight_v names.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "safetensors" / "config.json").read_text())
    torch.save(legacy_weight_norm_names(hf_model.state_dict()), tmp_path / "bin" / "pytorch_model.bin")
    assert_same_valid_frames(our_logits(load(tmp_path / "bin")), reference)

    # export_hf -> transformers' from_pretrained.
    export_hf(model, tmp_path / "exported")
    hf_class = Wav2Vec2ForCTC if model_type == "wav2vec2" else HubertForCTC
    reloaded = hf_class.from_pretrained(tmp_path / "exported").eval()
    assert_same_valid_frames(hf_logits(reloaded), reference)
    preprocessor = json.loads((tmp_path / "exported" / "preprocessor_config.json").read_text())
    assert preprocessor["return_attention_mask"] == (layout == "layer")

    # Our format: exact round trip, and fp16 storage close.
    model.compression = {"method": "test", "sparsity": [0.5, 0.25], "mask": torch.ones(3)}
    save(model, tmp_path / "model.pt")
    again = load(tmp_path / "model.pt")
    assert torch.equal(our_logits(again)[0], our_logits(model)[0])
    assert again.compression["method"] == "test" and torch.equal(again.compression["mask"], torch.ones(3))
    assert again.vocab == model.vocab and again.config == model.config
    save(model, tmp_path / "half.pt", half=True)
    stored = torch.load(tmp_path / "half.pt", weights_only=True)["state_dict"]
    assert stored["lm_head.weight"].dtype == torch.float16
    half = load(tmp_path / "half.pt")
    assert half.lm_head.weight.dtype == torch.float32
    assert_same_valid_frames(our_logits(half), reference, atol=2e-2)
    assert sorted(os.listdir(tmp_path)) == ["bin", "exported", "half.pt", "model.pt", "safetensors"]  # no temp files


def test_hf_folder_sharded_with_vocab_and_preprocessor(tmp_path):
    hf_model = tiny_hf_model("wav2vec2", "layer", seed=3)
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "|"] + [chr(ord("a") + i) for i in range(27)]
    (tmp_path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    model = load(tmp_path)
    assert model.vocab == vocab and model.config.do_normalize is False
    assert_same_valid_frames(our_logits(model), hf_logits(hf_model))


def test_wav2vec2_base_size_shapes(tmp_path):
    """Wav2Vec2Config() defaults (the base model): our state dict has HF's names and shapes.
    The weights file is sparse (a header, then a hole of zeros), so nothing large is written."""
    config = Wav2Vec2Config()
    with torch.device("meta"):
        hf_shapes = {key: tuple(value.shape) for key, value in Wav2Vec2ForCTC(config).state_dict().items()}
    header, offset = {}, 0
    for key, shape in hf_shapes.items():
        size = 4 * torch.Size(shape).numel()
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header).encode()
    with open(tmp_path / "model.safetensors", "wb") as file:
        file.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        file.truncate(8 + len(header_bytes) + offset)
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["Wav2Vec2ForCTC"]}))
    model = load(tmp_path)
    ours = {spg.wav2vec2.io.hf_key(key, "wav2vec2."): tuple(v.shape) for key, v in model.state_dict().items()}
    assert ours == hf_shapes
    assert model.num_parameters() == sum(torch.Size(s).numel() for s in hf_shapes.values())


def test_export_refuses_non_uniform_model(tmp_path):
    config = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                         conv_dim=(16,) * 3, conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         layer_intermediate_sizes=[48, 20])
    model = Wav2Vec2CTC(config)
    with pytest.raises(ValueError, match="is_uniform"):
        export_hf(model, tmp_path / "out")
    save(model, tmp_path / "pruned.pt")                 # our format keeps per-block sizes
    assert load(tmp_path / "pruned.pt").encoder.layers[1].feed_forward.intermediate_dense.out_features == 20


# ----------------------------------------------------------------------------------------
# fairseq checkpoints
# ----------------------------------------------------------------------------------------

# (regex on the HF key without its wav2vec2./hubert. prefix, fairseq key); a rule ending in
# "@group" or "@layer" applies to that feature-extractor layout only.
HF_TO_FAIRSEQ = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.conv_layers.\1.0.\2"),
    (r"feature_extractor\.conv_layers\.0\.layer_norm\.(weight|bias)@group", r"feature_extractor.conv_layers.0.2.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)@layer", r"feature_extractor.conv_layers.\1.2.1.\2"),
    (r"feature_projection\.layer_norm\.(weight|bias)", r"layer_norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"post_extract_proj.\1"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.attention\.(\w+_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)", r"encoder.layers.\1.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)", r"encoder.layers.\1.fc2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"masked_spec_embed", "mask_emb"),
]


def fairseq_state_dict(hf_model, layout):
    prefix = hf_model.config.model_type + "."
    state = {}
    for key, value in hf_model.state_dict().items():
        if key.startswith("lm_head."):
            state["w2v_encoder.proj." + key.split(".")[-1]] = value
            continue
        inner = key[len(prefix):]
        for pattern, replacement in HF_TO_FAIRSEQ:
            pattern, _, only_layout = pattern.partition("@")
            if (not only_layout or only_layout == layout) and re.fullmatch(pattern, inner):
                state["w2v_encoder.w2v_model." + re.sub(pattern, replacement, inner)] = value
                break
        else:
            raise AssertionError(f"no fairseq name for {key}")
    state["w2v_encoder.w2v_model.quantizer.vars"] = torch.zeros(1, 4, 8)   # pretraining-only: ignored
    return state


def fairseq_pretrain_fields(layout):
    return dict(encoder_embed_dim=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_embed_dim=48,
                activation_fn="gelu", extractor_mode="default" if layout == "group" else "layer_norm",
                conv_feature_layers="[(16, 10, 5)] + [(16, 3, 2)] * 2", conv_bias=layout == "layer",
                layer_norm_first=layout == "layer", conv_pos=16, conv_pos_groups=4, dropout=0.1)


@pytest.mark.parametrize("model_type,layout,config_style", [
    ("wav2vec2", "group", "cfg"), ("wav2vec2", "layer", "args"),
    ("hubert", "group", "args"), ("hubert", "layer", "cfg"),
])
def test_fairseq_checkpoint(tmp_path, model_type, layout, config_style):
    hf_model = tiny_hf_model(model_type, layout, seed=5)
    pretrain = {"_name": model_type, **fairseq_pretrain_fields(layout)}
    finetune = {"_name": f"{'wav2vec' if model_type == 'wav2vec2' else 'hubert'}_ctc", "mask_prob": 0.5,
                "final_dropout": 0.0, "layerdrop": 0.05}
    checkpoint = {"model": fairseq_state_dict(hf_model, layout), "optimizer_history": [{"num_updates": 3}],
                  "extra_state": {"best": torch.tensor(1.0).numpy()}}  # a numpy scalar, as fairseq stores
    if config_style == "cfg":
        checkpoint["args"] = None
        checkpoint["cfg"] = {"model": {**finetune, "w2v_args": {"model": pretrain, "task": {}}},
                             "task": {"_name": "audio_finetuning", "normalize": layout == "layer"}}
    else:   # old fairseq: argparse Namespaces with "arch" instead of "_name"
        pretrain["arch"] = pretrain.pop("_name")
        finetune["arch"] = finetune.pop("_name")
        checkpoint["args"] = argparse.Namespace(**finetune, w2v_args=argparse.Namespace(**pretrain),
                                                normalize=layout == "layer")
    # 2020-era files (args) predate torch's zip format: write those in the legacy format.
    torch.save(checkpoint, tmp_path / "checkpoint.pt", _use_new_zipfile_serialization=config_style == "cfg")
    model = load(tmp_path / "checkpoint.pt")
    assert model.config.model_type == model_type and model.config.do_normalize == (layout == "layer")
    assert model.config.layerdrop == 0.05
    assert_same_valid_frames(our_logits(model), hf_logits(hf_model))


def fake_module(monkeypatch, name, **classes):
    """Register classes under a module name so that pickle records them with that name."""
    module = types.ModuleType(name)
    for class_name, cls in classes.items():
        cls.__module__, cls.__qualname__ = name, class_name
        setattr(module, class_name, cls)
    monkeypatch.setitem(sys.modules, name, module)
    parent = name.rpartition(".")[0]
    while parent and parent not in sys.modules:        # the parent packages must be importable too
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
        parent = parent.rpartition(".")[0]


def test_fairseq_omegaconf_config_and_dictionary(tmp_path, monkeypatch):
    """Hydra-era files store cfg as omegaconf DictConfig objects and the target dictionary as a
    fairseq Dictionary; neither package is needed (or imported) to read them."""
    class DictConfig:
        def __init__(self, content):
            self._metadata = ContainerMetadata()
            self._parent = None
            self._content = {key: value if isinstance(value, DictConfig) else AnyNode(value)
                             for key, value in content.items()}

    class AnyNode:
        def __init__(self, value):
            self._val, self._metadata = value, ContainerMetadata()

    class ContainerMetadata:
        def __init__(self):
            self.ref_type = typing.Any      # pickled as the global typing.Any

    class Dictionary:
        def __init__(self, symbols):
            self.symbols, self.bos_word, self.pad_word = symbols, "<s>", "<pad>"

    fake_module(monkeypatch, "omegaconf.dictconfig", DictConfig=DictConfig)
    fake_module(monkeypatch, "omegaconf.nodes", AnyNode=AnyNode)
    fake_module(monkeypatch, "omegaconf.base", ContainerMetadata=ContainerMetadata)
    fake_module(monkeypatch, "fairseq.data.dictionary", Dictionary=Dictionary)

    hf_model = tiny_hf_model("hubert", "layer", seed=7)
    pretrain = DictConfig({"_name": "hubert", **fairseq_pretrain_fields("layer")})
    cfg = DictConfig({"model": DictConfig({"_name": "hubert_ctc", "w2v_args": DictConfig({"model": pretrain})}),
                      "task": DictConfig({"normalize": True})})
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "|"] + [chr(ord("A") + i) for i in range(27)]
    checkpoint = {"args": None, "cfg": cfg, "model": fairseq_state_dict(hf_model, "layer"),
                  "task_state": {"target_dictionary": Dictionary(symbols)}}
    with open(tmp_path / "hydra.pt", "wb") as file:
        torch.save(checkpoint, file)
    model = load(tmp_path / "hydra.pt")
    assert model.vocab == ["<pad>", "<s>"] + symbols[2:]
    assert model.config.do_normalize is True and model.config.do_stable_layer_norm is True
    assert_same_valid_frames(our_logits(model), hf_logits(hf_model))


def test_fairseq_refusals(tmp_path):
    hf_model = tiny_hf_model("wav2vec2", "group")
    state = fairseq_state_dict(hf_model, "group")
    pretrain = {"_name": "wav2vec2", **fairseq_pretrain_fields("group")}

    def write(name, cfg, model=state):
        torch.save({"args": None, "cfg": cfg, "model": model}, tmp_path / name)
        return tmp_path / name

    with pytest.raises(CheckpointError, match=r"pretrained.pt: .*no w2v_args.*pretraining-only"):
        load(write("pretrained.pt", {"model": pretrain}))
    with pytest.raises(CheckpointError, match=r"no_head.pt: no CTC head"):   # wav2vec_small.pt-style keys
        load(write("no_head.pt", {"model": pretrain}, {"feature_extractor.conv_layers.0.0.weight": torch.zeros(1)}))
    conformer = {**pretrain, "layer_type": "conformer"}
    with pytest.raises(CheckpointError, match=r"conformer.pt: w2v_args.model.layer_type='conformer'"):
        load(write("conformer.pt", {"model": {"_name": "wav2vec_ctc", "w2v_args": {"model": conformer}}}))
    wide_head = {**state, "w2v_encoder.proj.weight": torch.zeros(40, 32), "w2v_encoder.proj.bias": torch.zeros(40)}
    path = write("wide.pt", {"model": {"_name": "wav2vec_ctc", "w2v_args": {"model": pretrain}}}, wide_head)
    with pytest.raises(CheckpointError, match=r"wide.pt: the CTC head has 40 outputs.*vocab="):
        load(path)
    assert load(path, vocab=[f"t{i}" for i in range(40)]).config.vocab_size == 40


# ----------------------------------------------------------------------------------------
# Broken, mismatched and hostile files
# ----------------------------------------------------------------------------------------

def test_not_a_checkpoint(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "no_config").mkdir()
    for path in ["garbage.pt", "empty.pt", "no_config", "does_not_exist.pt"]:
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / path))):
            load(tmp_path / path)
    save(Wav2Vec2CTC(ModelConfig(**small_config())), tmp_path / "ours.pt")
    data = (tmp_path / "ours.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load(tmp_path / "truncated.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: not a checkpoint this loader knows.*something"):
        load(tmp_path / "other.pt")


def small_config():
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                conv_dim=(16,) * 3, conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def test_truncated_and_corrupt_safetensors(tmp_path):
    tiny_hf_model("wav2vec2", "group").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated or corrupt.*"
                                             r"masked_spec_embed \(bytes \d+\.\.\d+ lie beyond the end"):
        load(tmp_path)
    weights.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        load(tmp_path)
    weights.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated or corrupt: the header claims"):
        load(tmp_path)
    weights.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load(tmp_path)


def test_mismatched_checkpoints(tmp_path):
    model = Wav2Vec2CTC(ModelConfig(**small_config()))
    save(model, tmp_path / "good.pt")
    original = torch.load(tmp_path / "good.pt", weights_only=True)

    def variant(name, edit):
        checkpoint = torch.load(tmp_path / "good.pt", weights_only=True)
        edit(checkpoint["state_dict"])
        torch.save(checkpoint, tmp_path / name)
        return tmp_path / name

    missing = variant("missing.pt", lambda s: s.pop("encoder.layers.1.attention.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing.pt: missing keys: encoder.layers.1.attention.k_proj.bias"):
        load(missing)
    with pytest.warns(UserWarning, match="k_proj.bias"):
        load(missing, strict=False)
    with pytest.raises(CheckpointError, match=r"unexpected.pt: unexpected keys: encoder.extra.weight"):
        load(variant("unexpected.pt", lambda s: s.update({"encoder.extra.weight": torch.zeros(2)})))
    with pytest.raises(CheckpointError, match=re.escape("shape.pt: shape mismatch for lm_head.weight: "
                                                        "got shape (31, 32), expected (32, 32)")):
        load(variant("shape.pt", lambda s: s.update({"lm_head.weight": torch.zeros(31, 32)})))
    many = variant("many.pt", lambda s: [s.pop(k) for k in list(s)[:15]])
    with pytest.raises(CheckpointError, match=r"many.pt: missing keys: .* \.\.\. and 5 more"):
        load(many)
    assert original["format"] == "spg"


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "wavlm", "model_type='wavlm'"),
    ("architectures", ["Wav2Vec2ForPreTraining"], "architectures=.*CTC"),
    ("add_adapter", True, "add_adapter=True"),
    ("hidden_act", "swish", "hidden_act='swish'"),
])
def test_unsupported_hf_configs(tmp_path, field, value, match):
    config = {**Wav2Vec2Config(**small_config()).to_dict(), "architectures": ["Wav2Vec2ForCTC"], field: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: " + match):
        load(tmp_path)


class RunsCode:
    """Unpickling this would run `touch <sentinel>`."""
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_running_pickle_is_refused(tmp_path, writer):
    sentinel = tmp_path / "pwned"
    checkpoint = {"args": RunsCode(sentinel), "model": {"w2v_encoder.proj.weight": torch.zeros(2, 2)}}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(checkpoint, path)
    else:
        path.write_bytes(pickle.dumps(checkpoint))
    with pytest.raises(CheckpointError, match=r"refused to unpickle (posix|os|nt)\.system in .*evil.pt"):
        load(path)
    assert not sentinel.exists()


def test_safetensors_reader_dtypes(tmp_path):
    tensors = {"f16": torch.randn(3, 2).half(), "bf16": torch.randn(4).bfloat16(), "f64": torch.randn(2).double(),
               "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "empty": torch.zeros(0, 3)}
    with open(tmp_path / "t.safetensors", "wb") as file:
        write_safetensors(file, tensors, {"format": "pt"})
    from safetensors.torch import load_file   # the reference reader
    for read in (read_safetensors(tmp_path / "t.safetensors")[0], load_file(tmp_path / "t.safetensors")):
        assert read.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)
