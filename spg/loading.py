"""Reading and writing checkpoints: our own format, Hugging Face folders and fairseq files.

    model = spg.load("wav2vec2-base-960h/")          # HF folder: config.json + model.safetensors
    model = spg.load("wav2vec_small_960h.pt")        # fairseq fine-tuned CTC checkpoint
    model = spg.load("models/pruned.pt")             # our format, written by spg.save
    spg.save(model, "models/pruned.pt", half=True)   # fp16 weights, read back as fp32
    spg.export_hf(model, "exported/")                # for Wav2Vec2ForCTC.from_pretrained

All three formats hold the same network, `spg.model.Wav2Vec2CTC`; only key names and the
place the config lives differ. Loading never runs code from the file:
  * our files and `pytorch_model.bin` go through `torch.load(weights_only=True)`;
  * safetensors files are parsed here, by hand (the format is a JSON header + raw bytes);
  * fairseq pickles go through a restricted unpickler that admits tensors, plain containers
    and inert stand-ins for argparse/omegaconf/fairseq config objects, and refuses the rest.
Every failure raises `CheckpointError`, whose message names the file and the offending keys.

Sections: 1. errors and key lists   2. public API   3. our format   4. Hugging Face folders
          5. safetensors   6. fairseq   7. restricted unpickler   8. shared helpers
"""

from __future__ import annotations

import ast
import builtins
import codecs
import collections
import contextlib
import copyreg
import json
import math
import os
import pickle
import re
import sys
import tempfile
import warnings
from typing import Any, BinaryIO, Callable, Iterable, Optional, Union

import torch

from spg.model import DEFAULT_VOCAB, ModelConfig, Wav2Vec2CTC

__all__ = ["CheckpointError", "load", "save", "export_hf", "read_safetensors", "write_safetensors", "atomic_write",
           "check_finite"]

PathLike = Union[str, os.PathLike]

# Our format. The version is bumped whenever a reader of the old version would misread a file.
#   1: every tensor dense in "state_dict".
#   2: adds "sparse": matrices with enough exact zeros stored as a bit mask + the kept values.
# save() writes the oldest version that holds the model: 1 when nothing is sparse, so dense
# files stay readable by older spg versions.
FORMAT_NAME = "spg"
FORMAT_VERSION = 2

# Keys that only matter for training-time masking. HF and fairseq store the mask embedding
# whenever masking *could* be used; our model creates it only when `mask_time_prob > 0`.
# When the loaded config turns masking off, a stored embedding is dropped without complaint
# (our choice: it has no effect on the forward pass).
TRAINING_ONLY_KEYS = ("masked_spec_embed",)


# ========================================================================================
# 1. Errors
# ========================================================================================

class CheckpointError(ValueError):
    """A checkpoint could not be read. The message names the file and what was wrong."""


