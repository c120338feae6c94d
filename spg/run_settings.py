"""One run's settings: every `train.py` option, resolved once into a typed, frozen object.

`train.py` parses its options into an `argparse.Namespace` and checks them; `resolve_settings`
turns that into a `RunSettings` for the model family the run trains, filling in the options
the command line leaves at None (the loss balance per family and method, SPG's η form,
controller and threshold learning rate) and naming the corpus folder. Every function of
`spg.experiment` after that reads this one object; it is frozen, so none of them can change
a setting another one has read. `resume_settings` is the part of it that decides the trained
weights, stored in a resume state and compared on `--resume`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from spg.compress import self_pinching
from spg.corpus import built_in_root

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "tiny-dense.pt"

# The options train.py leaves at None, resolved per family and method. wav2vec2/HuBERT and
# Whisper's encoder + CTC head under dense, spg, ump, gmp and mixed: the SPG authors' settings
# (CTC summed over the batch, weight decay 0, no gradient clipping), so that SPG and its
# baselines are trained alike. l0 and the recovery epochs of cluster keep a mean-reduced CTC
# with weight decay 0.01 and clipping at 5 (their Lagrangian and learning rates were tuned with
# it); so does Whisper with its decoder (a mean cross-entropy).
AUTHORS_SETTINGS = {"ctc_reduction": "sum", "weight_decay": 0.0, "grad_clip": 0.0}
MEAN_LOSS_SETTINGS = {"ctc_reduction": "mean", "weight_decay": 0.01, "grad_clip": 5.0}
AUTHORS_METHODS = ("dense", "spg", "ump", "gmp", "mixed")


@dataclass(frozen=True)
class RunSettings:
    """Every train.py option (field name = the option without `--`, dashes as underscores;
    `train.py --help` says what each does and its default), after `resolve_settings`."""
    # what to start from and what to train on
    model: Optional[str]                # --model; None: DEFAULT_MODEL (or --init)
    init: Optional[str]                 # --init: tiny, whisper-tiny.en or whisper-base
    data: Optional[str]                 # --data; None: the built-in corpus
    corpus: Path                        # the corpus folder: --data, or where the built-in corpus is built
    train_split: str
    dev_split: str
    test_split: str                     # comma-separated
    # the method and the training loop
    method: str                         # dense, spg, ump, gmp, mixed, cluster, l0 or structured
    sparsity: float
    steps: int
    batch_size: int
    lr: float
    warmup: float
    weight_decay: float                 # resolved: AUTHORS_SETTINGS or MEAN_LOSS_SETTINGS unless given
    grad_clip: float                    # resolved likewise
    ctc_reduction: str                  # resolved likewise: "sum" or "mean"
    train_feature_extractor: bool
    dropout: Optional[float]
    seed: int
    # outputs and the run's mechanics (may change on --resume, except --out)
    out: Optional[str]
    half: bool
    json: Optional[str]
    resume: bool
    stop_after: Optional[int]
    save_every: int
    eval_every: int
    max_seconds: float
    feature_cache: Optional[str]
    dense_eval: Optional[str]
    device: str
    # SPG (resolved for --method spg: see resolve_settings)
    eta_raw: Optional[float]
    eta: Optional[float]
    tau_start: float
    tau_end: float
    threshold_init: float
    threshold_lr: Optional[float]
    controller: Optional[str]           # "band" or "on-off"
    band: Optional[float]
    reset: Optional[bool]
    no_calibrate: bool
    # mixed
    mixed_from: Optional[str]
    # cluster
    merge: str
    mixed: bool
    mixed_per_kind: bool
    min_similarity: Optional[float]
    fold_bias: bool                     # also structured's
    epochs: int
    eval_utterances: int                # Whisper's scored utterances per split
    # structured
    structure_from: Optional[str]
    # l0
    ste: bool
    gate_lr: Optional[dict]
    init_drop: Optional[dict]
    target_ramp: Optional[float]
    min_heads: int
    dims_only: bool
    distill: bool


def resolve_settings(options: argparse.Namespace, *, ctc: bool) -> RunSettings:
    """`options` (train.py's, checked) with the options left at None filled in, as a
    `RunSettings`; `ctc`: whether the run's model trains with CTC (wav2vec2/HuBERT, Whisper's
    encoder + CTC head) rather than Whisper's decoder loss.

    The loss balance: `AUTHORS_SETTINGS` for `AUTHORS_METHODS` with CTC, else
    `MEAN_LOSS_SETTINGS`. SPG with CTC: the authors' balance (raw η by target,
    `self_pinching.default_raw_eta`), their two-sided band controller without optimiser resets
    and a threshold learning rate that fits --steps; on Whisper's decoder loss the normalised η',
    the on/off controller with resets and the weights' lr for the thresholds (what its README
    figures were measured with). Exits naming --band when it is not below --sparsity."""
    values = dict(vars(options))
    fields = {field.name for field in dataclasses.fields(RunSettings)} - {"corpus"}
    if set(values) != fields:
        raise TypeError(f"options and RunSettings disagree: not settings {sorted(set(values) - fields)}, "
                        f"missing {sorted(fields - set(values))}")
    balance = AUTHORS_SETTINGS if ctc and values["method"] in AUTHORS_METHODS else MEAN_LOSS_SETTINGS
    for name, value in balance.items():
        if values[name] is None:
            values[name] = value
    if values["method"] == "spg":
        values.update(spg_settings(values, ctc=ctc))
    values["corpus"] = Path(values["data"]) if values["data"] else built_in_root()
    return RunSettings(**values)


def spg_settings(values: dict, *, ctc: bool) -> dict:
    """SPG's options that `values` (the options by name) leaves at None, resolved (see
    `resolve_settings`)."""
    sparsity, resolved = values["sparsity"], {}
    if values["eta"] is None and values["eta_raw"] is None and ctc:
        resolved["eta_raw"] = self_pinching.default_raw_eta(sparsity)
    controller = values["controller"] or ("band" if ctc else "on-off")
    resolved["controller"] = controller
    band = values["band"]
    if controller == "band" and band is None:
        # the authors' width; for targets at or below it (not in their scripts) half the target
        band = resolved["band"] = min(self_pinching.authors_band(sparsity), sparsity / 2)
    if controller == "band" and not 0 <= band < sparsity:
        raise SystemExit(f"--band must be below --sparsity {sparsity:g}, got {band:g}")
    if values["reset"] is None:
        resolved["reset"] = controller == "on-off"
    if values["threshold_lr"] is None and ctc:
        resolved["threshold_lr"] = self_pinching.default_threshold_lr(values["lr"], values["steps"])
    return resolved


def _where(value) -> Optional[str]:
    """A path setting as an absolute path (a name such as whisper-tiny.en stays as it is)."""
    if value is None:
        return None
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


def resume_settings(settings: RunSettings) -> dict:
    """The settings that decide the trained weights, by flag: stored in the resume state and
    compared on --resume (see the --resume help for the ones that may change)."""
    stored = {"--model": _where(settings.model) if settings.model or settings.init else str(DEFAULT_MODEL),
              "--init": settings.init, "--data": _where(settings.corpus), "--train-split": settings.train_split,
              "--method": settings.method, "--sparsity": settings.sparsity, "--steps": settings.steps,
              "--batch-size": settings.batch_size, "--lr": settings.lr, "--warmup": settings.warmup,
              "--weight-decay": settings.weight_decay, "--train-feature-extractor": settings.train_feature_extractor,
              "--dropout": settings.dropout, "--seed": settings.seed, "--grad-clip": settings.grad_clip,
              "--ctc-reduction": settings.ctc_reduction}
    if settings.method == "spg":
        stored.update({"--eta": settings.eta, "--eta-raw": settings.eta_raw, "--tau-start": settings.tau_start,
                       "--tau-end": settings.tau_end, "--threshold-init": settings.threshold_init,
                       "--threshold-lr": settings.threshold_lr, "--controller": settings.controller,
                       "--reset": settings.reset, "--no-calibrate": settings.no_calibrate, "--band": settings.band})
    elif settings.method == "mixed":
        stored["--mixed-from"] = _where(settings.mixed_from)
    elif settings.method == "cluster":
        stored.update({"--merge": settings.merge, "--mixed": settings.mixed, "--epochs": settings.epochs,
                       "--mixed-per-kind": settings.mixed_per_kind, "--min-similarity": settings.min_similarity,
                       "--fold-bias": settings.fold_bias})
        del stored["--steps"]                      # derived from --epochs
    elif settings.method == "l0":
        stored.update({"--ste": settings.ste, "--distill": settings.distill, "--gate-lr": settings.gate_lr,
                       "--init-drop": settings.init_drop, "--min-heads": settings.min_heads,
                       "--dims-only": settings.dims_only, "--target-ramp": settings.target_ramp})
    elif settings.method == "structured":
        stored.update({"--structure-from": _where(settings.structure_from), "--fold-bias": settings.fold_bias})
    return stored
