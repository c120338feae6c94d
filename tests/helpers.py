"""Shared test helpers (imported by the test modules; pytest puts tests/ on sys.path)."""

from pathlib import Path

import numpy as np
import soundfile


def write_corpus(root: Path, split: str, items: dict, *, sample_rate: int = 16000, channels: int = 1,
                 speaker: str = "19", chapter: str = "198") -> Path:
    """Write {utt_suffix: (transcript, seconds)} as <split>/<speaker>/<chapter>/..."""
    folder = root / split / speaker / chapter
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    rng = np.random.default_rng(0)
    for suffix, (text, seconds) in items.items():
        utterance_id = f"{speaker}-{chapter}-{suffix}"
        samples = 0.1 * rng.standard_normal((int(seconds * sample_rate), channels)).astype(np.float32)
        soundfile.write(folder / f"{utterance_id}.flac", samples, sample_rate, subtype="PCM_16")
        lines.append(f"{utterance_id} {text}")
    (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return folder


def perturbed(model):
    """Add noise to every parameter (so no bias is 0 and no unit is trivially removable); eval mode."""
    import torch
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def padded_noise(lengths):
    """A seeded random batch whose rows are zero beyond their `lengths` (B, max length)."""
    import torch
    torch.manual_seed(1)
    batch = torch.randn(len(lengths), int(lengths.max()))
    for row, length in enumerate(lengths):
        batch[row, length:] = 0.0
    return batch