def _format_keys(keys: Iterable[str], limit: int = 10) -> str:
    """'a, b, c' for short lists, 'a, ..., j ... and 7 more' for long ones."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


# ========================================================================================
# 2. Public API
# ========================================================================================

def load(path: PathLike, *, strict: bool = True, map_location: Union[str, torch.device] = "cpu",
         vocab: Optional[list[str]] = None, allow_nonfinite: bool = False) -> Wav2Vec2CTC:
    """Load a CTC model from a Hugging Face folder, a fairseq `.pt` file or our own file.

    path: a folder (HF: `config.json` + weights) or a file (ours or fairseq's; told apart by
        content, not by name).
    strict: missing or unexpected keys are errors (a wrong shape always is). With
        `strict=False` they only produce a warning and missing weights keep their random init.
    map_location: device of the returned model (tensors are read on the CPU first).
    vocab: the output tokens in id order; overrides the vocabulary stored with the model.
        Required for fairseq files whose head does not have the default 32 characters.
    allow_nonfinite: load weights that hold NaN or inf (refused by default: see `check_finite`),
        e.g. to find out what broke a file.

    Whisper (a Hugging Face or CTranslate2 Whisper folder, a `spg.whisper.save_whisper` file,
    or a name such as "whisper-tiny.en": see `spg.whisper.load_whisper`) gives a
    `spg.whisper.Whisper` instead; `vocab` does not apply to it.

    Returns the model in eval mode, like `from_pretrained`.
    """
    from spg import whisper            # imported here: spg.whisper imports this module
    path = os.fspath(path)
    if whisper.is_whisper_source(path):
        if vocab is not None:
            raise CheckpointError(f"{path}: a Whisper model has its own tokenizer; vocab= does not apply")
        model = whisper.load_whisper(path, strict=strict)
        if not allow_nonfinite:
            check_finite(model, path)
        return model.to(map_location).eval()
    if os.path.isdir(path):
        model = _load_hf_folder(path, strict=strict, vocab=vocab)
    elif os.path.isfile(path):
        if path.endswith((".safetensors", ".json")):
            raise CheckpointError(f"{path}: pass the folder that holds config.json and the weights, "
                                  "not one of its files")
        payload, weights_only = _read_torch_file(path)
        if isinstance(payload, dict) and payload.get("format") == FORMAT_NAME:
            if not weights_only:
                raise CheckpointError(f"{path}: claims format 'spg' but holds objects other than tensors and "
                                      "plain data (save() never writes those)")
            model = _load_spg(payload, path, strict=strict, vocab=vocab)
        elif isinstance(payload, dict) and payload.get("format") == whisper.FORMAT_NAME and weights_only:
            model = whisper.whisper_from_checkpoint(payload, path, strict=strict)
        elif isinstance(payload, dict) and "model" in payload and ("cfg" in payload or "args" in payload):
            model = _load_fairseq(payload, path, strict=strict, vocab=vocab)
        else:
            found = _format_keys(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path}: not a checkpoint this loader knows: expected a dict with "
                                  f"format='spg' (ours) or 'model' + 'cfg'/'args' (fairseq), found {found}")
    elif os.path.exists(path):
        raise CheckpointError(f"{path}: neither a file nor a folder")
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    if not allow_nonfinite:
        check_finite(model, path)
    return model.to(map_location).eval()


def save(model: Wav2Vec2CTC, path: PathLike, *, half: bool = False) -> None:
    """Write `model` in our format, atomically (a reader never sees a half-written file).

    The file is `torch.save` of a plain dict, readable with `torch.load(weights_only=True)`:
        {"format": "spg", "version": 1 or 2, "config": ModelConfig.to_dict(), "vocab": [...],
         "state_dict": {name: tensor}, "sparse": {name: {"shape", "mask", "values"}} (version 2),
         "compression": model.compression}
    half=True stores floating-point weights as fp16 (half the size; loaded back as fp32).
    Pruned matrices are stored sparse (see `_encode_state_dict`): a matrix of sparsity s
    takes (1 − s) + 1/32 of its dense fp32 size ((1 − s) + 1/16 of its fp16 size with half).
    """
    _check_plain_data(model.compression, "model.compression")
    weights = _encode_state_dict(model.state_dict(), half=half)
    checkpoint = {
        "format": FORMAT_NAME,
        "version": 2 if "sparse" in weights else 1,
        "config": model.config.to_dict(),
        "vocab": list(model.vocab),
        **weights,
        "compression": model.compression,
    }
    atomic_write(os.fspath(path), lambda file: torch.save(checkpoint, file))


def export_hf(model: Wav2Vec2CTC, folder: PathLike) -> None:
    """Write a Hugging Face folder that `Wav2Vec2ForCTC` / `HubertForCTC.from_pretrained` loads:
    config.json, model.safetensors (fp32), vocab.json, tokenizer_config.json and
    preprocessor_config.json. Raises ValueError for a model HF cannot represent."""
    folder = os.fspath(folder)
    hf_config = hf_config_from_model_config(model.config, model.vocab)     # raises ValueError early
    prefix = _HF_PREFIX[model.config.model_type]
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        tensors[hf_key(key, prefix)] = value.float() if value.is_floating_point() else value
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "model.safetensors"),
                 lambda file: write_safetensors(file, tensors, metadata={"format": "pt"}))
    for name, content in [
        ("config.json", hf_config),
        ("vocab.json", {token: i for i, token in enumerate(model.vocab)}),
        ("tokenizer_config.json", _hf_tokenizer_config(model.vocab)),
        ("preprocessor_config.json", {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "feature_size": 1,
            "sampling_rate": 16000,
            "padding_side": "right",
            "padding_value": 0.0,
            "do_normalize": bool(model.config.do_normalize),
            # HF's rule: only layer-norm feature extractors handle padding correctly.
            "return_attention_mask": model.config.feat_extract_norm == "layer",
        }),
    ]:
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        atomic_write(os.path.join(folder, name), lambda file, text=text: file.write(text.encode("utf-8")))


# ========================================================================================
# 3. Our format
# ========================================================================================

def _encode_state_dict(state: dict[str, torch.Tensor], *, half: bool) -> dict[str, Any]:
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


def _decode_state_dict(checkpoint: dict, source: str) -> dict[str, torch.Tensor]:
    """Inverse of `_encode_state_dict`: {name: tensor} in whatever dtype was stored (the
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
    count = math.prod(shape)
    if mask.dtype != torch.uint8 or mask.ndim != 1 or mask.numel() != -(-count // 8):
        raise CheckpointError(f"{where}: the mask should be {-(-count // 8)} uint8 bytes for shape {shape}, "
                              f"got {mask.dtype} {tuple(mask.shape)}")
    keep = _unpack_bits(mask, count)
    if values.ndim != 1 or values.numel() != int(keep.sum()):
        raise CheckpointError(f"{where}: the mask keeps {int(keep.sum())} entries but "
                              f"{tuple(values.shape)} values are stored")
    dense = torch.zeros(count, dtype=values.dtype)
    dense[keep] = values
    return dense.view(shape)


def _load_spg(checkpoint: dict, source: str, *, strict: bool, vocab: Optional[list[str]]) -> Wav2Vec2CTC:
    version = checkpoint.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{source}: format version {version!r} is not supported "
                              f"(this spg reads versions 1..{FORMAT_VERSION}; a newer spg wrote it?)")
    if not isinstance(checkpoint.get("config"), dict):
        raise CheckpointError(f"{source}: 'config' is missing or not a dict")
    try:
        config = ModelConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid 'config': {error}") from None
    if vocab is None:
        vocab = checkpoint.get("vocab")
        if not (isinstance(vocab, list) and all(isinstance(token, str) for token in vocab)):
            raise CheckpointError(f"{source}: 'vocab' is missing or not a list of strings")
    model = _build_model(config, vocab, source)
    _install_state_dict(model, _decode_state_dict(checkpoint, source), source, strict=strict)
    compression = checkpoint.get("compression") or {}
    if not isinstance(compression, dict):
        raise CheckpointError(f"{source}: 'compression' is not a dict")
    model.compression = compression
    return model


# ========================================================================================
# 4. Hugging Face folders
# ========================================================================================

_HF_PREFIX = {"wav2vec2": "wav2vec2.", "hubert": "hubert."}
_HF_ARCHITECTURE = {"wav2vec2": "Wav2Vec2ForCTC", "hubert": "HubertForCTC"}
# HF config fields that map one-to-one onto ModelConfig fields (same name, same meaning).
_HF_SHARED_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "layer_norm_eps", "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm",
    "feat_extract_activation", "do_stable_layer_norm", "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups", "vocab_size", "pad_token_id", "hidden_dropout", "attention_dropout",
    "activation_dropout", "feat_proj_dropout", "final_dropout", "layerdrop", "mask_time_prob",
    "mask_time_length", "mask_time_min_masks",
)
# Weight-norm parameters: the legacy names (ours, fairseq's, old HF files) and the names of
# torch.nn.utils.parametrizations.weight_norm (transformers >= 4.37 writes these).
_WEIGHT_NORM_NAMES = {"parametrizations.weight.original0": "weight_g",
                      "parametrizations.weight.original1": "weight_v"}


