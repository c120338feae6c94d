"""Reading a resume state back and refusing one written with other settings.

`spg.training.train` saves its state every `save_every` steps (weights, optimiser, method,
RNGs, the loop's position and its settings: tensors and plain data only). A resume reads it
with `torch.load(weights_only=True)` (`load_resume_state`: nothing in the file can run, and
anything that is not such a state is a `CheckpointError` naming the file) and continues only
when everything that decides the weights is what the state was written with
(`check_resume_settings`: a `ResumeMismatchError` naming each setting that differs, stored
against given). The loop's settings arrive as a plain dict, so this module needs nothing from
the loop.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import torch

from spg.checkpoint import CheckpointError, format_keys, non_finite_entries


class ResumeMismatchError(ValueError):
    """`resume=True` with settings other than the ones the resume state was written with."""


RESUME_STATE_KEYS = ("model", "optimizer", "method", "step", "epoch", "position", "skipped", "history",
                     "torch_rng", "python_rng", "train_config")
# spg.training.TrainConfig fields that may differ on resume: they change when and where things
# are written or scored, never the weights. Every other field, the method and the caller's
# `settings` must be the ones the state was written with.
RESUMABLE_FIELDS = ("save_every", "eval_every", "feature_cache_dir")
# train.py's flag for a TrainConfig field, for the messages
_FIELD_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "warmup_fraction": "--warmup",
                "weight_decay": "--weight-decay", "seed": "--seed",
                "freeze_feature_extractor": "freeze_feature_extractor (--train-feature-extractor)"}


def _first_reason(text: str) -> str:
    """The informative line of torch's long weights_only message."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(text).__name__])[0].replace("WeightsUnpickler error: ", "")


def load_resume_state(path: str | Path, map_location="cpu") -> dict:
    """Read a resume state written by `train` with torch.load(weights_only=True): tensors and
    plain data only, so nothing in the file can run. Raises FileNotFoundError when there is
    none and CheckpointError (naming the file) for anything that is not such a state."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume given but there is no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"refused to load {path}: not a resume state written by train.py; nothing from it "
                              f"was executed ({_first_reason(str(error))})") from None
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise CheckpointError(f"cannot read the resume state {path} (truncated or not written by train.py): "
                              f"{_first_reason(str(error)) if str(error) else type(error).__name__}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a resume state written by train.py (a {type(state).__name__}, "
                              "not a dict)")
    missing = [key for key in RESUME_STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a resume state written by train.py: missing {', '.join(missing)}")
    for key, kind in (("model", dict), ("optimizer", dict), ("method", dict), ("train_config", dict),
                      ("history", list), ("torch_rng", torch.Tensor)):
        if not isinstance(state[key], kind):
            raise CheckpointError(f"{path}: '{key}' is a {type(state[key]).__name__}, expected a {kind.__name__}")
    for key in ("step", "epoch", "position", "skipped"):
        if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
            raise CheckpointError(f"{path}: '{key}' is {state[key]!r}, expected a non-negative integer")
    try:    # random.getstate(): (version, 625 ints, gauss_next); rebuilt so that lists work too
        version, internal, gauss = state["python_rng"]
        state["python_rng"] = (int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: 'python_rng' is not a random.getstate() value ({error})") from None
    broken = non_finite_entries(state["model"])
    if broken:
        raise CheckpointError(f"{path}: non-finite model weights (NaN or inf) in {format_keys(broken)}")
    return state


# AdamW's settings of a parameter group that decide the weights. A resume compares the stored
# groups' with this run's fresh optimiser's: these, and "lr", which the schedule sets before
# every step from "base_lr" (stored: its value at the last step done).
OPTIMIZER_SETTINGS = ("base_lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def _comparable(value):
    """`value` with tensors as numbers and tuples as lists, so that == compares contents."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_comparable(item) for item in value]
    return value


