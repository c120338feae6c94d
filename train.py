#!/usr/bin/env python
r"""Train or compress a wav2vec2/HuBERT CTC model.

    python train.py --sparsity 0.6                # SPG: prune the shipped model to 60 % while fine-tuning
    python train.py --sparsity 0.6 --method ump   # baseline: uniform magnitude pruning + fixed-mask fine-tuning
    python train.py --sparsity 0.6 --method gmp   # baseline: one global magnitude threshold + fixed-mask fine-tuning
    python train.py --sparsity 0.6 --method mixed # baseline: SPG's per-matrix sparsities, magnitude masks
    python train.py --sparsity 0.7 --method structured  # baseline for L0: magnitude pruning to runs/l0-0.7.pt's shape
    python train.py --sparsity 0                  # dense CTC fine-tuning of the shipped model
    python train.py --init tiny --train-feature-extractor --steps 40000 ...   # from scratch
    python train.py --model whisper-tiny.en --method cluster --sparsity 0.2  # Whisper: data-free clustering
    python train.py --model whisper-tiny.en --sparsity 0.3 --steps 120 --batch-size 4 --lr 3e-5 \
        --threshold-lr 5e-4                                                  # Whisper: SPG + fine-tuning

With no --model and no --data it uses the shipped dense tiny model and the built-in
synthetic corpus (synthesised on first use). Under `torchrun --nproc_per_node N train.py ...`
training runs data-parallel with PyTorch DDP (nccl on GPU, gloo on CPU); --batch-size is per
process, and rank 0 evaluates, saves and prints. See README.md for the real-checkpoint setting.
The summary compares the dense and the compressed model on every split (WER, and the
MAPSSWE significance test at alpha = 0.05), and reports the sparsity per block and matrix,
the parameter counts, the size on disk and the wall time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from spg.command_line import exit_code_of
from spg.compress import merging, self_pinching
from spg.compress.hardconcrete import InitDropRates
from spg.compress.l0 import GATE_LR, TARGET_WARMUP_FRACTION
from spg.experiment import (DEFAULT_MODEL, REAL_RECORDINGS, REPO, WHISPER_EVAL_UTTERANCES, HelpFormatter,
                            run_from_command_line)

METHODS = ("dense", "spg", "ump", "gmp", "mixed", "cluster", "l0", "structured")
# The default run must finish in 10 minutes on 2 CPU cores: ~0.6 s per cached-feature SPG step
# at batch 8, plus ~2.5 min for corpus synthesis, feature caching and the two evaluations.
DEFAULT_STEPS = 500


def number(kind: type, accept, expected: str):
    """An argparse `type=` that also refuses values outside the sensible range (NaN and inf
    included): argparse then reports "argument --flag: expected ..., got ..." with exit code 2."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if kind is float and not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    parse.__name__ = expected          # argparse names the type in some messages
    return parse


def per_gate_type(expected: str, accept):
    """An argparse `type=` for "heads=0.02,ffn=0.1": {gate type: value}, types as in
    spg.compress.l0.GATE_TYPES."""
    def parse(text: str) -> dict:
        from spg.compress.l0 import GATE_TYPES
        values = {}
        for item in text.split(","):
            kind, _, value = item.partition("=")
            if kind.strip() not in GATE_TYPES:
                raise argparse.ArgumentTypeError(f"expected TYPE=VALUE pairs with TYPE in {', '.join(GATE_TYPES)}, "
                                                 f"got {item!r}")
            try:
                number_ = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {expected} after {kind}=, got {value!r}") from None
            if not math.isfinite(number_) or not accept(number_):
                raise argparse.ArgumentTypeError(f"expected {expected} after {kind}=, got {value}")
            values[kind.strip()] = number_
        return values
    parse.__name__ = "TYPE=VALUE list"
    return parse