def our_key(hf_key: str, prefix: str) -> str:
    """HF state-dict key -> ours: drop the 'wav2vec2.'/'hubert.' prefix, legacy weight-norm names."""
    key = hf_key[len(prefix):] if hf_key.startswith(prefix) else hf_key
    for parametrized, legacy in _WEIGHT_NORM_NAMES.items():
        if key.endswith(parametrized):
            key = key[: -len(parametrized)] + legacy
    return key


def hf_key(key: str, prefix: str) -> str:
    """Our state-dict key -> the name transformers 5 uses (prefix + parametrizations spelling;
    transformers also accepts the legacy weight_g/weight_v names when loading)."""
    for parametrized, legacy in _WEIGHT_NORM_NAMES.items():
        if key.endswith("." + legacy):
            key = key[: -len(legacy)] + parametrized
    return key if key.startswith("lm_head.") else prefix + key


def model_config_from_hf(hf: dict, source: str, do_normalize: bool = True) -> ModelConfig:
    """Translate an HF `Wav2Vec2Config`/`HubertConfig` dict, refusing anything our network
    does not compute exactly. `source` names the file in error messages."""
    def refuse(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field}={hf.get(field)!r}: {why}")

    model_type = hf.get("model_type")
    if model_type not in _HF_PREFIX:
        raise refuse("model_type", "only 'wav2vec2' and 'hubert' are supported (wav2vec2-conformer, "
                                   "wavlm, data2vec-audio, ... are different networks)")
    architectures = hf.get("architectures")
    if architectures is not None and _HF_ARCHITECTURE[model_type] not in architectures:
        raise refuse("architectures", f"expected {_HF_ARCHITECTURE[model_type]!r}: only CTC fine-tuned "
                                      "checkpoints have the lm_head this model needs")
    if hf.get("add_adapter"):
        raise refuse("add_adapter", "the convolutional adapter after the encoder is not supported")
    if hf.get("adapter_attn_dim") is not None:
        raise refuse("adapter_attn_dim", "attention adapters (MMS) are not supported")
    if hf.get("conv_pos_batch_norm"):
        raise refuse("conv_pos_batch_norm", "the batch-norm positional convolution is not supported")
    if hf.get("hidden_act", "gelu") not in ("gelu", "relu"):
        raise refuse("hidden_act", "only 'gelu' and 'relu' are supported")
    if hf.get("feat_extract_activation", "gelu") != "gelu":
        raise refuse("feat_extract_activation", "only 'gelu' is supported")
    if hf.get("feat_extract_norm", "group") not in ("group", "layer"):
        raise refuse("feat_extract_norm", "expected 'group' or 'layer'")

    values = {name: hf[name] for name in _HF_SHARED_FIELDS if name in hf}
    values["model_type"] = model_type
    # wav2vec2 always normalises the conv features; HuBERT makes it optional (default True).
    values["feat_proj_layer_norm"] = bool(hf.get("feat_proj_layer_norm", True)) if model_type == "hubert" else True
    if not hf.get("apply_spec_augment", True):
        values["mask_time_prob"] = 0.0          # HF skips masking entirely; so do we
    values["do_normalize"] = bool(do_normalize)
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from None


