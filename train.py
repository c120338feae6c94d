#!/usr/bin/env python
"""Train or compress a wav2vec2/HuBERT CTC model.

    python train.py --sparsity 0                  # dense CTC fine-tuning of the shipped model
    python train.py --init tiny --train-feature-extractor --steps 40000 ...   # from scratch

With no --model and no --data it uses the shipped dense tiny model and the built-in
synthetic corpus (synthesised on first use). See README.md for the real-checkpoint setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import spg
from spg.data import read_corpus
from spg.model import Wav2Vec2CTC, preset
from spg.training import Method, TrainConfig, evaluate_corpus, sparsity_report, train

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = REPO / "models" / "tiny-dense.pt"
METHODS = {"dense": Method}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"checkpoint to start from (default: {DEFAULT_MODEL.relative_to(REPO)})")
    parser.add_argument("--init", choices=["tiny"], default=None,
                        help="start from a randomly initialised preset instead of a checkpoint")
    parser.add_argument("--data", default=None, help="LibriSpeech-layout corpus root (default: built-in corpus)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--dev-split", default="dev")
    parser.add_argument("--test-split", default="test", help="comma-separated; the built-in corpus adds test-unseen")
    parser.add_argument("--method", choices=sorted(METHODS), default="dense")
    parser.add_argument("--sparsity", type=float, default=0.0, help="target global sparsity (0 = dense training)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--train-feature-extractor", action="store_true",
                        help="also train the conv front end (default: frozen and cached)")
    parser.add_argument("--dropout", type=float, default=None, help="override every dropout probability")
    parser.add_argument("--out", default=None, help="output checkpoint (default: runs/<method>-<sparsity>.pt)")
    parser.add_argument("--half", action="store_true", help="store the output weights as float16")
    parser.add_argument("--json", default=None, help="write the summary figures to this JSON file")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.state")
    parser.add_argument("--stop-after", type=int, default=None, help="stop this call after N steps (resume later)")
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.sparsity > 0 and args.method == "dense":
        parser.error("--sparsity > 0 needs a compression method; this version ships only --method dense")
    if args.model and args.init:
        parser.error("give either --model or --init, not both")
    return args


def build_model(args) -> Wav2Vec2CTC:
    if args.init:
        torch.manual_seed(args.seed)
        config = preset(args.init)
        if args.dropout is not None:
            _set_dropout(config, args.dropout)
        return Wav2Vec2CTC(config)
    path = Path(args.model) if args.model else DEFAULT_MODEL
    model = spg.load(path)
    if args.dropout is not None:
        _set_dropout(model.config, args.dropout)
        model = _rebuild(model)
    return model


def _set_dropout(config, probability: float) -> None:
    for name in ("hidden_dropout", "attention_dropout", "activation_dropout", "final_dropout", "layerdrop"):
        setattr(config, name, probability)


def _rebuild(model: Wav2Vec2CTC) -> Wav2Vec2CTC:
    fresh = Wav2Vec2CTC(model.config, model.vocab)
    fresh.load_state_dict(model.state_dict())
    fresh.compression = model.compression
    return fresh


def corpus_root(args) -> Path:
    if args.data:
        return Path(args.data)
    from spg.corpus import build_corpus
    return build_corpus()


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    device = torch.device(args.device)
    root = corpus_root(args)
    test_splits = [s for s in args.test_split.split(",") if s]
    if args.data is None and "test-unseen" not in test_splits:
        test_splits.append("test-unseen")
    model = build_model(args)
    train_set = read_corpus(root, args.train_split, model.vocab)
    dev_set = read_corpus(root, args.dev_split, model.vocab)
    test_sets = {name: read_corpus(root, name, model.vocab) for name in test_splits}

    out = Path(args.out) if args.out else REPO / "runs" / f"{args.method}-{args.sparsity:g}.pt"
    print(f"output checkpoint: {out}")
    before = {} if args.init else {
        name: evaluate_corpus(model, data, device=device, desc=f"dense {name}")
        for name, data in {"dev": dev_set, **test_sets}.items()}

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_fraction=args.warmup,
                         weight_decay=args.weight_decay, freeze_feature_extractor=not args.train_feature_extractor,
                         save_every=args.save_every, eval_every=args.eval_every, seed=args.seed)
    method = METHODS[args.method]()
    result = train(model, train_set, config, method=method, device=device,
                   checkpoint_path=out.with_name(out.name + ".state"), resume=args.resume,
                   dev_utterances=dev_set, stop_after_steps=args.stop_after)
    if result.steps_done < args.steps:
        print(f"stopped after step {result.steps_done} of {args.steps}; continue with --resume")
        return 0

    model.cpu()
    spg.save(model, out, half=args.half)
    after = {name: evaluate_corpus(model, data, desc=f"trained {name}")
             for name, data in {"dev": dev_set, **test_sets}.items()}
    summary = {
        "method": args.method, "target_sparsity": args.sparsity, "steps": result.steps_done,
        "skipped_steps": result.skipped_steps, "out": str(out), "size_bytes": out.stat().st_size,
        "params_total": model.num_parameters(), "params_nonzero": model.num_parameters(nonzero_only=True),
        **sparsity_report(model),
        "before": {k: {m: v[m] for m in ("wer", "cer")} for k, v in before.items()},
        "after": {k: {m: v[m] for m in ("wer", "cer")} for k, v in after.items()},
        "train_seconds": result.seconds, "seconds": time.time() - started,
    }
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def print_summary(summary: dict) -> None:
    print("\n=== summary ===")
    print(f"method {summary['method']}, {summary['steps']} steps ({summary['skipped_steps']} skipped), "
          f"checkpoint {summary['out']} ({summary['size_bytes'] / 1e6:.2f} MB)")
    print(f"{'split':<14}{'WER before':>12}{'WER after':>12}{'CER before':>12}{'CER after':>12}")
    for split, figures in summary["after"].items():
        was = summary["before"].get(split, {})
        fmt = lambda v: f"{100 * v:.2f}%" if v is not None else "-"  # noqa: E731
        print(f"{split:<14}{fmt(was.get('wer')):>12}{fmt(figures['wer']):>12}"
              f"{fmt(was.get('cer')):>12}{fmt(figures['cer']):>12}")
    print(f"parameters {summary['params_total']:,} ({summary['params_nonzero']:,} non-zero); "
          f"prunable-matrix sparsity {100 * summary['sparsity']:.1f}%")
    print(f"time {summary['seconds']:.0f} s (training {summary['train_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
