"""wav2vec2 / HuBERT checkpoints: our own format, Hugging Face folders and fairseq files.

    model = spg.load("wav2vec2-base-960h/")          # HF folder: config.json + model.safetensors
    model = spg.load("wav2vec_small_960h.pt")        # fairseq fine-tuned CTC checkpoint
    model = spg.load("models/pruned.pt")             # our format, written by spg.save
    spg.save(model, "models/pruned.pt", half=True)   # fp16 weights, read back as fp32
    spg.export_hf(model, "exported/")                # for Wav2Vec2ForCTC.from_pretrained

All three formats hold the same network, `spg.wav2vec2.model.Wav2Vec2CTC`; only key names and
the place the config lives differ. This module translates configs and key names; reading the
files safely is `spg.safetensors`'s (by hand), `spg.unpickler`'s (a restricted unpickler for
fairseq's pickles) and `spg.hf_weights`'s; strict key checking is `spg.checkpoint`'s and atomic
writes `spg.files`'. `spg.load` (in `spg.loading`) tells the
formats and the model families apart. Every failure raises `CheckpointError`.

Sections: 1. our format   2. Hugging Face folders   3. fairseq
"""

from __future__ import annotations

import ast
import json
import os
import re
from typing import Any, Optional, Union

import torch

from spg.checkpoint import (MAX_LAYERS, CheckpointError, check_layer_budget, check_parameter_budget, install_state_dict,
                            read_checkpoint, read_json, short_repr, write_checkpoint)
from spg.files import atomic_write
from spg.hf_weights import read_hf_weights
from spg.safetensors import write_safetensors
from spg.unpickler import to_plain
from spg.wav2vec2.model import DEFAULT_VOCAB, ModelConfig, Wav2Vec2CTC

__all__ = ["save", "export_hf", "from_spg_checkpoint", "load_hf_folder", "from_fairseq_checkpoint",
           "model_config_from_hf", "hf_config_from_model_config", "model_config_from_fairseq", "our_key", "hf_key",
           "fairseq_key", "parse_conv_feature_layers", "parameter_count", "check_model_size"]

PathLike = Union[str, os.PathLike]

# Keys that only matter for training-time masking. HF and fairseq store the mask embedding
# whenever masking *could* be used; our model creates it only when `mask_time_prob > 0`.
# When the loaded config turns masking off, a stored embedding is dropped without complaint
# (our choice: it has no effect on the forward pass).
TRAINING_ONLY_KEYS = ("masked_spec_embed",)


# ========================================================================================
# 1. Our format
# ========================================================================================

def save(model: Wav2Vec2CTC, path: PathLike, *, half: bool = False) -> None:
    """Write `model` in our format (`spg.checkpoint.write_checkpoint`), atomically, with
    family "wav2vec2" and its vocabulary: version 1 when every matrix is dense, 2 when some
    are stored sparse, so older spg versions read it.

    half=True stores floating-point weights as fp16 (half the size; loaded back as fp32).
    Pruned matrices are stored sparse (see `spg.checkpoint.encode_state_dict`): a matrix of sparsity s
    takes (1 − s) + 1/32 of its dense fp32 size ((1 − s) + 1/16 of its fp16 size with half).
    """
    write_checkpoint(path, family="wav2vec2", config=model.config.to_dict(), state=model.state_dict(),
                     compression=model.compression, extras={"vocab": list(model.vocab)}, half=half)


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