def hf_config_from_model_config(config: ModelConfig, vocab: list[str]) -> dict:
    """A complete `Wav2Vec2Config`/`HubertConfig` dict for `config`. Fields that do not affect
    the CTC network (quantizer, adapters, x-vector head) get HF's defaults or are left out."""
    if not config.is_uniform:
        raise ValueError("transformers cannot represent this model: its blocks have different numbers "
                         "or widths of attention heads or FFN sizes (config.is_uniform is False), while "
                         "Wav2Vec2Config has one num_attention_heads and intermediate_size for all "
                         "blocks. Save it with spg.save instead.")
    if config.model_type == "wav2vec2" and not config.feat_proj_layer_norm:
        raise ValueError("transformers cannot represent a wav2vec2 model without the feature-projection "
                         "LayerNorm (feat_proj_layer_norm=False exists only for HuBERT)")
    hf = {
        "architectures": [_HF_ARCHITECTURE[config.model_type]],
        "model_type": config.model_type,
        **{name: getattr(config, name) for name in _HF_SHARED_FIELDS},
        "conv_dim": list(config.conv_dim),
        "conv_kernel": list(config.conv_kernel),
        "conv_stride": list(config.conv_stride),
        "num_feat_extract_layers": len(config.conv_dim),
        "apply_spec_augment": config.mask_time_prob > 0,
        "mask_feature_prob": 0.0,      # with mask_time_prob == 0 this keeps masked_spec_embed absent in HF too
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "bos_token_id": vocab.index("<s>") if "<s>" in vocab else None,
        "eos_token_id": vocab.index("</s>") if "</s>" in vocab else None,
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": False,
        "use_weighted_layer_sum": False,
        "add_adapter": False,
        "initializer_range": 0.02,
        "dtype": "float32",
    }
    if config.model_type == "hubert":
        hf["feat_proj_layer_norm"] = bool(config.feat_proj_layer_norm)
        hf["conv_pos_batch_norm"] = False
    return hf


def _hf_tokenizer_config(vocab: list[str]) -> dict:
    """Settings for Wav2Vec2CTCTokenizer; special tokens only where the vocabulary has them."""
    tokenizer = {"tokenizer_class": "Wav2Vec2CTCTokenizer", "do_lower_case": False, "word_delimiter_token": "|"}
    for field, token in [("pad_token", "<pad>"), ("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>")]:
        tokenizer[field] = token if token in vocab else None
    return tokenizer


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not readable JSON ({error})") from None


def _load_hf_folder(folder: str, *, strict: bool, vocab: Optional[list[str]]) -> Wav2Vec2CTC:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder}: a Hugging Face model folder needs config.json, which is missing")
    hf = _read_json(config_path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    do_normalize = True                                   # HF Wav2Vec2FeatureExtractor's default
    preprocessor_path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(preprocessor_path):
        preprocessor = _read_json(preprocessor_path)
        if not isinstance(preprocessor, dict):
            raise CheckpointError(f"{preprocessor_path}: expected a JSON object")
        do_normalize = bool(preprocessor.get("do_normalize", True))
    config = model_config_from_hf(hf, config_path, do_normalize)
    if vocab is None:
        vocab = _read_hf_vocab(os.path.join(folder, "vocab.json"), config.vocab_size)
    if vocab is None and config.vocab_size != len(DEFAULT_VOCAB):
        raise CheckpointError(f"{folder}: no vocab.json, and vocab_size={config.vocab_size} in config.json is not "
                              f"the default {len(DEFAULT_VOCAB)}-token vocabulary; pass load(..., vocab=[...])")
    model = _build_model(config, vocab, folder)

    weights_path, hf_state = _read_hf_weights(folder)
    prefix = _HF_PREFIX[config.model_type]
    state = {our_key(key, prefix): tensor for key, tensor in hf_state.items()}
    _install_state_dict(model, state, weights_path, strict=strict)
    return model


def _read_hf_vocab(path: str, vocab_size: int) -> Optional[list[str]]:
    """vocab.json ({token: id}) as a list ordered by id; None (the default vocabulary) if absent."""
    if not os.path.isfile(path):
        return None
    token_to_id = _read_json(path)
    if not isinstance(token_to_id, dict) or not all(isinstance(i, int) for i in token_to_id.values()):
        raise CheckpointError(f"{path}: expected a flat JSON object {{token: id}} "
                              "(per-language vocabularies are not supported)")
    vocab = sorted(token_to_id, key=token_to_id.__getitem__)
    if sorted(token_to_id.values()) != list(range(len(vocab))) or len(vocab) != vocab_size:
        raise CheckpointError(f"{path}: expected ids 0..{vocab_size - 1} (vocab_size={vocab_size} in "
                              f"config.json), got {len(vocab)} tokens with ids "
                              f"{min(token_to_id.values(), default=None)}..{max(token_to_id.values(), default=None)}")
    return vocab


def _read_hf_weights(folder: str) -> tuple[str, dict[str, torch.Tensor]]:
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
    index = _read_json(index_path)
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
                              f"{_format_keys(listed_but_absent)}")
    return tensors


