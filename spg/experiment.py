"""Run one experiment and print its summary: what `train.py` does after parsing its options.

Build the model from the parsed options (`build_model`), resolve the options once into the
run's frozen settings for the model's family (`spg.run_settings.resolve_settings`; every
function after that reads this `RunSettings`), build the compression method (`build_method`),
read the splits the model can take (`read_split`, `check_model_durations`), decode them with the
starting model (for wav2vec2/HuBERT through a reusable cache, `evaluate_dense`), then either
train (`run_training`: dense, SPG, UMP, GMP, mixed or L0) or cluster (`run_cluster`), save, score
every split against the starting model (WER/CER and MAPSSWE) into a summary dict, and print it
(`print_summary`, `print_cluster_summary`: they read only the summary, which --json writes).

What differs between model families is written once, in a `Family` recipe per family (the
`FAMILIES` table at the end, looked up by the model's class in `family_of`): which splits an
experiment scores and which options it refuses (its `run`), how a model is scored, the audio
lengths it takes, the input its forward time is measured on, and its run-file names. A third
family adds one recipe there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

import spg
from spg.checkpoint import payload_bytes
from spg.command_line import UsageError, check_output_paths
from spg.files import atomic_write
from spg.compress import self_pinching
from spg.compress.clustering import (cluster_compress, module_shapes, plan_kept_units, structured_magnitude_prune,
                                    structured_magnitude_to_shapes)
from spg.compress.interface import AttentionUnits, Method
from spg.compress.magnitude import GMP, Mixed, UMP, global_magnitude_masks
from spg.ctc_training import CTCObjective, evaluate_corpus, file_digest, tensors_digest
from spg.loading import whisper_ctc_from_pretrained
from spg.data import DEFAULT_VOCAB, check_durations, read_audio, read_corpus
from spg.resume import check_resume_settings, load_resume_state
from spg.run_settings import DEFAULT_MODEL, REPO, RunSettings, resolve_settings, resume_settings
from spg.training import Objective, TrainConfig, distributed_rank, naming_write_errors, sparsity_report, train
from spg.wav2vec2.model import PRUNABLE_MATRICES, Wav2Vec2CTC, preset
from spg.wer import mapsswe
from spg.whisper.evaluation import evaluate_whisper, read_transcription_folder
from spg.whisper.ctc import WhisperCTC
from spg.whisper.model import Whisper

# Real recorded speech shipped in recordings/ (Sphinx-style folders; see each folder's README).
REAL_RECORDINGS = tuple(REPO / "recordings" / name for name in ("librivox", "cards", "beckett"))
# Whisper pads every input to 30 s (about 1-3 s per utterance on a CPU core): by default it is
# scored on the real recordings and the first 50 utterances of each --test-split.
WHISPER_EVAL_UTTERANCES = 50


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring as written, and every option's default after
    its help text unless the text already names it ("default: off" for a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.default is False:
            return f"{text} (default: off)"
        return text if action.default is None else f"{text} (default: %(default)s)"


@dataclass(frozen=True)
class Family:
    """What an experiment needs to know about one model family."""
    name: str
    run: Callable[..., int]            # (settings, model, root, test_splits, rank, device, started) -> exit code
    score: Callable[..., dict]         # (model, utterances, device, desc) -> evaluate_corpus-style figures
    min_input_samples: Callable[..., int]   # (model) -> shortest input it takes
    max_seconds: float                 # longest input it takes (also bounded by --max-seconds)
    forward_inputs: Callable[..., tuple]    # (model) -> random input its forward time is measured on
    forward_input: str                 # that input in words
    ctc: bool                          # trained with CTC (else Whisper's decoder loss): see resolve_settings
    runs_prefix: str                   # runs/<prefix><method>-<sparsity>.pt
    set_dropout: Optional[Callable[..., object]] = None   # (model, p) -> model; None: --dropout is refused


def family_of(model) -> Family:
    """The recipe of `model`'s family (the first of its classes that `FAMILIES` lists)."""
    for cls in type(model).__mro__:
        if cls in FAMILIES:
            return FAMILIES[cls]
    raise TypeError(f"{type(model).__name__} is none of the model families spg runs experiments on "
                    f"({', '.join(family.name for family in FAMILIES.values())})")


def build_method(settings: RunSettings, model) -> Method:
    """The compression method of --method (`mixed` reads an SPG run's per-matrix sparsities;
    it refuses here, before any training, when that run is missing)."""
    if settings.method == "l0":
        from spg.compress.l0 import L0Method
        teacher = None
        if settings.distill:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        from spg.compress.hardconcrete import InitDropRates
        from spg.compress.l0 import GATE_LR, TARGET_WARMUP_FRACTION
        ramp = TARGET_WARMUP_FRACTION if settings.target_ramp is None else settings.target_ramp
        return L0Method(settings.sparsity, ste=settings.ste, distill_teacher=teacher, seed=settings.seed,
                        gate_lr=settings.gate_lr if settings.gate_lr else GATE_LR,
                        init=InitDropRates(**(settings.init_drop or {})), head_gates=not settings.dims_only,
                        min_heads=settings.min_heads, target_warmup_fraction=ramp)
    if settings.method == "spg":
        return self_pinching.SPG(settings.sparsity, eta=settings.eta if settings.eta_raw is None else settings.eta_raw,
                                 normalised_eta=settings.eta_raw is None, tau_start=settings.tau_start,
                                 tau_end=settings.tau_end, threshold_init=settings.threshold_init,
                                 threshold_lr=settings.threshold_lr,
                                 band=settings.band if settings.controller == "band" else None,
                                 reset_on_switch=settings.reset, calibrate=not settings.no_calibrate)
    if settings.method == "ump":
        return UMP(settings.sparsity)
    if settings.method == "gmp":
        return GMP(settings.sparsity)
    if settings.method == "mixed":
        prefix = family_of(model).runs_prefix
        source = source_run(settings, prefix)
        if not source.exists():
            model_option = f"--model {settings.model} " if prefix else ""   # the default model's family needs none
            sys.exit(f"--method mixed reads the per-matrix sparsities of an SPG run, but {source} does not "
                     f"exist: run `python train.py {model_option}--sparsity {settings.sparsity:g}` first "
                     "or pass --mixed-from")
        per_matrix = spg.load(source).compression.get("per_matrix_sparsity")
        if not per_matrix:
            sys.exit(f"{source} has no compression['per_matrix_sparsity'] (not written by an SPG run)")
        print(f"mixed: per-matrix sparsities from {source}")
        return Mixed(per_matrix)
    if settings.method == "structured":
        structure_source(settings, model)
    return Method()


def source_run(settings: RunSettings, prefix: str) -> Optional[Path]:
    """The run that --method mixed (--mixed-from, default runs/<prefix>spg-<sparsity>.pt) or
    structured (--structure-from, default runs/<prefix>l0-<sparsity>.pt) reads; None for the
    other methods."""
    if settings.method == "mixed":
        given, default = settings.mixed_from, f"{prefix}spg-{settings.sparsity:g}.pt"
    elif settings.method == "structured":
        given, default = settings.structure_from, f"{prefix}l0-{settings.sparsity:g}.pt"
    else:
        return None
    return Path(given) if given else REPO / "runs" / default


