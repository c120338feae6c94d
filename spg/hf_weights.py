"""Hugging Face weight files, as transformers writes them: `model.safetensors` or
`pytorch_model.bin`, either possibly sharded (`<name>.index.json` maps each tensor to a shard
in the same folder). `read_hf_weights` reads the first one found, in transformers' order of
preference; the safetensors reader is `spg.safetensors`'s, the .bin file goes through
torch's weights_only loader after `spg.unpickler.check_torch_file`.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from spg.checkpoint import CheckpointError, first_line, format_keys, read_json
from spg.safetensors import read_safetensors
from spg.unpickler import check_torch_file

__all__ = ["read_hf_weights"]


def read_hf_weights(folder: str) -> tuple[str, dict[str, torch.Tensor]]:
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
    index = read_json(index_path)
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
                              f"{format_keys(listed_but_absent)}")
    return tensors


def _read_torch_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin`: a pickled {name: tensor}, read with weights_only=True."""
    check_torch_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def _read_safetensors_file(path: str) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]