def _read_torch_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin`: a pickled {name: tensor}, read with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({_first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


# ========================================================================================
# 5. safetensors, by hand
#
# Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
# N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
# {str: str}}, then the raw little-endian tensor bytes; offsets count from the end of the
# header. Readers (the Rust library included) require the tensors to tile the data section
# with no gaps, so the writer packs them back to back and pads the header with spaces to a
# multiple of 8 bytes, which keeps every fp32 tensor 4-byte aligned.
# ========================================================================================

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024      # the same limit as the reference implementation


def read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a .safetensors file: ({name: tensor}, metadata). Validates the header against the
    file size, so a truncated or corrupt file raises CheckpointError naming the tensors."""
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
        if header_size > min(file_size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: truncated or corrupt: the header claims {header_size} bytes "
                                  f"but the file has {file_size - 8} after the length field")
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_size
        data_size = file_size - data_start

        entries, problems = {}, []
        for name, entry in header.items():
            problem = _check_safetensors_entry(entry, data_size)
            if problem:
                problems.append(f"{name} ({problem})")
            else:
                entries[name] = entry
        if problems:
            raise CheckpointError(f"{path}: truncated or corrupt ({data_size} data bytes after the header); "
                                  f"bad tensors: {_format_keys(problems)}")
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
            if end == begin:
                tensors[name] = torch.zeros(entry["shape"], dtype=dtype)
                continue
            buffer = bytearray(end - begin)
            file.seek(data_start + begin)
            if file.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{path}: truncated while reading tensor {name}")
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
    return tensors, metadata


def _check_safetensors_entry(entry: Any, data_size: int) -> Optional[str]:
    """Why a header entry is unusable, or None if it is fine."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return "entry lacks dtype/shape/data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _SAFETENSORS_DTYPES:
        return f"dtype {dtype!r} is not one of {', '.join(_SAFETENSORS_DTYPES)}"
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        return f"bad shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
        return f"bad data_offsets {offsets!r}"
    begin, end = offsets
    expected_bytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
    if not 0 <= begin <= end:
        return f"bad data_offsets {offsets}"
    if end > data_size:
        return f"bytes {begin}..{end} lie beyond the end of the file"
    if end - begin != expected_bytes:
        return f"holds {end - begin} bytes, but shape {shape} of {dtype} needs {expected_bytes}"
    return None


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
# 6. fairseq fine-tuned checkpoints (Wav2VecCtc / HubertCtc)
#
# Key names follow fairseq's modules, as mapped by torchaudio's import_fairseq.py and
# transformers' convert_wav2vec2_original_pytorch_checkpoint_to_pytorch.py. Every encoder key
# sits under "w2v_encoder.w2v_model."; the CTC head is "w2v_encoder.proj".
# ========================================================================================

_FAIRSEQ_ENCODER_PREFIX = "w2v_encoder.w2v_model."
_FAIRSEQ_KEY_MAP: list[tuple[str, str]] = [         # (regex on the key after the prefix, our key)
    # conv block i = Sequential(conv, dropout, norm, gelu); layer-norm mode wraps the norm in
    # Sequential(TransposeLast, LayerNorm, TransposeLast), hence "2.1".
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.(weight_g|weight_v|bias)", r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
     r"encoder.layers.\1.attention.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"mask_emb", "masked_spec_embed"),
]
# Pretraining-only modules (quantizer and targets of the contrastive / masked-prediction
# losses). fine-tuning normally deletes them; when a file still has them, they are skipped.
FAIRSEQ_PRETRAINING_ONLY = ("quantizer.", "project_q.", "final_proj.", "label_embs_concat", "target_glu.")

# fairseq's Wav2Vec2Config defaults, used when an old checkpoint's config omits a field.
_FAIRSEQ_DEFAULTS = {
    "encoder_embed_dim": 768, "encoder_layers": 12, "encoder_attention_heads": 12,
    "encoder_ffn_embed_dim": 3072, "activation_fn": "gelu", "extractor_mode": "default",
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_bias": False, "layer_norm_first": False, "conv_pos": 128, "conv_pos_groups": 16,
}


def fairseq_key(key: str) -> Optional[str]:
    """fairseq key -> our key; None for keys we do not know (they become 'unexpected')."""
    for parametrized, legacy in _WEIGHT_NORM_NAMES.items():   # re-saved files may use either spelling
        if key.endswith(parametrized):
            key = key[: -len(parametrized)] + legacy
    if key in ("w2v_encoder.proj.weight", "w2v_encoder.proj.bias"):
        return "lm_head." + key.rsplit(".", 1)[1]
    if not key.startswith(_FAIRSEQ_ENCODER_PREFIX):
        return None
    inner = key[len(_FAIRSEQ_ENCODER_PREFIX):]
    for pattern, replacement in _FAIRSEQ_KEY_MAP:
        if re.fullmatch(pattern, inner):
            return re.sub(pattern, replacement, inner)
    return None


def parse_conv_feature_layers(text: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's `conv_feature_layers` string, e.g.
    "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2", without eval(): only int, list and
    tuple literals, `+` of two lists and `*` of a list by a small int are allowed."""
    if not isinstance(text, str) or len(text) > 2000:
        raise ValueError(f"expected a short string, got {text!r}")

    def evaluate(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [evaluate(element) for element in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(left, list) and isinstance(right, list):
                return left + right
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(left, int):
                left, right = right, left
            if isinstance(left, list) and isinstance(right, int) and 0 <= right <= 100:
                return left * right
        raise ValueError(f"unsupported expression {ast.unparse(node)!r}")

    layers = evaluate(ast.parse(text, mode="eval").body)
    if not (isinstance(layers, list) and layers and all(
            isinstance(layer, tuple) and len(layer) == 3 and all(n > 0 for n in layer) for layer in layers)):
        raise ValueError(f"expected a non-empty list of (dim, kernel, stride) tuples, got {layers!r}")
    return layers


def _fairseq_configs(checkpoint: dict, source: str) -> tuple[dict, dict, dict]:
    """(fine-tuning model config, pretraining model config, task config) as plain dicts, from
    either a Hydra `cfg` (newer fairseq) or an argparse `args` Namespace (older fairseq)."""
    if checkpoint.get("cfg") is not None:
        cfg = _to_plain(checkpoint["cfg"])
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: 'cfg' is not a dict")
        finetune, task = cfg.get("model") or {}, cfg.get("task") or {}
    else:
        args = _to_plain(checkpoint.get("args"))
        if not isinstance(args, dict):
            raise CheckpointError(f"{source}: 'args' is neither a Namespace nor a dict")
        finetune, task = args, args                       # old fairseq: one flat Namespace
    w2v_args = finetune.get("w2v_args")
    if not isinstance(w2v_args, dict):
        name = finetune.get("_name") or finetune.get("arch")
        raise CheckpointError(f"{source}: the model config (_name/arch={name!r}) has no w2v_args: this is "
                              "a pretraining-only checkpoint without a CTC head, or a fine-tuned one that "
                              "refers to its pretrained config by path (w2v_path); only self-contained "
                              "fine-tuned CTC checkpoints are supported")
    pretrain = w2v_args.get("model") if isinstance(w2v_args.get("model"), dict) else w2v_args
    return finetune, pretrain, task


def model_config_from_fairseq(checkpoint: dict, source: str, lm_head_rows: int) -> ModelConfig:
    """Translate the configs of a fairseq fine-tuned CTC checkpoint, refusing other models."""
    finetune, pretrain, task = _fairseq_configs(checkpoint, source)
    finetune_name = str(finetune.get("_name") or finetune.get("arch") or "")
    pretrain_name = str(pretrain.get("_name") or pretrain.get("arch") or
                        ("hubert" if "hubert" in finetune_name else "wav2vec2"))

    def refuse(field: str, value: Any, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field}={value!r}: {why}")

    if finetune_name and not finetune_name.endswith("_ctc"):
        raise refuse("model._name", finetune_name,
                     "only CTC fine-tuned models (wav2vec_ctc, hubert_ctc) are supported")
    if pretrain_name not in ("wav2vec2", "hubert"):
        raise refuse("w2v_args.model._name", pretrain_name, "only 'wav2vec2' and 'hubert' encoders are supported")
    setting = {**_FAIRSEQ_DEFAULTS, **{k: v for k, v in pretrain.items() if v is not None}}
    if setting.get("layer_type", "transformer") != "transformer":
        raise refuse("w2v_args.model.layer_type", setting["layer_type"],
                     "only 'transformer' blocks are supported (not e.g. conformer)")
    if setting.get("pos_conv_depth", 1) != 1:
        raise refuse("w2v_args.model.pos_conv_depth", setting["pos_conv_depth"],
                     "only one positional conv is supported")
    if setting["activation_fn"] not in ("gelu", "relu"):
        raise refuse("w2v_args.model.activation_fn", setting["activation_fn"], "only 'gelu' and 'relu' are supported")
    if setting["extractor_mode"] not in ("default", "layer_norm"):
        raise refuse("w2v_args.model.extractor_mode", setting["extractor_mode"], "expected 'default' or 'layer_norm'")
    try:
        conv_layers = parse_conv_feature_layers(setting["conv_feature_layers"])
    except (SyntaxError, ValueError) as error:
        raise refuse("w2v_args.model.conv_feature_layers", setting["conv_feature_layers"], str(error)) from None

    def finetune_value(name: str, default: float) -> float:
        value = finetune.get(name)
        return default if value is None else value

    values = dict(
        model_type=pretrain_name,
        hidden_size=setting["encoder_embed_dim"],
        num_hidden_layers=setting["encoder_layers"],
        num_attention_heads=setting["encoder_attention_heads"],
        intermediate_size=setting["encoder_ffn_embed_dim"],
        hidden_act=setting["activation_fn"],
        conv_dim=[dim for dim, _, _ in conv_layers],
        conv_kernel=[kernel for _, kernel, _ in conv_layers],
        conv_stride=[stride for _, _, stride in conv_layers],
        conv_bias=bool(setting["conv_bias"]),
        feat_extract_norm="group" if setting["extractor_mode"] == "default" else "layer",
        do_stable_layer_norm=bool(setting["layer_norm_first"]),
        num_conv_pos_embeddings=setting["conv_pos"],
        num_conv_pos_embedding_groups=setting["conv_pos_groups"],
        # fairseq's HuBERT always has this LayerNorm too, but look rather than assume.
        feat_proj_layer_norm=(pretrain_name == "wav2vec2"
                              or _FAIRSEQ_ENCODER_PREFIX + "layer_norm.weight" in checkpoint["model"]),
        vocab_size=lm_head_rows,
        # The fine-tuning config overrides the pretraining regularisation (fairseq's Wav2VecEncoder).
        hidden_dropout=finetune_value("dropout", 0.0),
        attention_dropout=finetune_value("attention_dropout", 0.0),
        activation_dropout=finetune_value("activation_dropout", 0.0),
        feat_proj_dropout=finetune_value("dropout_input", 0.0),
        final_dropout=finetune_value("final_dropout", 0.0),
        layerdrop=finetune_value("layerdrop", 0.0),
        mask_time_prob=finetune_value("mask_prob", 0.5),
        mask_time_length=finetune_value("mask_length", 10),
        do_normalize=bool(task.get("normalize", False)),
    )
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from None


def _fairseq_vocab(checkpoint: dict, rows: int, source: str) -> list[str]:
    """The output tokens: a fairseq Dictionary stored in task_state (fairseq's symbols 0 "<s>"
    and 1 "<pad>" trade names, as in HF's conversion: row 0 is the CTC blank, which HF calls
    "<pad>"), else the default 32-character vocabulary when the head has 32 rows."""
    task_state = _to_plain(checkpoint.get("task_state"))
    candidates = []
    if isinstance(task_state, dict):
        for value in task_state.values():
            candidates.extend(value if isinstance(value, list) else [value])
    for dictionary in candidates:
        symbols = dictionary.get("symbols") if isinstance(dictionary, dict) else None
        if isinstance(symbols, list) and len(symbols) == rows and symbols[:2] == ["<s>", "<pad>"]:
            return ["<pad>", "<s>"] + [str(symbol) for symbol in symbols[2:]]
    if rows == len(DEFAULT_VOCAB):
        return list(DEFAULT_VOCAB)
    raise CheckpointError(f"{source}: the CTC head has {rows} outputs and the file carries no dictionary; "
                          "pass the tokens in id order with load(..., vocab=[...])")


def _load_fairseq(checkpoint: dict, source: str, *, strict: bool, vocab: Optional[list[str]]) -> Wav2Vec2CTC:
    weights = checkpoint["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{source}: 'model' is not a dict of tensors")
    head = weights.get("w2v_encoder.proj.weight")
    if head is None:
        raise CheckpointError(f"{source}: no CTC head (w2v_encoder.proj.weight is missing; "
                              "a pretraining-only checkpoint?)")
    config = model_config_from_fairseq(checkpoint, source, lm_head_rows=head.shape[0])
    if vocab is None:
        vocab = _fairseq_vocab(checkpoint, head.shape[0], source)
    model = _build_model(config, vocab, source)

    state, unknown = {}, []
    for key, tensor in weights.items():
        inner = key[len(_FAIRSEQ_ENCODER_PREFIX):] if key.startswith(_FAIRSEQ_ENCODER_PREFIX) else None
        if inner is not None and inner.startswith(FAIRSEQ_PRETRAINING_ONLY):
            continue
        mapped = fairseq_key(key)
        if mapped is None:
            unknown.append(key)
        else:
            state[mapped] = tensor
    _install_state_dict(model, state, source, strict=strict, unknown_source_keys=unknown)
    return model


# ========================================================================================
# 7. A restricted unpickler for fairseq files
#
# Pickle runs code by design: a GLOBAL opcode names any importable callable and REDUCE calls
# it. torch.load lets us pass our own `pickle_module`; its Unpickler.find_class is the only
# way a pickle reaches a Python object, so it admits exactly:
#   * what torch needs to rebuild tensors (its storage classes are resolved by torch itself),
#   * builtin containers and scalars, OrderedDict, copyreg's reconstructors, codecs.encode,
#   * numpy scalars/dtypes/arrays (fairseq stores e.g. best_loss as a numpy float),
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
# expand to at most `_MAX_ARGUMENT_OBJECTS` objects, and `_to_plain` stops after
# `_MAX_CONFIG_SIZE` objects and characters.
# ========================================================================================

_MAX_ARGUMENT_OBJECTS = 100_000      # a tensor rebuild takes ~10; fairseq's largest config call far fewer
_MAX_KEY_OBJECTS = 1_000             # dict keys and set items are strings and ints in checkpoints
_MAX_CONFIG_SIZE = 10_000_000        # objects + characters of the plain configs (real ones: ~10^4)


class _Refused(Exception):
    """Raised inside the unpickler; `_read_torch_file` turns it into a CheckpointError."""


class _RefusedGlobal(_Refused):
    def __init__(self, qualified_name: str):
        super().__init__(f"refused to unpickle {qualified_name}")
        self.qualified_name = qualified_name


class _Record:
    """Stand-in for a class we do not import (argparse.Namespace, omegaconf DictConfig and its
    nodes, fairseq Dictionary, enums). It records constructor arguments and pickled state and
    has no other behaviour; `_to_plain` turns it into plain dicts, lists and values."""

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
        ("_codecs", "encode"): codecs.encode,     # how pickle protocol 2 stores bytes
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
    import numpy
    try:
        from numpy._core import multiarray           # numpy >= 2
    except ImportError:
        from numpy.core import multiarray            # numpy 1.x
    return {"scalar": multiarray.scalar, "_reconstruct": multiarray._reconstruct,
            "dtype": numpy.dtype, "ndarray": numpy.ndarray}.get(name)


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


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None))
# Callables whose arguments must be atoms: str()/hash of a container could be exponential, and
# bytes(n)/bytearray(n) would allocate n bytes.
_ATOM_ARGUMENTS = (str, bytes, bytearray, int, float, complex, bool, slice, codecs.encode)


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
        if func is copyreg._reconstructor and len(args) == 3:
            self._check_call(args[1], (args[2],) if args[2] is not None else ())

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
        import numpy
        self._check_target(self.stack[-2], "set the state of", (numpy.ndarray, numpy.dtype))
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
    __name__ = "spg.loading restricted pickle"

    @staticmethod
    def load(file: BinaryIO, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _read_torch_file(path: str) -> tuple[Any, bool]:
    """Unpickle a torch.save / pickle file without running code from it: first with
    torch's weights_only loader (enough for our files), then, for files that need more
    (fairseq's Namespace/omegaconf configs), with the restricted unpickler.
    Returns (content, whether the weights_only loader sufficed)."""
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
                              f"{_first_line(error)})") from None


def _to_plain(value: Any, budget: Optional[list[int]] = None, depth: int = 0) -> Any:
    """Replace `_Record`s (and numpy scalars) by plain dicts, lists and values, recursively.
    omegaconf containers keep their data in state["_content"], its value nodes in
    state["_val"]; a Namespace's state is its attribute dict; an enum member is its value.
    The result is a tree: each object reached twice is copied twice, so the work is bounded by
    `budget` (objects + characters, `_MAX_CONFIG_SIZE` by default) and refused past it."""
    if budget is None:
        budget = [_MAX_CONFIG_SIZE]
    budget[0] -= 1 + (len(value) if isinstance(value, (str, bytes, bytearray)) else 0)
    if budget[0] < 0:
        raise CheckpointError(f"config too large: it expands to more than {_MAX_CONFIG_SIZE:,} objects and "
                              "characters (real fairseq configs have about 10^4; shared or self-referencing "
                              "containers?)")
    if depth > 100:
        raise CheckpointError("config nested more than 100 levels deep")
    deeper = depth + 1
    if isinstance(value, _Record):
        state = value.state if isinstance(value.state, dict) else {}
        if value.origin.startswith("omegaconf.") and "_content" in state:
            return _to_plain(state["_content"], budget, deeper)
        if value.origin.startswith("omegaconf.") and "_val" in state:
            return _to_plain(state["_val"], budget, deeper)
        if value.state is None and len(value.args) == 1 and not value.contents:
            return _to_plain(value.args[0], budget, deeper)        # enum member: Enum(value)
        if value.contents and not state:
            return _to_plain(value.contents, budget, deeper)       # a list-like object
        return {str(k): _to_plain(v, budget, deeper) for k, v in state.items()}
    if isinstance(value, dict):
        return {_to_plain(k, budget, deeper): _to_plain(v, budget, deeper) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v, budget, deeper) for v in value)
    if hasattr(value, "item") and not isinstance(value, torch.Tensor) and getattr(value, "shape", None) == ():
        return value.item()                                # numpy scalar
    return value


# ========================================================================================
# 8. Shared helpers
# ========================================================================================

def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _build_model(config: ModelConfig, vocab: Optional[list[str]], source: str) -> Wav2Vec2CTC:
    try:
        return Wav2Vec2CTC(config, vocab)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None


def _install_state_dict(model: Wav2Vec2CTC, state: dict[str, torch.Tensor], source: str, *, strict: bool,
                        unknown_source_keys: Iterable[str] = ()) -> None:
    """Copy `state` (already in our key names) into `model`, casting to the model's dtypes.

    Wrong shapes always fail; missing and unexpected keys fail when `strict`, else warn.
    `unknown_source_keys` are file keys that have no name in our model (reported as unexpected)."""
    expected = model.state_dict()
    state = {key: value for key, value in state.items()
             if not (key in TRAINING_ONLY_KEYS and key not in expected)}
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: these entries are not tensors: {_format_keys(not_tensors)}")
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
        problems.append(f"shape mismatch for {_format_keys(mismatched)}")
    if wrong_kind:
        problems.append(f"wrong dtype for {_format_keys(wrong_kind)}")
    if missing and strict:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    if missing or unexpected:
        warnings.warn(f"{source}: missing keys: {_format_keys(missing) or 'none'}; "
                      f"unexpected keys: {_format_keys(unexpected) or 'none'}", stacklevel=3)
    model.load_state_dict({key: value for key, value in state.items() if key in expected}, strict=False)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "boolean" if dtype == torch.bool else "integer"


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Raise CheckpointError naming every parameter or buffer that holds NaN or ±inf (one
    such weight among millions turns every output into NaN, with no other sign)."""
    broken = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                broken.append(f"{name} ({bad:,} of {tensor.numel():,} values)")
    if broken:
        raise CheckpointError(f"{source}: non-finite weights (NaN or inf) in {_format_keys(broken)}; "
                              "pass spg.load(..., allow_nonfinite=True) to inspect the file anyway")


def _check_plain_data(value: Any, where: str) -> None:
    """Raise ValueError unless `value` is made of types torch.load(weights_only=True) reads back."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain_data(key, f"{where} key")
            _check_plain_data(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain_data(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool, torch.Tensor))):
        raise ValueError(f"{where} is a {type(value).__name__}; checkpoints store only dicts, lists, tuples, "
                         "str, int, float, bool, None and tensors")


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