def structure_source(settings: RunSettings, model) -> Path:
    """The model whose structure --method structured prunes to (exits when it is missing)."""
    source = source_run(settings, family_of(model).runs_prefix)
    if not source.exists():
        sys.exit(f"--method structured prunes to the structure of another model, but {source} does not exist: run "
                 f"`python train.py --method l0 --sparsity {settings.sparsity:g}` first or pass --structure-from")
    return source


def structured_start(settings: RunSettings, model):
    """--method structured: (the starting model pruned by magnitude to --structure-from's
    structure, the unpruned model); any other method: (model, a copy for l0 or None)."""
    if settings.method != "structured":
        return model, copy.deepcopy(model) if settings.method == "l0" else None
    source = structure_source(settings, model)
    pruned, record = structured_magnitude_to_shapes(model, module_shapes(spg.load(source)),
                                                    fold_bias=settings.fold_bias)
    print(f"structured: pruned by magnitude to the structure of {source} ({100 * record['sparsity']:.2f}% of the "
          "prunable weights removed)")
    return pruned, model


def build_model(options: argparse.Namespace):
    """--init's random preset, or the --model checkpoint (default: the shipped dense model).
    It reads train.py's options as parsed: the family of the model it builds decides how the
    rest of them resolve (`resolve_settings`)."""
    if options.init and options.init.startswith("whisper"):
        model = whisper_ctc_from_pretrained(options.init, seed=options.seed)
        return model if options.dropout is None else _with_ctc_dropout(model, options.dropout)
    if options.init:
        torch.manual_seed(options.seed)
        config = preset(options.init)
        if options.dropout is not None:
            _set_dropout(config, options.dropout)
        return Wav2Vec2CTC(config)
    path = Path(options.model) if options.model else DEFAULT_MODEL
    model = spg.load(path)
    set_dropout = family_of(model).set_dropout
    if options.dropout is not None and set_dropout is not None:    # else the family's run refuses it
        model = set_dropout(model, options.dropout)
    return model


def _set_dropout(config, probability: float) -> None:
    for name in ("hidden_dropout", "attention_dropout", "activation_dropout", "final_dropout", "layerdrop"):
        setattr(config, name, probability)


def _with_dropout(model: Wav2Vec2CTC, probability: float) -> Wav2Vec2CTC:
    """A copy of `model` built with every dropout probability set to `probability`."""
    _set_dropout(model.config, probability)
    fresh = Wav2Vec2CTC(model.config, model.vocab)
    fresh.load_state_dict(model.state_dict())
    fresh.compression = model.compression
    return fresh


def _with_ctc_dropout(model: WhisperCTC, probability: float) -> WhisperCTC:
    """A copy of the Whisper-CTC `model` with every dropout probability (residual, attention,
    activation, before the head) set to `probability`."""
    config = copy.deepcopy(model.config)
    for name in ("dropout", "attention_dropout", "activation_dropout", "final_dropout"):
        setattr(config, name, probability)
    fresh = WhisperCTC(config, model.vocab)
    fresh.load_state_dict(model.state_dict())
    fresh.compression = model.compression
    return fresh


def corpus_root(settings: RunSettings) -> Path:
    """The corpus folder, the built-in corpus synthesised there first (once) when --data is not given."""
    if settings.data is None:
        from spg.corpus import build_corpus
        build_corpus(settings.corpus)
    return settings.corpus


