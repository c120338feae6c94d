"""Data-parallel training with PyTorch DDP (gloo, 2 CPU processes): every rank ends with the
same weights and the target sparsity, through the library loop and through `torchrun train.py`."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import write_corpus
from test_training import tiny_corpus, tiny_model

import spg
from spg.compress.self_pinching import SPG
from spg.ctc_training import CTCObjective
from spg.training import TrainConfig, sparsity_report, train

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2


def _spg_rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    try:
        utterances = tiny_corpus(Path(folder) / f"corpus{rank}")
        model = tiny_model(seed=rank)                # different on purpose: DDP must broadcast rank 0's
        method = SPG(0.5, normalised_eta=True, band=None, threshold_lr=1e-2)   # η', on/off + resets
        config = TrainConfig(steps=30, batch_size=2, lr=1e-3, save_every=0)
        result = train(model, utterances, config, objective=CTCObjective(), method=method, progress=False)
        torch.save({"state": model.state_dict(), "report": sparsity_report(model), "steps": result.steps_done,
                    "controller": method.controller.state_dict()}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_end_identical_at_the_target_sparsity(tmp_path):
    mp.spawn(_spg_rank, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 30
    assert ranks[0]["controller"] == ranks[1]["controller"]
    assert set(ranks[0]["state"]) == set(ranks[1]["state"])
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert abs(ranks[0]["report"]["sparsity"] - 0.5) <= 0.01
    # Rank 1 started from other random weights: identical results mean DDP really synchronised.
    assert not torch.equal(tiny_model(seed=0).encoder.layers[0].attention.q_proj.weight,
                           tiny_model(seed=1).encoder.layers[0].attention.q_proj.weight)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_train_py_with_gloo(tmp_path):
    data = tmp_path / "corpus"
    for split in ("train", "dev", "test"):
        write_corpus(data, split, {f"{i:04d}": (["HELLO WORLD", "A CAT", "NO"][i % 3], 0.3 + 0.05 * i)
                                   for i in range(6)})
    out, summary = tmp_path / "spg.pt", tmp_path / "summary.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(REPO / "train.py"), "--init", "tiny", "--data", str(data), "--test-split", "test",
               "--sparsity", "0.5", "--steps", "4", "--batch-size", "2", "--threshold-lr", "1e-2",
               "--out", str(out), "--json", str(summary)]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    finished = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    figures = json.loads(summary.read_text())
    assert figures["steps"] == 4 and figures["method"] == "spg"
    assert abs(figures["sparsity"] - 0.5) <= 0.01              # calibrated on every rank alike
    assert finished.stdout.count("=== summary ===") == 1        # only rank 0 reports
    model = spg.load(out)
    assert abs(sparsity_report(model)["sparsity"] - figures["sparsity"]) < 1e-9