def from_spg_checkpoint(checkpoint: dict, source: str, *, strict: bool, vocab: Optional[list[str]]) -> Wav2Vec2CTC:
    """The model in a `save` file already read with torch.load (spg.load uses this)."""
    config_values, state, compression = read_checkpoint(checkpoint, source, family="wav2vec2")
    try:
        config = ModelConfig.from_dict(config_values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid 'config': {error}") from None
    if vocab is None:
        vocab = checkpoint.get("vocab")
        if not (isinstance(vocab, list) and all(isinstance(token, str) for token in vocab)):
            raise CheckpointError(f"{source}: 'vocab' is missing or not a list of strings")
    model = _build_model(config, vocab, source)
    install_state_dict(model, state, source, strict=strict, optional_keys=TRAINING_ONLY_KEYS)
    model.compression = compression
    return model


def parameter_count(config: ModelConfig) -> int:
    """The number of parameters `Wav2Vec2CTC(config)` has (its `num_parameters()`), counted
    from the config alone, without allocating anything. `config` must be valid (`validate`)."""
    def linear(inputs: int, outputs: int, bias: bool = True) -> int:
        return inputs * outputs + (outputs if bias else 0)

    d, channels = config.hidden_size, (1, *config.conv_dim)
    count = 0
    for i, (inputs, outputs, kernel) in enumerate(zip(channels, channels[1:], config.conv_kernel)):
        count += linear(inputs * kernel, outputs, config.conv_bias)           # the conv
        if config.feat_extract_norm == "layer" or i == 0:
            count += 2 * outputs                                              # LayerNorm or GroupNorm
    count += (2 * channels[-1] if config.feat_proj_layer_norm else 0) + linear(channels[-1], d)
    count += d if config.mask_time_prob > 0 else 0                            # masked_spec_embed
    kernel, groups = config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
    count += kernel + d * (d // groups) * kernel + d                          # pos_conv: g, v, bias
    count += 2 * d                                                            # encoder.layer_norm
    for block in range(config.num_hidden_layers):
        qk, v = sum(config.block_qk_head_dims(block)), sum(config.block_v_head_dims(block))
        ffn = config.block_intermediate_size(block)
        count += 2 * linear(d, qk) + linear(d, v) + linear(v, d)              # q, k, v, out
        count += linear(d, ffn) + linear(ffn, d) + 2 * 2 * d                  # FFN, two LayerNorms
    return count + linear(d, config.vocab_size)                               # lm_head


def check_model_size(config: ModelConfig, source: str) -> None:
    """Raise CheckpointError when `config` asks for more layers or parameters than
    `spg.checkpoint.check_layer_budget` and `check_parameter_budget` allow (before building)."""
    check_layer_budget(config.num_hidden_layers, source, "num_hidden_layers")
    check_layer_budget(len(config.conv_dim), source, "conv_dim")
    check_parameter_budget(parameter_count(config), source)


def _build_model(config: ModelConfig, vocab: Optional[list[str]], source: str) -> Wav2Vec2CTC:
    check_model_size(config, source)
    try:
        return Wav2Vec2CTC(config, vocab)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None


# ========================================================================================
# 2. Hugging Face folders
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
    if architectures is not None and not (isinstance(architectures, list)
                                          and _HF_ARCHITECTURE[model_type] in architectures):
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


def load_hf_folder(folder: str, *, strict: bool, vocab: Optional[list[str]]) -> Wav2Vec2CTC:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder}: a Hugging Face model folder needs config.json, which is missing")
    hf = read_json(config_path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    do_normalize = True                                   # HF Wav2Vec2FeatureExtractor's default
    preprocessor_path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(preprocessor_path):
        preprocessor = read_json(preprocessor_path)
        if not isinstance(preprocessor, dict):
            raise CheckpointError(f"{preprocessor_path}: expected a JSON object")
        do_normalize = bool(preprocessor.get("do_normalize", True))
    config = model_config_from_hf(hf, config_path, do_normalize)
    check_model_size(config, config_path)
    if vocab is None:
        vocab = _read_hf_vocab(os.path.join(folder, "vocab.json"), config.vocab_size)
    if vocab is None and config.vocab_size != len(DEFAULT_VOCAB):
        raise CheckpointError(f"{folder}: no vocab.json, and vocab_size={config.vocab_size} in config.json is not "
                              f"the default {len(DEFAULT_VOCAB)}-token vocabulary; pass load(..., vocab=[...])")
    model = _build_model(config, vocab, folder)

    weights_path, hf_state = read_hf_weights(folder)
    prefix = _HF_PREFIX[config.model_type]
    state = {our_key(key, prefix): tensor for key, tensor in hf_state.items()}
    install_state_dict(model, state, weights_path, strict=strict, optional_keys=TRAINING_ONLY_KEYS)
    return model


def _read_hf_vocab(path: str, vocab_size: int) -> Optional[list[str]]:
    """vocab.json ({token: id}) as a list ordered by id; None (the default vocabulary) if absent."""
    if not os.path.isfile(path):
        return None
    token_to_id = read_json(path)
    if not isinstance(token_to_id, dict) or not all(type(i) is int for i in token_to_id.values()):
        raise CheckpointError(f"{path}: expected a flat JSON object {{token: id}} "
                              "(per-language vocabularies are not supported)")
    vocab = sorted(token_to_id, key=token_to_id.__getitem__)
    if sorted(token_to_id.values()) != list(range(len(vocab))) or len(vocab) != vocab_size:
        raise CheckpointError(f"{path}: expected ids 0..{vocab_size - 1} (vocab_size={vocab_size} in "
                              f"config.json), got {len(vocab)} tokens with ids "
                              f"{min(token_to_id.values(), default=None)}..{max(token_to_id.values(), default=None)}")
    return vocab


# ========================================================================================
# 3. fairseq fine-tuned checkpoints (Wav2VecCtc / HubertCtc)
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
    tuple literals, `+` of two lists and `*` of a list by a small int are allowed, and no list
    may grow past MAX_LAYERS items (a chain of `* 100` would otherwise describe 10^20)."""
    if not isinstance(text, str) or len(text) > 2000:
        raise ValueError(f"expected a short string, got {short_repr(text)}")

    def bounded(items: list) -> list:
        if len(items) > MAX_LAYERS:
            raise ValueError(f"the list grows past {MAX_LAYERS} layers")
        return items

    def evaluate(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [evaluate(element) for element in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(left, list) and isinstance(right, list):
                return bounded(left + right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(left, int):
                left, right = right, left
            if isinstance(left, list) and isinstance(right, int) and 0 <= right <= 100:
                return bounded(left * right if len(left) * right <= MAX_LAYERS else left * (MAX_LAYERS + 1))
        raise ValueError(f"unsupported expression {ast.unparse(node)!r}")

    try:
        layers = evaluate(ast.parse(text, mode="eval").body)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not (isinstance(layers, list) and layers and all(
            isinstance(layer, tuple) and len(layer) == 3 and all(n > 0 for n in layer) for layer in layers)):
        raise ValueError(f"expected a non-empty list of (dim, kernel, stride) tuples, got {short_repr(layers)}")
    return layers


def _fairseq_configs(checkpoint: dict, source: str) -> tuple[dict, dict, dict]:
    """(fine-tuning model config, pretraining model config, task config) as plain dicts, from
    either a Hydra `cfg` (newer fairseq) or an argparse `args` Namespace (older fairseq)."""
    if checkpoint.get("cfg") is not None:
        cfg = to_plain(checkpoint["cfg"], source=f"{source}: 'cfg'")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: 'cfg' is not a dict")
        finetune, task = cfg.get("model") or {}, cfg.get("task") or {}
        for name, value in [("cfg.model", finetune), ("cfg.task", task)]:
            if not isinstance(value, dict):
                raise CheckpointError(f"{source}: {name} is a {type(value).__name__}, not a dict")
    else:
        args = to_plain(checkpoint.get("args"), source=f"{source}: 'args'")
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
    task_state = to_plain(checkpoint.get("task_state"), source=f"{source}: 'task_state'")
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


def from_fairseq_checkpoint(checkpoint: dict, source: str, *, strict: bool, vocab: Optional[list[str]]) -> Wav2Vec2CTC:
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
    install_state_dict(model, state, source, strict=strict, unknown_source_keys=unknown,
                       optional_keys=TRAINING_ONLY_KEYS)
    return model
