"""train.py and evaluate.py end to end on tiny corpora."""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_corpus

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import evaluate  # noqa: E402
import spg  # noqa: E402
from spg.checkpoint import payload_bytes  # noqa: E402
import train  # noqa: E402

SHIPPED = REPO / "models" / "tiny-dense.pt"


def noise_corpus(root: Path) -> Path:
    for split in ("train", "dev", "test"):
        write_corpus(root, split, {f"{i:04d}": (["HELLO WORLD", "A CAT", "NO"][i % 3], 0.3 + 0.05 * i)
                                   for i in range(6)})
    return root


def test_train_resume_continues_from_the_given_checkpoint(tmp_path):
    data = noise_corpus(tmp_path / "corpus")
    common = ["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "4",
              "--batch-size", "3", "--lr", "1e-3", "--save-every", "1"]
    assert train.main(common + ["--out", str(tmp_path / "straight.pt")]) == 0
    assert train.main(common + ["--out", str(tmp_path / "parts.pt"), "--stop-after", "2"]) == 0
    assert not (tmp_path / "parts.pt").exists()           # not finished yet
    state = torch.load(tmp_path / "parts.pt.state", weights_only=True)      # plain data and tensors only
    assert state["step"] == 2
    # --save-every, --json and --device may change on resume; the rest may not
    assert train.main(common + ["--out", str(tmp_path / "parts.pt"), "--resume", "--save-every", "3",
                                "--device", "cpu", "--json", str(tmp_path / "summary.json")]) == 0
    straight, resumed = spg.load(tmp_path / "straight.pt"), spg.load(tmp_path / "parts.pt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["after"]) == {"dev", "test"}


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    data = noise_corpus(tmp_path / "corpus")
    assert train.main(["--init", "tiny", "--data", str(data), "--steps", "2", "--resume",
                       "--out", str(tmp_path / "missing.pt")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("train.py: error: ")
    assert f"no checkpoint at {tmp_path / 'missing.pt.state'}" in error


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped model not present")
def test_evaluate_shipped_model_on_a_tiny_synthetic_corpus(tmp_path, capsys):
    from spg.corpus import build_corpus
    root = build_corpus(tmp_path / "synth", num_train=1, num_dev=1, num_test=6, num_test_unseen=1,
                        progress=False)
    report_path = tmp_path / "report.json"
    assert evaluate.main(["--data", str(root), "--split", "test", "--json", str(report_path),
                          "--compare", str(SHIPPED)]) == 0
    report = json.loads(report_path.read_text())
    assert len(report["utterances"]) == 6
    assert {"wer", "cer", "params_total", "params_nonzero", "sparsity", "size_bytes", "rtf"} <= set(report)
    assert report["params_total"] > 4_000_000
    # dense model: only a handful of tiny weights round to exactly 0 in fp16 storage
    assert report["params_total"] - 10 <= report["params_nonzero"] <= report["params_total"]
    assert report["sparsity"] < 1e-5
    assert report["size_bytes"] == SHIPPED.stat().st_size
    # the shipped model really recognises unseen sentences of seen voices
    assert report["cer"] < 0.15, report["utterances"]
    # comparing a model with itself: identical outputs, no significant difference
    assert report["compare"]["p_value"] == 1.0 and not report["compare"]["significant"]
    printed = capsys.readouterr().out
    assert "WER" in printed and "real-time factor" in printed


def test_train_compresses_with_spg_then_mixed_and_ump(tmp_path, capsys):
    from test_training import tiny_model
    data = noise_corpus(tmp_path / "corpus")
    dense = tmp_path / "dense.pt"
    spg.save(tiny_model(), dense)
    common = ["--model", str(dense), "--data", str(data), "--test-split", "test", "--steps", "8",
              "--batch-size", "3", "--lr", "1e-3", "--sparsity", "0.5"]
    assert train.main(common + ["--threshold-lr", "1e-2", "--out", str(tmp_path / "spg.pt"),
                                "--json", str(tmp_path / "spg.json")]) == 0
    summary = json.loads((tmp_path / "spg.json").read_text())
    assert summary["method"] == "spg" and abs(summary["sparsity"] - 0.5) < 0.01
    assert set(summary["dense_wer"]) == set(summary["compressed_wer"]) == set(summary["mapsswe"]) == {"dev", "test"}
    assert summary["sparsity_before_calibration"] is not None and len(summary["per_matrix_sparsity"]) == 12
    assert summary["size_bytes"] < summary["dense_size_bytes"] and summary["params_nonzero"] < summary["params_total"]
    sizes = summary["sizes"]
    assert sizes["compressed_fp32"] == summary["size_bytes"] and sizes["dense_fp32"] == summary["dense_size_bytes"]
    assert sizes["fp16_limit"] < sizes["compressed_fp16"] < sizes["compressed_fp32"] < sizes["dense_fp32"]
    assert sizes["compressed_fp16"] < sizes["dense_fp16"] < sizes["dense_fp32"]
    assert sizes["fp16_limit"] == payload_bytes(spg.load(tmp_path / "spg.pt").state_dict(), half=True)
    printed = capsys.readouterr().out
    assert "MAPSSWE" in printed and "block 1" in printed and "before calibration" in printed
    assert "allocation: correlation" in printed and "target first reached at" in printed
    assert "fp16 (--half; the limit for fp16 non-zeros plus a 1-bit mask is" in printed
    assert -1 <= summary["allocation"]["correlation_with_global_magnitude"] <= 1
    assert len(summary["history"]) == 1 and summary["history"][0]["step"] == 8      # every 10 steps and the last
    assert summary["decoding"]["test"]["hypotheses"] and len(summary["decoding"]["dev"]["references"]) == \
        len(summary["decoding"]["dev"]["hypotheses"])

    learned = spg.load(tmp_path / "spg.pt").compression["per_matrix_sparsity"]
    assert train.main(common + ["--method", "mixed", "--mixed-from", str(tmp_path / "spg.pt"),
                                "--out", str(tmp_path / "mixed.pt"), "--json", str(tmp_path / "mixed.json")]) == 0
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    assert all(abs(mixed["per_matrix_sparsity"][k] - v) < 1e-3 for k, v in learned.items())
    assert train.main(common + ["--method", "ump", "--out", str(tmp_path / "ump.pt"),
                                "--json", str(tmp_path / "ump.json")]) == 0
    ump = json.loads((tmp_path / "ump.json").read_text())
    assert all(abs(v - 0.5) < 1e-3 for v in ump["per_matrix_sparsity"].values())


def test_cluster_method_end_to_end(tmp_path):
    data = noise_corpus(tmp_path / "corpus")
    dense_path = tmp_path / "dense.pt"
    torch.manual_seed(0)
    from spg.wav2vec2.model import Wav2Vec2CTC, preset
    spg.save(Wav2Vec2CTC(preset("tiny")), dense_path)
    summary_path = tmp_path / "cluster.json"
    assert train.main(["--method", "cluster", "--sparsity", "0.5", "--model", str(dense_path), "--data", str(data),
                       "--test-split", "test", "--epochs", "1", "--batch-size", "3",
                       "--out", str(tmp_path / "clustered.pt"), "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    # tiny preset: 4 heads and 1,024 FFN units per block; K = round(N * (1 - 0.5))
    assert summary["kept"] == {"heads": [2] * 6, "ffn_units": [512] * 6}
    loaded = spg.load(tmp_path / "clustered.pt")
    assert loaded.num_parameters() == summary["params_total"] < summary["params_dense"]
    assert loaded.config.layer_intermediate_sizes == [512] * 6
    assert set(summary["clustered_wer"]) == set(summary["magnitude_wer"]) == set(summary["finetuned_wer"]) == {"dev", "test"}
    assert summary["forward_time_ratio"] > 0


def test_cluster_variants_from_the_command_line(tmp_path, capsys):
    """Issue 16's options reach the library: representative rule, mixed K per kind (each kind
    keeps its uniform unit count, printed), the bias fold and min-similarity in the record."""
    data = noise_corpus(tmp_path / "corpus")
    dense_path = tmp_path / "dense.pt"
    torch.manual_seed(0)
    from spg.wav2vec2.model import Wav2Vec2CTC, preset
    spg.save(Wav2Vec2CTC(preset("tiny")), dense_path)
    assert train.main(["--method", "cluster", "--sparsity", "0.5", "--model", str(dense_path), "--data", str(data),
                       "--test-split", "test", "--merge", "representative", "--mixed", "--mixed-per-kind",
                       "--fold-bias", "--min-similarity", "0.5", "--out", str(tmp_path / "c.pt"),
                       "--json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "mixed K per kind: heads 12 of 24 (uniform K: 12)" in printed and "ranked within each kind" in printed
    # the printed summary is computed first, then printed: the JSON alone prints it again
    from spg.experiment import print_cluster_summary
    print_cluster_summary(json.loads((tmp_path / "c.json").read_text()))
    assert capsys.readouterr().out in printed
    record = spg.load(tmp_path / "c.pt").compression
    assert record["merge"] == "representative" and record["mixed"] == "per_kind" and record["fold_bias"] is True
    assert record["min_similarity"] == 0.5 and sum(record["kept"]["ffn_units"]) == 3072


def test_l0_method_end_to_end(tmp_path, capsys):
    data = noise_corpus(tmp_path / "corpus")
    dense_path = tmp_path / "dense.pt"
    torch.manual_seed(0)
    from spg.wav2vec2.model import Wav2Vec2CTC, preset
    dense = Wav2Vec2CTC(preset("tiny"))
    spg.save(dense, dense_path)
    summary_path = tmp_path / "l0.json"
    assert train.main(["--method", "l0", "--sparsity", "0.5", "--ste", "--distill", "--model", str(dense_path),
                       "--data", str(data), "--test-split", "test", "--steps", "4", "--batch-size", "3",
                       "--out", str(tmp_path / "l0.pt"), "--json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    pruned = spg.load(tmp_path / "l0.pt")
    assert pruned.num_parameters() == summary["params_total"] < dense.num_parameters() == summary["params_dense"]
    # the final calibration deploys at least the target sparsity of the prunable layers (L0's
    # count: weights and biases); "sparsity" counts the weights alone, as for every method
    assert summary["gate_sparsity"] >= 0.5 and summary["sparsity"] >= 0.5
    assert summary["sparsity"] == 1 - summary["prunable_params_kept"] / summary["prunable_params"]
    assert len(summary["kept"]["heads"]) == 6 and summary["forward_time_ratio"] > 0
    printed = capsys.readouterr().out
    assert f"forward time (10 s of audio) ratio {summary['forward_time_ratio']:.2f}" in printed
    from spg.experiment import print_summary           # computed first, printed from the summary alone
    print_summary(summary)
    assert capsys.readouterr().out in printed

    # the structured baseline of the same shape: magnitude pruning to L0's sizes, then fine-tuning
    structured_path = tmp_path / "structured.json"
    assert train.main(["--method", "structured", "--structure-from", str(tmp_path / "l0.pt"), "--sparsity", "0.5",
                       "--model", str(dense_path), "--data", str(data), "--test-split", "test", "--steps", "2",
                       "--batch-size", "3", "--out", str(tmp_path / "structured.pt"),
                       "--json", str(structured_path)]) == 0
    structured = json.loads(structured_path.read_text())
    from spg.compress.clustering import module_shapes
    sorted_shapes = lambda model: {name: {key: sorted(value) if isinstance(value, list) else value  # noqa: E731
                                          for key, value in shape.items()}
                                   for name, shape in module_shapes(model).items()}
    assert sorted_shapes(spg.load(tmp_path / "structured.pt")) == sorted_shapes(pruned)
    assert structured["params_total"] == summary["params_total"] and structured["kept"] == summary["kept"]
    assert structured["prunable_params_kept"] == summary["prunable_params_kept"]
    assert structured["dense_size_bytes"] == summary["dense_size_bytes"] and structured["dense_wer"] == summary["dense_wer"]


def test_dense_decoding_is_reused_only_for_the_same_model(tmp_path, capsys):
    data = noise_corpus(tmp_path / "corpus")
    model = tmp_path / "start.pt"
    assert train.main(["--init", "tiny", "--data", str(data), "--steps", "1", "--out", str(model)]) == 0
    cache = tmp_path / "dense.json"
    common = ["--model", str(model), "--data", str(data), "--test-split", "test", "--sparsity", "0.5",
              "--method", "ump", "--steps", "1", "--dense-eval", str(cache)]
    assert train.main(common + ["--out", str(tmp_path / "a.pt"), "--json", str(tmp_path / "a.json")]) == 0
    assert cache.exists() and "dense decoding reused" not in capsys.readouterr().out
    assert train.main(common + ["--out", str(tmp_path / "b.pt"), "--json", str(tmp_path / "b.json")]) == 0
    assert "dense decoding reused" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["dense_wer"] == b["dense_wer"]
    other = common.copy()
    other[1] = str(tmp_path / "a.pt")                             # different weights: decoded again
    assert train.main(other + ["--out", str(tmp_path / "c.pt")]) == 0
    assert "decoding again" in capsys.readouterr().out