def setup_distributed(options: argparse.Namespace) -> tuple[int, torch.device]:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT); a plain `python train.py` stays single-process."""
    device = torch.device(options.device)
    # torchrun sets TORCHELASTIC_RUN_ID: under it even one process joins a group, so that
    # `torchrun --nproc_per_node 1` runs the same backend and code path as N processes.
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    if options.method == "cluster":
        sys.exit("--method cluster is data-free and single-process; run it without torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A long rank-0 evaluation keeps the other ranks waiting at their first all-reduce.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    if dist.get_rank() == 0:
        print(f"distributed: backend {dist.get_backend()}, {dist.get_world_size()} process(es)", flush=True)
    return dist.get_rank(), device



def run_from_command_line(options: argparse.Namespace, started: float) -> int:
    """train.py's run of its parsed `options` (under torchrun: in the process group), for
    `spg.command_line.exit_code_of`."""
    rank, device = setup_distributed(options)
    try:
        return run(options, rank, device, started)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def output_path(settings: RunSettings, family: Family) -> Path:
    if settings.out:
        return Path(settings.out)
    return REPO / "runs" / f"{family.runs_prefix}{settings.method}-{settings.sparsity:g}.pt"


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def prepare_output(settings: RunSettings, out: Path, rank: int) -> None:
    """Before any long work: remove what interrupted saves of this run's files left behind
    (rank 0, which holds the lock on `out`: another run's live temporary files are never
    removed; the --dense-eval cache's are removed when it is written, under its own lock), and
    with --resume check the state and its settings (every rank: all must stop)."""
    if rank == 0:
        remove_stale_temporaries([out, state_path(out)] + ([Path(settings.json)] if settings.json else []))
    if settings.resume and (settings.method != "cluster" or settings.epochs):
        state = load_resume_state(state_path(out))
        check_resume_settings(state, state_path(out), settings=resume_settings(settings))


def remove_stale_temporaries(paths: list[Path]) -> tuple[int, int]:
    """Delete `.NAME.XXXXXXXX.tmp` beside each of `paths`: the temporary files that
    `spg.files.atomic_write` leaves when a save of NAME is killed. Only that exact pattern
    (mkstemp's random part has no dot) for these names; returns (files, bytes)."""
    count = size = 0
    for path in paths:
        if not path.parent.is_dir():
            continue
        pattern = re.compile(r"\." + re.escape(path.name) + r"\.[A-Za-z0-9_]+\.tmp")
        for candidate in path.parent.iterdir():
            if pattern.fullmatch(candidate.name) and candidate.is_file() and not candidate.is_symlink():
                try:
                    bytes_ = candidate.stat().st_size
                    candidate.unlink()
                except FileNotFoundError:
                    continue
                count, size = count + 1, size + bytes_
    if count:
        print(f"removed {count} stale temporary file{'s' if count > 1 else ''} of interrupted saves beside "
              f"{paths[0]} ({f'{size / 1e6:.1f} MB' if size >= 100_000 else f'{size:,} bytes'} freed)")
    return count, size


def write_json(path, data) -> None:
    """The summary, atomically (a reader never sees half of it); a full disk names `path`."""
    with naming_write_errors(path):
        atomic_write(os.fspath(path), lambda file: file.write(json.dumps(data, indent=2).encode()))



def run(options: argparse.Namespace, rank: int, device: torch.device, started: float) -> int:
    """Build the model, resolve the options into the run's settings for its family (once:
    `resolve_settings`), check the paths (`check_run_paths`), lock the output for the whole run
    (rank 0: `exclusive_lock` on <out>.lock), then build the corpus and run the experiment of
    the model's family (`run_family`); Ctrl-C is named (`naming_interruption`)."""
    model = build_model(options)         # first: a bad --model fails before the corpus is built
    settings = resolve_settings(options, ctc=family_of(model).ctc)
    out = output_path(settings, family_of(model))
    check_run_paths(settings, model, out)    # every rank: all must stop
    lock = exclusive_lock(lock_path(out), wait=False, purpose=f"--out {out}") if rank == 0 else \
        contextlib.nullcontext()         # only rank 0 writes
    with lock, naming_interruption(settings, out, started):
        return run_family(settings, model, rank, device, started)


def run_family(settings: RunSettings, model, rank: int, device: torch.device, started: float) -> int:
    """Build the corpus, then run the experiment of the model's family."""
    if rank != 0 and settings.data is None:
        dist.barrier()                   # rank 0 synthesises the built-in corpus first
    root = corpus_root(settings)
    if rank == 0 and settings.data is None and dist.is_initialized():
        dist.barrier()
    test_splits = [s for s in settings.test_split.split(",") if s]
    if settings.data is None and "test-unseen" not in test_splits:
        test_splits.append("test-unseen")
    return family_of(model).run(settings, model, root, test_splits, rank, device, started)


@contextlib.contextmanager
def naming_interruption(settings: RunSettings, out: Path, started: float):
    """Re-raise Ctrl-C as KeyboardInterrupt("interrupted; resume with --resume (...)") when this
    run saved (or resumed) a state, else KeyboardInterrupt("interrupted"): the line that
    `spg.command_line.exit_code_of` prints."""
    try:
        yield
    except KeyboardInterrupt:
        state = state_path(out)
        resumable = state.exists() and (settings.resume or state.stat().st_mtime >= started)
        raise KeyboardInterrupt(f"interrupted; resume with --resume (the last saved state is {state})"
                                if resumable else "interrupted") from None


def check_run_paths(settings: RunSettings, model, out: Path) -> None:
    """Before any work, a UsageError (exit 2) naming the options when an output would destroy
    an input or another output, is a folder or cannot be created (`check_output_paths`, over
    the model read, the run --method mixed or structured reads, --out, its .state and .lock,
    --json, --dense-eval and --feature-cache), or when --dense-eval names a file that is not a
    dense-decoding cache (`read_dense_cache`)."""
    inputs = {"--model": settings.model or (None if settings.init else DEFAULT_MODEL)}
    source = source_run(settings, family_of(model).runs_prefix)
    if source is not None:
        inputs["--mixed-from" if settings.method == "mixed" else "--structure-from"] = source
    outputs = {"--out": out, "--out's resume state": state_path(out), "--out's lock file": lock_path(out),
               "--json": settings.json, "--dense-eval": settings.dense_eval}
    check_output_paths(inputs, outputs, {"--feature-cache": settings.feature_cache})
    if settings.dense_eval:
        read_dense_cache(settings.dense_eval)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def exclusive_lock(path: Path, *, wait: bool, purpose: str = ""):
    """Hold an exclusive `fcntl.flock` on the file `path` (created, and removed on release) for
    the `with` block. With wait=False a lock that another process holds is a UsageError naming
    `path` and `purpose`; with wait=True it waits. A lock file that its holder removed while we
    waited is not ours: we lock the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            raise UsageError(f"{path} is held by another run{' writing ' + purpose if purpose else ''}; wait for "
                             "it to finish or give another --out") from None
        try:
            ours = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            ours = False
        if ours:
            break
        os.close(descriptor)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(descriptor)


def run_ctc(settings: RunSettings, model: Wav2Vec2CTC, root: Path, test_splits: list, rank: int, device: torch.device,
            started: float) -> int:
    """wav2vec2/HuBERT: train (or cluster) on the train split; score dev and every test split,
    the starting model's decoding through the --dense-eval cache."""
    out = output_path(settings, family_of(model))
    if rank == 0:
        print(f"output checkpoint: {out}")
    prepare_output(settings, out, rank)
    train_set = read_split(settings, root, settings.train_split, model)
    dev_set = read_split(settings, root, settings.dev_split, model)
    test_sets = {name: read_split(settings, root, name, model) for name in test_splits}

    method = build_method(settings, model)   # before training: `mixed` and `structured` may refuse early
    # the size of the model we start from (cluster reports it even for a random --init model)
    dense_size = None if settings.init and settings.method != "cluster" or rank != 0 else file_sizes(model, out)
    if rank == 0:
        announce_setup(settings, model, train_set, {"dev": dev_set, **test_sets}, device)
    before = {} if settings.init or rank != 0 else \
        evaluate_dense(model, {"dev": dev_set, **test_sets}, device, settings.dense_eval)
    model, dense_copy = structured_start(settings, model)

    if settings.method == "cluster":
        return run_cluster(settings, model, before, dense_size, train_set, {"dev": dev_set, **test_sets}, out, device,
                           started)

    return run_training(settings, model, method, before, dense_size, train_set, dev_set, {"dev": dev_set, **test_sets},
                        out, device, started, dense_copy=dense_copy)


def run_training(settings: RunSettings, model, method: Method, before: dict, dense_size: Optional[dict], train_set,
                 dev_set, evaluation_sets: dict, out: Path, device: torch.device, started: float, *,
                 objective: Optional[Objective] = None, dense_copy=None) -> int:
    """Train with `method` (dense, SPG, UMP, GMP, mixed, L0) on `objective` (default CTC), save,
    evaluate every split of `evaluation_sets` against `before` (the starting model's
    decoding) and print the summary. `dev_set` is what `--eval-every` scores."""
    rank = distributed_rank()[0]

    feature_cache = feature_cache_folder(settings, objective)
    config = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                         warmup_fraction=settings.warmup, weight_decay=settings.weight_decay,
                         freeze_feature_extractor=not settings.train_feature_extractor,
                         save_every=settings.save_every, eval_every=settings.eval_every, seed=settings.seed,
                         feature_cache_dir=feature_cache, grad_clip=settings.grad_clip,
                         loss_reduction=settings.ctc_reduction)
    # what global magnitude pruning of the starting model would keep per matrix: SPG's learned
    # allocation is compared with it in the summary
    reference = global_magnitude_allocation(model, settings.sparsity) if isinstance(method, self_pinching.SPG) else None
    result = train(model, train_set, config, method=method, device=device,
                   checkpoint_path=state_path(out), resume=settings.resume, settings=resume_settings(settings),
                   dev_utterances=dev_set, stop_after_steps=settings.stop_after,
                   objective=objective or CTCObjective())
    if rank != 0:
        return 0
    if result.steps_done < settings.steps:
        print(f"stopped after step {result.steps_done} of {settings.steps}; continue with --resume")
        return 0

    model.cpu()
    if settings.method == "l0":             # deliver the physically smaller model
        model = method.pruned_model.cpu()
    save_model(model, out, half=settings.half)
    after = {name: evaluate(model, data, torch.device("cpu"), f"{settings.method} {name}")
             for name, data in evaluation_sets.items()}
    significance = {
        name: mapsswe(after[name]["references"], after[name]["hypotheses"], before[name]["hypotheses"], alpha=0.05)
        for name in after if name in before}
    report = sparsity_report(model)
    summary = {
        "method": settings.method, "target_sparsity": settings.sparsity, "steps": result.steps_done,
        "skipped_steps": result.skipped_steps, "out": str(out),
        "dense_wer": {k: v["wer"] for k, v in before.items()},
        "compressed_wer": {k: v["wer"] for k, v in after.items()},
        "mapsswe": {k: {"p_value": r.p_value, "z": r.z, "significant": r.significant, "verdict": verdict(r)}
                    for k, r in significance.items()},
        "sparsity": report["sparsity"],
        "sparsity_before_calibration": model.compression.get("sparsity_before_calibration"),
        "per_block_sparsity": report["per_block_sparsity"],
        "per_matrix_sparsity": report["per_matrix_sparsity"],
        "prunable_params": report["prunable_params"],
        "params_total": model.num_parameters(), "params_nonzero": model.num_parameters(nonzero_only=True),
        "size_bytes": out.stat().st_size,
        "dense_size_bytes": dense_size and dense_size["fp16" if settings.half else "fp32"],
        "sizes": size_figures(dense_size, model, out, half=settings.half),
        "before": {k: {m: v[m] for m in ("wer", "cer")} for k, v in before.items()},
        "after": {k: {m: v[m] for m in ("wer", "cer")} for k, v in after.items()},
        "compression": {k: v for k, v in model.compression.items() if k != "per_matrix_sparsity"},
        "train_seconds": result.seconds, "loop_seconds": result.loop_seconds, "seconds": time.time() - started,
    }
    if settings.method in ("l0", "structured"):
        forward = forward_seconds({"dense": dense_copy, "compressed": model})
        summary["kept"] = kept_units(model)
        # the pruned model's prunable layers are what is left; the sparsity is of the dense ones
        dense_prunable = sparsity_report(dense_copy)["prunable_params"]
        # both count the prunable weights; L0's own target counts the gated layers' biases too
        summary.update(prunable_params=dense_prunable, prunable_params_kept=report["prunable_params"],
                       sparsity=1.0 - report["prunable_params"] / dense_prunable,
                       gate_sparsity=model.compression["sparsity"] if settings.method == "l0" else None,
                       params_dense=dense_copy.num_parameters(),
                       forward_seconds_dense=forward["dense"], forward_seconds_compressed=forward["compressed"],
                       forward_time_ratio=forward["compressed"] / forward["dense"],
                       forward_input=family_of(model).forward_input)
    summary["history"] = result.history
    # the decodings, so that runs can be compared with each other (MAPSSWE) without re-decoding
    summary["decoding"] = decodings(after)
    if isinstance(method, self_pinching.SPG):
        summary["spg_history"] = method.history
        summary["allocation"] = allocation_summary(model.compression, reference, settings.steps)
    print_summary(summary)
    if settings.json:
        write_json(settings.json, summary)
    print_files_left(settings, out, None if settings.train_feature_extractor else feature_cache)
    return 0


def decodings(results: dict) -> dict:
    """{split: {"references", "hypotheses"}} of `evaluate_corpus` results per split: what a run
    JSON keeps so that runs can be compared with each other (MAPSSWE) without decoding again."""
    return {name: {"references": list(figures["references"]), "hypotheses": list(figures["hypotheses"])}
            for name, figures in results.items()}


def global_magnitude_allocation(model, sparsity: float) -> dict[str, float]:
    """{matrix: sparsity} that ONE magnitude threshold over all of `model`'s prunable weights
    gives at global `sparsity` (what `--method gmp` prunes)."""
    masks = global_magnitude_masks({name: linear.weight for name, linear in model.prunable_linears()}, sparsity)
    return {name: 1.0 - keep.float().mean().item() for name, keep in masks.items()}


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's correlation coefficient of two equally long lists (nan when one is constant)."""
    return torch.corrcoef(torch.tensor([xs, ys], dtype=torch.float64))[0, 1].item()


def allocation_summary(compression: dict, reference: dict[str, float], steps: int) -> dict:
    """Whether SPG learned its own allocation: the correlation of its per-matrix sparsities
    with global magnitude pruning's (`reference`; near 1 = SPG pruned like one global
    threshold), the spread of the thresholds (relative s.d., max/min) and when the target
    (band) was first reached."""
    names = list(reference)
    learned = compression["per_matrix_sparsity"]
    thresholds = [abs(compression["thresholds"][name]) for name in names]
    mean = sum(thresholds) / len(thresholds)
    sd = math.sqrt(sum((t - mean) ** 2 for t in thresholds) / len(thresholds))
    return {"correlation_with_global_magnitude": pearson([learned[n] for n in names], [reference[n] for n in names]),
            "global_magnitude_per_matrix_sparsity": reference,
            "threshold_relative_sd": sd / mean if mean > 0 else math.nan,
            "threshold_max_over_min": max(thresholds) / min(thresholds) if min(thresholds) > 0 else math.inf,
            "first_reached_step": compression["first_reached_step"], "steps": steps}


def kept_units(model) -> dict[str, list[int]]:
    """Per report group and layer, the heads (and, where head widths are pruned, the summed
    q/k and value dims) or FFN neurons the model has: {"heads", "qk_dims", "v_dims",
    "ffn_units"} for wav2vec2, {"encoder_heads", ..., "decoder_ffn_units"} for Whisper."""
    kept: dict[str, list[int]] = {}
    for units in model.structured_units():
        if isinstance(units, AttentionUnits):
            kept.setdefault(units.group, []).append(units.num_heads)
            if units.head_dims_prunable:
                prefix = units.group[:-len("heads")]
                kept.setdefault(prefix + "qk_dims", []).append(sum(units.qk_head_dims))
                kept.setdefault(prefix + "v_dims", []).append(sum(units.v_head_dims))
        else:
            kept.setdefault(units.group, []).append(units.num_units)
    return kept


def run_cluster(settings: RunSettings, dense, before: dict, dense_size: dict, train_set, evaluation_sets: dict,
                out: Path, device: torch.device, started: float) -> int:
    """Parameter clustering (arXiv 2606.11836): no data and no training, then optional recovery
    fine-tuning; compared with structured magnitude pruning at the same per-module sizes."""
    mixed = "per_kind" if settings.mixed and settings.mixed_per_kind else settings.mixed
    clustered, record = cluster_compress(dense, settings.sparsity, merge=settings.merge, mixed=mixed,
                                         seed=settings.seed, min_similarity=settings.min_similarity,
                                         fold_bias=settings.fold_bias)
    magnitude, _ = structured_magnitude_prune(dense, settings.sparsity, ks=record["kept"], fold_bias=settings.fold_bias)
    results = {label: {name: evaluate(model, data, device, f"{label} {name}")
                       for name, data in evaluation_sets.items()}
               for label, model in (("clustered", clustered), ("magnitude", magnitude))}
    if settings.epochs:
        steps = settings.epochs * -(-len(train_set) // settings.batch_size)
        config = TrainConfig(steps=steps, batch_size=settings.batch_size, lr=settings.lr,
                             warmup_fraction=settings.warmup, weight_decay=settings.weight_decay,
                             save_every=settings.save_every, seed=settings.seed,
                             grad_clip=settings.grad_clip, loss_reduction=settings.ctc_reduction)
        history = train(clustered, train_set, config, objective=CTCObjective(), device=device,
                        checkpoint_path=state_path(out), resume=settings.resume,
                        settings=resume_settings(settings)).history
        clustered.cpu()
        results["fine-tuned"] = {name: evaluate_corpus(clustered, data, device=device, desc=f"fine-tuned {name}")
                                 for name, data in evaluation_sets.items()}
    save_model(clustered, out, half=settings.half)
    forward = forward_seconds({"dense": dense, "compressed": clustered})
    final = results["fine-tuned" if settings.epochs else "clustered"]
    summary = {
        "method": "cluster", "target_sparsity": settings.sparsity, "merge": settings.merge, "mixed": settings.mixed,
        "epochs": settings.epochs, "steps": steps if settings.epochs else 0, "out": str(out), "kept": record["kept"],
        "dense_wer": {k: v["wer"] for k, v in before.items()},
        "compressed_wer": {k: v["wer"] for k, v in final.items()},
        "clustered_wer": {k: v["wer"] for k, v in results["clustered"].items()},
        "magnitude_wer": {k: v["wer"] for k, v in results["magnitude"].items()},
        "finetuned_wer": {k: v["wer"] for k, v in results["fine-tuned"].items()} if settings.epochs else None,
        "mapsswe": {k: {"p_value": r.p_value, "significant": r.significant, "verdict": verdict(r)}
                    for k, r in ((name, mapsswe(final[name]["references"], final[name]["hypotheses"],
                                                before[name]["hypotheses"])) for name in final if name in before)},
        "params_dense": dense.num_parameters(), "params_total": clustered.num_parameters(),
        "size_bytes": out.stat().st_size, "dense_size_bytes": dense_size["fp16" if settings.half else "fp32"],
        "sizes": size_figures(dense_size, clustered, out, half=settings.half),
        "forward_seconds_dense": forward["dense"], "forward_seconds_compressed": forward["compressed"],
        "forward_time_ratio": forward["compressed"] / forward["dense"],
        "forward_input": family_of(dense).forward_input,
        "seconds": time.time() - started,
        "settings": {"mixed_per_kind": settings.mixed_per_kind, "min_similarity": settings.min_similarity,
                     "fold_bias": settings.fold_bias, "seed": settings.seed},
        # the decodings, so that the variants can be compared with each other (MAPSSWE)
        "decoding": {label: decodings(split_results) for label, split_results in results.items()},
    }
    if settings.epochs:
        summary["history"] = history
    if mixed:      # how variance-based mixed K split the budget between the module kinds
        uniform = plan_kept_units(dense, settings.sparsity)
        summary["mixed_k"] = {"ranked": "within each kind" if mixed == "per_kind" else "over all modules",
                              "per_kind": {name: {"kept": sum(values), "of": sum(record["units_before"][name]),
                                                  "uniform": sum(uniform[name])}
                                           for name, values in record["kept"].items()}}
    print_cluster_summary(summary)
    if settings.json:
        write_json(settings.json, summary)
    print_files_left(settings, out, None)
    return 0


def print_cluster_summary(summary: dict) -> None:
    """`run_cluster`'s summary as a person reads it: WER per split of the dense, clustered,
    magnitude (and fine-tuned) models, MAPSSWE, the units kept, sizes and forward time."""
    print("\n=== summary ===")
    print(f"parameter clustering ({summary['merge']}{', mixed K' if summary['mixed'] else ''}) at sparsity "
          f"{summary['target_sparsity']:g}; checkpoint {summary['out']}")
    columns = {"dense": summary["dense_wer"], "clustered": summary["clustered_wer"],
               "magnitude": summary["magnitude_wer"]}
    if summary["finetuned_wer"] is not None:
        columns["fine-tuned"] = summary["finetuned_wer"]
    print(f"{'split':<14}" + "".join(f"{c + ' WER':>16}" for c in columns))
    for name in summary["clustered_wer"]:
        row = [wer.get(name) for wer in columns.values()]
        print(f"{name:<14}" + "".join(f"{100 * v:>15.2f}%" if v is not None else f"{'-':>16}" for v in row))
    for name, test in summary["mapsswe"].items():
        print(f"MAPSSWE {name}: {test['verdict']}")
    print("kept per block: " + "; ".join(f"{name} {values}" for name, values in summary["kept"].items()))
    if "mixed_k" in summary:
        print("mixed K per kind: " + "; ".join(f"{name} {kind['kept']} of {kind['of']} (uniform K: {kind['uniform']})"
                                               for name, kind in summary["mixed_k"]["per_kind"].items())
              + f" (variances ranked {summary['mixed_k']['ranked']})")
    print(f"parameters {summary['params_dense']:,} -> {summary['params_total']:,}")
    print_sizes(summary["sizes"])
    print(f"forward time ({summary['forward_input']}) {1000 * summary['forward_seconds_dense']:.0f} ms -> "
          f"{1000 * summary['forward_seconds_compressed']:.0f} ms (ratio {summary['forward_time_ratio']:.2f}); "
          f"total time {summary['seconds']:.0f} s")


def feature_cache_folder(settings: RunSettings, objective: Optional[Objective] = None) -> Optional[str]:
    """Where training keeps the frozen front end's features between runs: --feature-cache, else
    runs/feature-cache for the built-in corpus (CTC training), else nowhere (memory only)."""
    if settings.feature_cache:
        return settings.feature_cache
    return str(REPO / "runs" / "feature-cache") if settings.data is None and objective is None else None


def trains(settings: RunSettings) -> bool:
    """Whether this run trains (every method but cluster, which trains only with --epochs)."""
    return settings.method != "cluster" or bool(settings.epochs)


def seconds_per_audio_second(model, device: torch.device) -> tuple[float, float]:
    """(full forward, front end alone) seconds per second of audio on `device`, measured on 10 s
    of random audio (the faster of two timed runs after a warm-up)."""
    wave = family_of(model).forward_inputs(model)[0].to(device)
    audio_seconds = wave.shape[-1] / 16000
    was_training = model.training
    model.eval()
    timings = []
    with torch.inference_mode():
        for run in (lambda: model(wave), lambda: model.extract_features(wave)):
            run()
            laps = []
            for _ in range(2):
                begin = time.perf_counter()
                run()
                laps.append(time.perf_counter() - begin)
            timings.append(min(laps) / audio_seconds)
    model.train(was_training)
    return timings[0], timings[1]


def read_seconds_per_audio_second(utterances, *, sample: int = 8) -> float:
    """Seconds to read one second of audio from disk, measured on the first `sample` utterances."""
    probe = list(utterances[:sample])
    begin = time.perf_counter()
    for utterance in probe:
        read_audio(utterance)
    return (time.perf_counter() - begin) / max(1e-9, sum(u.seconds for u in probe))


def setup_work(settings: RunSettings, train_set, evaluation_sets: dict, feature_cache: Optional[str]) -> dict:
    """What a wav2vec2/HuBERT run does before its first step: {"decode": the splits it decodes
    with the starting model (none for --init or a --dense-eval file that exists: then it is
    reused when it matches), "features": whether it computes the frozen front end's features
    of the train split (not when it trains the front end, does not train, the corpus is too
    large to cache, or the cache folder already holds features), "kept": where those features
    are kept for later runs (None: in memory only)}."""
    decode = {} if settings.init or settings.dense_eval and Path(settings.dense_eval).exists() else evaluation_sets
    small = sum(u.seconds for u in train_set) / 3600 <= TrainConfig.max_cached_hours
    cached = feature_cache is not None and Path(feature_cache).is_dir() and \
        any(Path(feature_cache).glob("features-*.pt"))
    features = trains(settings) and not settings.train_feature_extractor and small and not cached
    return {"decode": decode, "features": features, "kept": feature_cache}


def announce_setup(settings: RunSettings, model, train_set, evaluation_sets: dict,
                   device: torch.device) -> Optional[str]:
    """Print (and return) one line before the long work that precedes the first step on a
    fresh clone: decoding the splits with the starting model and caching the front end's
    features, with an estimate of the time measured on this machine; which of it is a one-off
    and where it is kept. Nothing when there is no such work."""
    # run_cluster's recovery fine-tuning keeps its features in memory only
    folder = feature_cache_folder(settings) if settings.method != "cluster" else None
    work = setup_work(settings, train_set, evaluation_sets, folder)
    decode, features = work["decode"], work["features"]
    if not decode and not features:
        return None
    minutes = lambda data: sum(u.seconds for u in data) / 60  # noqa: E731
    decode_seconds = 60 * sum(minutes(data) for data in decode.values())
    amount = lambda m: f"{m:.1f} min" if m < 10 else f"{m:.0f} min"  # noqa: E731
    parts = []
    if decode:
        splits = list(decode)
        parts.append(f"decoding the starting model on {', '.join(splits[:-1]) + ' and ' if len(splits) > 1 else ''}"
                     f"{splits[-1]} ({sum(len(d) for d in decode.values()):,} utterances, "
                     f"{amount(decode_seconds / 60)} of audio)")
    if features:
        parts.append(f"computing the frozen front end's features of {len(train_set):,} training utterances "
                     f"({amount(minutes(train_set))} of audio)")
    line = "before the first step: " + " and ".join(parts)
    if device.type == "cpu":
        full, front_end = seconds_per_audio_second(model, device)
        reading = read_seconds_per_audio_second(train_set or next(iter(decode.values())))
        estimate = (full + reading) * decode_seconds + \
            ((front_end + reading) * minutes(train_set) * 60 if features else 0.0)
        line += ", under a minute on this machine" if estimate < 60 else \
            f", about {round(estimate / 60)} min on this machine"
    kept = []
    if features and work["kept"]:
        kept.append(f"the features are a one-off, cached in {work['kept']} for later runs on this corpus")
    elif features:
        kept.append("the features are kept in memory for this run only (--feature-cache FOLDER keeps them)")
    if decode and settings.dense_eval:
        kept.append(f"the decoding is a one-off, kept in {settings.dense_eval}")
    elif decode:
        kept.append("the decoding is repeated by every run (--dense-eval FILE keeps it)")
    line += "; " + "; ".join(kept)
    print(line, flush=True)
    return line


def display_path(path) -> str:
    """`path` relative to the working directory when it lies below it, else as given (a
    name such as whisper-tiny.en stays as it is)."""
    if not Path(path).exists():
        return str(path)
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def files_left(settings: RunSettings, out: Path, feature_cache: Optional[str]) -> list[tuple[Path, int, str]]:
    """(path, bytes, what it is and how to remove it) of every file or folder this run left:
    the output model, its resume state, the feature cache, the --dense-eval cache, --json."""
    def size(path: Path) -> int:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size

    shown = display_path
    command = f"python {shown(REPO / 'evaluate.py')} --model {shown(out)}" + \
        ("" if settings.init else f" --compare {shown(settings.model) if settings.model else shown(DEFAULT_MODEL)}")
    candidates = [
        (out, f"the output model; score it with {command}"),
        (state_path(out), f"resume state, needed only for --resume: rm {shown(state_path(out))}"),
        (Path(feature_cache) if feature_cache else None,
         f"front-end features, kept for later runs on this corpus: rm -r {shown(Path(feature_cache or '.'))}"),
        (Path(settings.dense_eval) if settings.dense_eval else None,
         "the starting model's decoding (--dense-eval), kept for later runs: "
         f"rm {shown(Path(settings.dense_eval or '.'))}"),
        (Path(settings.json) if settings.json else None, "the summary figures (--json)"),
    ]
    return [(path, size(path), what) for path, what in candidates if path is not None and path.exists()]


def print_files_left(settings: RunSettings, out: Path, feature_cache: Optional[str]) -> None:
    """The files this run left (`files_left`), one line each with its size and how to remove it."""
    left = files_left(settings, out, feature_cache)
    if not left:
        return
    print("files left by this run:")
    names = [display_path(path) + ("/" if path.is_dir() else "") for path, _, _ in left]
    width = max(len(name) for name in names)
    for name, (_, bytes_, what) in zip(names, left):
        amount = f"{bytes_ / 1e6:.1f} MB" if bytes_ >= 100_000 else f"{bytes_ / 1e3:.1f} kB"
        print(f"  {name:<{width}} {amount:>9}  {what}")


def evaluate_dense(model: Wav2Vec2CTC, evaluation_sets: dict, device: torch.device,
                   cache: Optional[str]) -> dict:
    """Decode every split with the starting model, or reuse a stored decoding of exactly this
    model (a digest of its weights, its config and vocabulary) on exactly these utterances
    (their ids, transcripts and audio contents: `dense_cache_key`). A `cache` file that is not
    such a cache is refused (`read_dense_cache`) and never overwritten."""
    def decode() -> dict:
        return {name: evaluate_corpus(model, data, device=device, desc=f"dense {name}")
                for name, data in evaluation_sets.items()}

    if not cache:
        return decode()
    key = dense_cache_key(model, evaluation_sets)
    stored = read_dense_cache(cache)
    if stored is not None:
        if stored["key"] == key:
            print(f"dense decoding reused from {cache}")
            return stored["results"]
        print(f"{cache} holds another model's or corpus's decoding; decoding again")
    results = decode()
    with exclusive_lock(lock_path(Path(cache)), wait=True):     # runs of a sweep may share the cache
        remove_stale_temporaries([Path(cache)])
        with naming_write_errors(cache):
            atomic_write(os.fspath(cache),
                         lambda file: file.write(json.dumps({"key": key, "results": results}).encode()))
    return results


def dense_cache_key(model, evaluation_sets: dict) -> dict:
    """Everything a dense decoding depends on, as JSON reads it back: the weights (a digest),
    the config and vocabulary, and per split each utterance's id, transcript and audio content
    (SHA-256 of the file: edited transcripts or replaced audio give another key)."""
    key = {"weights": tensors_digest(model.state_dict()), "config": model.config.to_dict(),
           "vocab": getattr(model, "vocab", None),
           "utterances": {name: [[u.id, u.transcript, file_digest(u.audio_path)] for u in data]
                          for name, data in evaluation_sets.items()}}
    return json.loads(json.dumps(key))


def read_dense_cache(path) -> Optional[dict]:
    """The --dense-eval cache at `path` ({"key": ..., "results": {...}}), or None when there is
    no file yet. Anything else there (a folder, unreadable, not JSON, JSON of another shape) is a
    UsageError naming it: the option names a file that is not a cache, which must not be
    overwritten."""
    path = Path(path)
    if not path.exists():
        return None
    expected = 'expected a dense-decoding cache written by train.py ({"key": ..., "results": ...}) or a new file'
    try:
        stored = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        raise UsageError(f"--dense-eval {path}: not a JSON file ({reason}); {expected}") from None
    if not isinstance(stored, dict) or set(stored) != {"key", "results"} or not isinstance(stored["results"], dict):
        shape = f"a JSON {type(stored).__name__}" + (f" with keys {sorted(stored)}" if isinstance(stored, dict) else "")
        raise UsageError(f"--dense-eval {path}: {shape}; {expected}")
    return stored


def run_whisper(settings: RunSettings, model: Whisper, root: Path, test_splits: list, rank: int, device: torch.device,
                started: float) -> int:
    """Whisper: data-free clustering (run_cluster), or fine-tuning on the corpus's train split
    with a teacher-forced decoder loss (spg.whisper.training) under SPG, UMP, GMP, mixed, L0 (heads
    of every attention module and FFN neurons) or no pruning. Scored on the real recordings and
    the first --eval-utterances of each --test-split as given (`test_splits`, which adds the built-in
    corpus's test-unseen, and `rank` are not used)."""
    if settings.method == "cluster" and settings.epochs:
        sys.exit(f"{settings.model} is a Whisper model: train.py runs --method cluster (data-free, without --epochs), "
                 "dense, spg, ump, gmp, mixed or l0 on it; recovery epochs after clustering are written for "
                 "wav2vec2/HuBERT only")
    for option, value in (("--feature-cache", settings.feature_cache), ("--dense-eval", settings.dense_eval),
                          ("--dropout", settings.dropout), ("--distill", settings.distill or None),
                          ("--ctc-reduction", settings.ctc_reduction if settings.ctc_reduction != "mean" else None)):
        if value is not None:
            sys.exit(f"{option} applies to wav2vec2/HuBERT models only, not to the Whisper model {settings.model}")
    out = output_path(settings, family_of(model))
    print(f"output checkpoint: {out}")
    prepare_output(settings, out, 0)
    evaluation_sets = {folder.name: read_transcription_folder(folder) for folder in REAL_RECORDINGS}
    for folder in REAL_RECORDINGS:
        check_model_durations(evaluation_sets[folder.name], model, max_seconds=settings.max_seconds, where=str(folder))
    for split in [s for s in settings.test_split.split(",") if s]:
        evaluation_sets[split] = read_split(settings, root, split, model, limit=settings.eval_utterances)
    print("evaluation sets: " + ", ".join(f"{name} ({len(data)} utterances)" for name, data in evaluation_sets.items()))
    method = None if settings.method == "cluster" else build_method(settings, model)
    before = {name: evaluate(model, data, device, f"dense {name}") for name, data in evaluation_sets.items()}
    dense_size = file_sizes(model, out)
    if settings.method == "cluster":
        return run_cluster(settings, model, before, dense_size, [], evaluation_sets, out, device, started)
    model, dense_copy = structured_start(settings, model)
    from spg.whisper.training import WhisperObjective
    train_set = read_split(settings, root, settings.train_split, model)
    dev_set = read_split(settings, root, settings.dev_split, model, limit=settings.eval_utterances)
    return run_training(settings, model, method, before, dense_size, train_set, dev_set, evaluation_sets, out, device,
                        started, objective=WhisperObjective(), dense_copy=dense_copy)


def evaluate(model, data, device: torch.device, desc: str) -> dict:
    """Decode and score `data` the way `model`'s family is scored."""
    return family_of(model).score(model, data, device, desc)


def read_split(settings: RunSettings, root: Path, split: str, model, *, limit: Optional[int] = None) -> list:
    """One split of the corpus (its first `limit` utterances), for `model`: its vocabulary
    (a model without one, such as Whisper: spg.data.DEFAULT_VOCAB), and audio it can take
    (`check_durations`: DataError naming the files shorter than its receptive field or longer
    than --max-seconds)."""
    utterances = read_corpus(root, split, getattr(model, "vocab", DEFAULT_VOCAB))[:limit]
    check_model_durations(utterances, model, max_seconds=settings.max_seconds, where=str(Path(root) / split))
    return utterances


def check_model_durations(utterances, model, *, max_seconds: float, where: str) -> None:
    """DataError naming the files `model` cannot take: shorter than its family's shortest
    input, or longer than `max_seconds` (and than its family's longest input)."""
    family = family_of(model)
    check_durations(utterances, min_samples=family.min_input_samples(model),
                    max_seconds=min(max_seconds, family.max_seconds), where=where)


def save_model(model, path: Path, *, half: bool) -> None:
    with naming_write_errors(path):
        spg.save(model, path, half=half)


def forward_seconds(models: dict, *, rounds: int = 5) -> dict:
    """Median forward time of each model on the same random input (its family's
    `forward_inputs`), runs interleaved."""
    inputs = family_of(next(iter(models.values()))).forward_inputs(next(iter(models.values())))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()(*inputs)                        # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                begin = time.perf_counter()
                model(*inputs)
                times[name].append(time.perf_counter() - begin)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def verdict(result) -> str:
    """MAPSSWE outcome of compressed (A) against dense (B) in words."""
    if not result.significant:
        return f"no significant difference (p={result.p_value:.3g})"
    worse = "worse" if result.mean_difference > 0 else "better"
    return f"compressed significantly {worse} than dense (p={result.p_value:.3g})"


def file_sizes(model, near: Path) -> dict[str, int]:
    """{"fp32": bytes, "fp16": bytes} of `model` saved in our format either way."""
    return {"fp32": saved_size(model, near, half=False), "fp16": saved_size(model, near, half=True)}


def size_figures(dense_sizes: Optional[dict], model, out: Path, *, half: bool) -> dict:
    """The compressed model's file in both precisions (one is `out` itself), the fp16 limit
    (`checkpoint.payload_bytes`: fp16 non-zeros plus a 1-bit mask, no container) and the
    dense model's files; None where there is no dense model to compare with."""
    other = saved_size(model, out, half=not half)
    figures = {"compressed_fp32": other if half else out.stat().st_size,
               "compressed_fp16": out.stat().st_size if half else other,
               "fp16_limit": payload_bytes(model.state_dict(), half=True)}
    if dense_sizes:
        figures.update(dense_fp32=dense_sizes["fp32"], dense_fp16=dense_sizes["fp16"])
    return figures


def saved_size(model, near: Path, *, half: bool) -> int:
    """Bytes the model takes in our format (written to a temporary file next to `near`)."""
    near.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=near.parent) as folder:
        path = Path(folder) / "dense.pt"
        save_model(model, path, half=half)
        return path.stat().st_size


def print_summary(summary: dict) -> None:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    print("\n=== summary ===")
    print(f"method {summary['method']}, {summary['steps']} steps ({summary['skipped_steps']} skipped), "
          f"checkpoint {summary['out']}")
    print(f"{'split':<14}{'dense WER':>11}{'WER':>9}{'dense CER':>11}{'CER':>9}   MAPSSWE (alpha 0.05)")
    for split, figures in summary["after"].items():
        was = summary["before"].get(split, {})
        test = summary["mapsswe"].get(split)
        print(f"{split:<14}{pct(was.get('wer')):>11}{pct(figures['wer']):>9}{pct(was.get('cer')):>11}"
              f"{pct(figures['cer']):>9}   {test['verdict'] if test else '-'}")
    target = summary["target_sparsity"]
    line = f"global sparsity {pct(summary['sparsity'])} of {summary['prunable_params']:,} prunable weights"
    if "prunable_params_kept" in summary:
        line += f" removed ({summary['prunable_params_kept']:,} kept in the smaller model)"
    if summary.get("gate_sparsity") is not None:      # l0: the target is of weights and biases
        line += f"; {pct(summary['gate_sparsity'])} of the gated layers' weights and biases"
    if summary["sparsity_before_calibration"] is not None:
        line += f" (target {pct(target)}; {pct(summary['sparsity_before_calibration'])} before calibration"
        shift = summary.get("compression", {}).get("calibration_shift")
        line += f", which shifted every log_alpha by {shift:+.3f})" if shift is not None else ")"
    print(line)
    if "kept" in summary:                 # l0: a physically smaller model, not zeros
        for name, values in summary["kept"].items():
            print(f"  kept {name:<9} per block {values}")
        print(f"parameters {summary['params_dense']:,} -> {summary['params_total']:,}; forward time "
              f"({summary['forward_input']}) ratio {summary['forward_time_ratio']:.2f}")
    elif summary["sparsity"] > 0 and all(f"encoder.layers.{block}.{m}" in summary["per_matrix_sparsity"]
                                         for block in summary["per_block_sparsity"] for m in PRUNABLE_MATRICES):
        print_sparsity_table(summary["per_matrix_sparsity"], summary["per_block_sparsity"])
    elif summary["sparsity"] > 0:           # Whisper: per encoder/decoder layer
        print("sparsity per layer: " + ", ".join(f"{layer} {100 * value:.1f}%"
                                                 for layer, value in summary["per_block_sparsity"].items()))
    if "allocation" in summary:
        allocation = summary["allocation"]
        first = allocation["first_reached_step"]
        print(f"allocation: correlation of the per-matrix sparsities with global magnitude pruning "
              f"{allocation['correlation_with_global_magnitude']:.2f} (1 = one global threshold); thresholds spread "
              f"{100 * allocation['threshold_relative_sd']:.1f}% relative s.d., max/min "
              f"{allocation['threshold_max_over_min']:.2f}")
        print("target first reached at " + (f"step {first} of {allocation['steps']} "
                                            f"({100 * first / allocation['steps']:.0f}% of the run)"
                                            if first is not None else "no step (calibration did it)"))
    print(f"parameters {summary['params_total']:,} total, {summary['params_nonzero']:,} non-zero")
    print_sizes(summary["sizes"])
    print(f"time {summary['seconds']:.0f} s (training {summary['train_seconds']:.0f} s)")


def print_sizes(sizes: dict) -> None:
    """Compressed and dense file sizes, fp32 and fp16, against the fp16 limit."""
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    line = (f"size on disk: compressed {mb(sizes['compressed_fp32'])} fp32, {mb(sizes['compressed_fp16'])} fp16 "
            f"(--half; the limit for fp16 non-zeros plus a 1-bit mask is {mb(sizes['fp16_limit'])})")
    if "dense_fp32" in sizes:
        line += (f"; dense {mb(sizes['dense_fp32'])} fp32, {mb(sizes['dense_fp16'])} fp16; compressed fp16 / dense "
                 f"fp32 {sizes['compressed_fp16'] / sizes['dense_fp32']:.3f}")
    print(line)


def print_sparsity_table(per_matrix: dict, per_block: dict) -> None:
    """Blocks as rows, the six prunable matrices as columns, sparsity in percent."""
    short = {"attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
             "attention.out_proj": "out", "feed_forward.intermediate_dense": "fc1",
             "feed_forward.output_dense": "fc2"}
    print("sparsity %  " + "".join(f"{short[m]:>6}" for m in PRUNABLE_MATRICES) + f"{'block':>8}")
    for block, overall in per_block.items():
        cells = "".join(f"{100 * per_matrix[f'encoder.layers.{block}.{m}']:6.1f}" for m in PRUNABLE_MATRICES)
        print(f"block {block:<5}" + cells + f"{100 * overall:8.1f}")


# --- the model families ---------------------------------------------------------------------

FAMILIES: dict[type, Family] = {
    Wav2Vec2CTC: Family(
        name="wav2vec2/HuBERT", run=run_ctc,
        score=lambda model, data, device, desc: evaluate_corpus(model, data, device=device, desc=desc),
        min_input_samples=lambda model: model.config.min_input_samples, max_seconds=math.inf,
        forward_inputs=lambda model: (torch.randn(1, 16000 * 10),), forward_input="10 s of audio",
        ctc=True, runs_prefix="", set_dropout=_with_dropout),
    WhisperCTC: Family(          # no 30 s padding: the first T positions (spg.whisper.ctc)
        name="Whisper encoder + CTC", run=run_ctc,
        score=lambda model, data, device, desc: evaluate_corpus(model, data, device=device, desc=desc),
        min_input_samples=lambda model: model.config.min_input_samples, max_seconds=30.0,
        forward_inputs=lambda model: (torch.randn(1, 16000 * 10),), forward_input="10 s of audio",
        ctc=True, runs_prefix="whisper-ctc-", set_dropout=_with_ctc_dropout),
    Whisper: Family(             # pads or cuts every input to one 30 s window
        name="Whisper", run=run_whisper,
        score=lambda model, data, device, desc: evaluate_whisper(model, data, device=device),
        min_input_samples=lambda model: 1, max_seconds=30.0,
        forward_inputs=lambda model: (torch.randn(1, model.config.num_mel_bins, 3000),
                                      torch.tensor([model.config.prompt_ids()])),
        forward_input="one 30 s window", ctc=False, runs_prefix="whisper-"),
}