def optimizer_differences(stored: dict, optimizer: torch.optim.Optimizer, lr_factor: float) -> list[str]:
    """'optimiser group I KEY: stored X, given Y' for every `OPTIMIZER_SETTINGS` value and
    scheduled lr of a resume state's optimiser (`stored`) that differs from `optimizer`'s, the
    one this run builds (a key the state lacks keeps torch's default). `lr_factor`: the
    schedule's factor at the last step the state did (1 before the first), which scaled each
    group's "base_lr" into the stored "lr"."""
    groups = stored.get("param_groups") if isinstance(stored, dict) else None
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        return ["optimiser: no list of parameter groups stored"]
    if len(groups) != len(optimizer.param_groups):
        return [f"optimiser: stored {len(groups)} parameter groups, given {len(optimizer.param_groups)}"]
    differences = []
    for index, (old, new) in enumerate(zip(groups, optimizer.param_groups)):
        expected = {key: new[key] for key in OPTIMIZER_SETTINGS if key in new}
        expected["lr"] = new["base_lr"] * lr_factor
        for key, value in expected.items():
            if key in old and _comparable(old[key]) != _comparable(value):
                differences.append(f"optimiser group {index} ({len(new['params'])} tensors) {key}: "
                                   f"stored {old[key]!r}, given {value!r}")
    return differences


def _differences(stored: dict, given: dict, keys, *, label=str) -> list[str]:
    """'LABEL: stored X, given Y' for each of `keys` whose value differs ("(none)": not there)."""
    missing = object()
    shown = lambda value: "(none)" if value is missing else repr(value)  # noqa: E731
    return [f"{label(key)}: stored {shown(stored.get(key, missing))}, given {shown(given.get(key, missing))}"
            for key in keys if stored.get(key, missing) != given.get(key, missing)]


def resume_differences(state: dict, config: Optional[dict] = None, *, method_name: Optional[str] = None,
                       settings: Optional[dict] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                       lr_factor: float = 1.0) -> list[str]:
    """'setting: stored X, given Y' for every setting of this run that differs from the ones
    the resume state was written with: the training loop's `config` (its fields as a dict;
    `RESUMABLE_FIELDS` may differ), the method's name, the caller's `settings`, and with
    `optimizer` (this run's, freshly built) its hyperparameters (`optimizer_differences`)."""
    differences = []
    if config is not None:
        stored_config = state["train_config"]
        keys = [key for key in dict.fromkeys([*config, *stored_config]) if key not in RESUMABLE_FIELDS]
        differences += _differences(stored_config, config, keys, label=lambda key: _FIELD_FLAGS.get(key, key))
    stored_method = state.get("method_name")
    if method_name is not None and stored_method is not None and stored_method != method_name:
        differences.append(f"method: stored {stored_method!r}, given {method_name!r}")
    if settings is not None:
        stored_settings = state.get("settings")
        if not isinstance(stored_settings, dict):
            differences.append("settings: none stored (a state written by an older train.py or by spg.training.train "
                               "without settings), so this run's cannot be checked")
        else:
            differences += _differences(stored_settings, settings, dict.fromkeys([*stored_settings, *settings]))
    if optimizer is not None:
        differences += optimizer_differences(state["optimizer"], optimizer, lr_factor)
    return differences


def check_resume_settings(state: dict, path: str | Path, config: Optional[dict] = None, *,
                          method_name: Optional[str] = None, settings: Optional[dict] = None,
                          optimizer: Optional[torch.optim.Optimizer] = None, lr_factor: float = 1.0) -> None:
    """Raise ResumeMismatchError naming every setting that differs from the stored ones
    (`resume_differences`; with `config=None` only `settings` and the method are compared)."""
    differences = resume_differences(state, config, method_name=method_name, settings=settings, optimizer=optimizer,
                                     lr_factor=lr_factor)
    if differences:
        raise ResumeMismatchError(
            f"{path} was written with other settings than this run's; resume with the same ones or start a new "
            f"run (only --stop-after, --save-every, --eval-every, --json, --device, --feature-cache, --dense-eval, "
            f"--half, --dev-split, --test-split, --eval-utterances and --max-seconds may change): "
            + "; ".join(differences))