POSITIVE_INT = number(int, lambda v: v > 0, "a positive integer")
COUNT = number(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = number(float, lambda v: v > 0, "a number > 0")
NON_NEGATIVE = number(float, lambda v: v >= 0, "a number >= 0")
FRACTION = number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
FINITE = number(float, lambda v: True, "a finite number")


def build_parser() -> argparse.ArgumentParser:
    """train.py's options; --help shows each one's default (spg.experiment.HelpFormatter)."""
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None, help=f"checkpoint to start from (default: {DEFAULT_MODEL.relative_to(REPO)})")
    parser.add_argument("--init", choices=["tiny", "whisper-tiny.en", "whisper-base"], default=None,
                        help="start from a new model instead of a checkpoint: tiny = a randomly initialised "
                             "wav2vec2 preset; whisper-tiny.en / whisper-base = that pretrained Whisper encoder "
                             "with a new CTC head (drawn with --seed) over the character vocabulary (default: none, "
                             "start from --model)")
    parser.add_argument("--data", default=None, help="LibriSpeech-layout corpus root (default: built-in corpus)")
    parser.add_argument("--train-split", default="train", help="the split to train on")
    parser.add_argument("--dev-split", default="dev",
                        help="the split scored by --eval-every during training and with the test splits after it")
    parser.add_argument("--test-split", default="test", help="comma-separated; the built-in corpus adds test-unseen")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="default: spg when --sparsity > 0, dense when it is 0")
    parser.add_argument("--sparsity", type=FRACTION, default=0.0,
                        help="target global sparsity of the prunable matrices (0 = dense training)")
    parser.add_argument("--steps", type=POSITIVE_INT, default=DEFAULT_STEPS, help="optimiser steps")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=8,
                        help="utterances per step (per process under torchrun)")
    parser.add_argument("--lr", type=POSITIVE, default=2e-4,
                        help="peak learning rate of the weights (AdamW; linear warm-up, then linear decay to 0)")
    parser.add_argument("--warmup", type=FRACTION, default=0.1, help="warm-up fraction of the steps, in [0, 1)")
    parser.add_argument("--weight-decay", type=NON_NEGATIVE, default=None,
                        help="default 0 (the SPG authors' code) for dense, spg, ump, gmp and mixed on wav2vec2/HuBERT; "
                             "0.01 for l0, cluster --epochs and Whisper")
    parser.add_argument("--grad-clip", type=NON_NEGATIVE, default=None,
                        help="clip the gradient norm of the weights to this (0: no clipping); default 0 (the SPG "
                             "authors' code) where --weight-decay defaults to 0, else 5")
    parser.add_argument("--ctc-reduction", choices=["mean", "sum"], default=None,
                        help="CTC over a batch: the sum of the utterances' losses (the SPG authors' code; default "
                             "for dense, spg, ump, gmp and mixed) or the mean of length-normalised losses "
                             "(default for l0 and cluster --epochs)")
    parser.add_argument("--train-feature-extractor", action="store_true",
                        help="also train the conv front end (default: frozen and cached)")
    parser.add_argument("--dropout", type=FRACTION, default=None,
                        help="override every dropout probability (default: the model's own)")
    parser.add_argument("--out", default=None, help="output checkpoint (default: runs/<method>-<sparsity>.pt)")
    parser.add_argument("--half", action="store_true", help="store the output weights as float16")
    parser.add_argument("--json", default=None, help="write the summary figures to this JSON file (default: none)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>.state, with the same settings (only --stop-after, --save-every, "
                             "--eval-every, --json, --device, --feature-cache, --dense-eval, --half, --dev-split, "
                             "--test-split, --eval-utterances and --max-seconds may change)")
    parser.add_argument("--stop-after", type=POSITIVE_INT, default=None,
                        help="stop this call after N steps and resume later (default: run all --steps)")
    parser.add_argument("--save-every", type=COUNT, default=200,
                        help="write the resume state <out>.state every N steps and at the end (0: only at the end)")
    parser.add_argument("--eval-every", type=COUNT, default=0,
                        help="score --dev-split every N steps (0: no evaluation during training)")
    parser.add_argument("--max-seconds", type=POSITIVE, default=60.0,
                        help="refuse utterances longer than this (seconds; Whisper: at most 30); default %(default)g")
    parser.add_argument("--feature-cache", default=None,
                        help="folder for the frozen front end's features, reused by later runs on the same corpus "
                             "(default: runs/feature-cache for the built-in corpus, none otherwise)")
    parser.add_argument("--dense-eval", default=None,
                        help="JSON file holding the dense model's decoding of dev/test; reused when it matches "
                             "the model's weights, config and vocabulary and the utterances (ids, transcripts and "
                             "audio contents), written otherwise (for sweeps); a file that is not such a cache is "
                             "refused (default: none, decode in every run)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=COUNT, default=0,
                        help="random seed: batch order and dropout, L0 gates, k-means, --init's new weights")
    group = parser.add_argument_group("SPG (self-pinching gates)")
    group.add_argument("--eta-raw", type=NON_NEGATIVE, default=None,
                       help="penalty weight eta times the count of kept weights, the paper's form (default for "
                            f"wav2vec2/HuBERT: {self_pinching.default_raw_eta(0.6):g} below a 0.65 target, "
                            f"{self_pinching.default_raw_eta(0.7):g} from 0.65: the paper's 2e-5 / 3e-5 times "
                            f"{self_pinching.ETA_BUDGET_FACTOR:g} for a short budget)")
    group.add_argument("--eta", type=NON_NEGATIVE, default=None,
                       help=f"normalised form instead: eta' on the mean soft mask (default for Whisper: "
                            f"{self_pinching.ETA_NORMALISED:g} below a 0.65 target, "
                            f"{self_pinching.ETA_NORMALISED_HIGH:g} from 0.65, the paper's eta times its 84.9M "
                            "prunable weights)")
    group.add_argument("--tau-start", type=POSITIVE, default=self_pinching.TAU_START,
                       help="default %(default)g (paper)")
    group.add_argument("--tau-end", type=POSITIVE, default=self_pinching.TAU_END, help="default %(default)g (paper)")
    group.add_argument("--threshold-init", type=FINITE, default=self_pinching.THRESHOLD_INIT,
                       help="default %(default)g (paper)")
    group.add_argument("--threshold-lr", type=POSITIVE, default=None,
                       help=f"learning rate of the thresholds (default: {self_pinching.THRESHOLD_TRAVEL:g}/--steps, "
                            "and at least --lr, the paper's)")
    group.add_argument("--controller", choices=["band", "on-off"], default=None,
                       help="band (the authors' code; default for wav2vec2/HuBERT): prune below target - BAND, "
                            "un-prune above the target; on-off (the paper's text; default for Whisper): prune "
                            "while below the target")
    group.add_argument("--band", type=FRACTION, default=None,
                       help="width of the band controller (default as in the authors' scripts: 0.02 up to 50%%, "
                            "0.002 above)")
    group.add_argument("--reset", action=argparse.BooleanOptionalAction, default=None,
                       help="clear the thresholds' optimiser state when eta switches (ours; default: on with the "
                            "on-off controller, off with the band, as in the authors' code)")
    group.add_argument("--no-calibrate", action="store_true",
                       help="skip the final common threshold scale that makes the sparsity exactly the target")
    group = parser.add_argument_group("mixed (SPG's per-matrix sparsities + magnitude pruning)")
    group.add_argument("--mixed-from", default=None,
                       help="SPG checkpoint to read per-matrix sparsities from (default: runs/spg-<sparsity>.pt)")
    group = parser.add_argument_group("cluster (data-free parameter clustering of heads and FFN neurons)")
    group.add_argument("--merge", choices=list(merging.MERGE_RULES), default=merging.DEFAULT_MERGE,
                       help="how a cluster becomes one unit: mean (the paper's; default), sum_out or representative "
                            "(ours; see spg/compress/merging.py)")
    group.add_argument("--mixed", action="store_true", help="variance-based mixed K per module")
    group.add_argument("--mixed-per-kind", action="store_true",
                       help="with --mixed: rank attention modules and FFNs separately (ours; each kind keeps its "
                            "uniform budget)")
    group.add_argument("--min-similarity", type=FRACTION, default=None,
                       help="merge a cluster only when every member has at least this cosine similarity to its "
                            "centroid, else keep its representative (ours; default: none, merge every cluster)")
    group.add_argument("--fold-bias", action="store_true",
                       help="fold removed or merged heads' constant output W_out[:, h] b_v[h] into the out bias "
                            "(ours; exact, data-free; also for the structured magnitude baseline)")
    group.add_argument("--epochs", type=COUNT, default=0,
                       help="optional recovery fine-tuning epochs after clustering (the paper uses 3; 0: none)")
    group.add_argument("--eval-utterances", type=POSITIVE_INT, default=WHISPER_EVAL_UTTERANCES,
                       help="Whisper: score the first N utterances of each --test-split (default %(default)s), "
                            "plus the real recordings in "
                            + ", ".join(str(folder.relative_to(REPO)) for folder in REAL_RECORDINGS))
    group = parser.add_argument_group("structured (magnitude pruning to another model's structure, then fine-tuning)")
    group.add_argument("--structure-from", default=None,
                       help="model whose heads, head widths and FFN sizes to prune to, e.g. an L0 run (default: "
                            "runs/l0-<sparsity>.pt): the structured baseline of the same shape")
    group = parser.add_argument_group("l0 (hard-concrete head, head-dimension and neuron pruning)")
    group.add_argument("--ste", action="store_true", help="binary masks forward, relaxed gates backward")
    group.add_argument("--gate-lr", type=per_gate_type("a number > 0", lambda v: v > 0), default=None,
                       help="learning rate per gate type, e.g. heads=0.02 (types heads, qk_dims, v_dims, ffn; "
                            f"default: {GATE_LR:g} for every type)")
    group.add_argument("--init-drop", type=per_gate_type("a number in (0, 1)", lambda v: 0 < v < 1), default=None,
                       help="initial drop rate per gate type, e.g. heads=0.001,ffn=0.5 (default: "
                            + ", ".join(f"{name} {getattr(InitDropRates(), name):g}" for name in ("heads", "qk_dims",
                                                                                                 "v_dims", "ffn"))
                            + ")")
    group.add_argument("--target-ramp", type=FRACTION, default=None,
                       help="share of the steps over which the target sparsity ramps up from 0 (default "
                            f"{TARGET_WARMUP_FRACTION:g}; DPHuBERT 0.1)")
    group.add_argument("--min-heads", type=COUNT, default=0,
                       help="keep at least this many heads in every attention module (ours; default 0)")
    group.add_argument("--dims-only", action="store_true",
                       help="no head gates: a head goes only when all its value dims do (ours)")
    group.add_argument("--distill", action="store_true",
                       help="add layer-wise hidden-state distillation (L1 + cosine) from the dense model")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.method is None:
        args.method = "spg" if args.sparsity > 0 else "dense"
    if args.sparsity > 0 and args.method == "dense":
        parser.error("--sparsity > 0 needs a compression method (--method spg, ump, gmp, mixed, cluster or l0)")
    if args.sparsity == 0 and args.method in ("spg", "ump", "gmp", "cluster", "l0") or \
            args.method == "structured" and args.sparsity == 0 and args.structure_from is None or \
            args.method == "mixed" and args.sparsity == 0 and args.mixed_from is None:
        parser.error(f"--method {args.method} needs --sparsity > 0")
    if args.min_heads and args.dims_only:
        parser.error("--min-heads needs head gates; --dims-only has none")
    if (args.min_heads or args.dims_only or args.target_ramp is not None) and args.method != "l0":
        parser.error("--min-heads, --dims-only and --target-ramp are options of --method l0")
    if args.model and args.init:
        parser.error("give either --model or --init, not both")
    try:
        torch.device(args.device)
    except (RuntimeError, ValueError) as error:
        parser.error(f"argument --device: expected a torch device such as cpu or cuda:0, got {args.device!r} ({error})")
    return args


def main(argv=None) -> int:
    """Exit code 0; 2 for a usage error (argparse's, a --resume with other settings, options
    naming the same file, an --out that another run holds); 1 with one line "train.py: error:
    ..." for a bad file, bad data, a full disk or diverged training; 130 with one line after
    Ctrl-C. Anything else is a bug and keeps its traceback. The experiment: spg/experiment.py."""
    args = parse_args(argv)
    started = time.time()
    return exit_code_of("train.py", lambda: run_from_command_line(args, started))


if __name__ == "__main__":
    sys.exit(main())
