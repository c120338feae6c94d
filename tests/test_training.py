"""The shared training loop: resuming loses nothing, non-finite losses are skipped."""

import torch
from helpers import write_corpus

from spg.data import read_corpus
from spg.model import ModelConfig, Wav2Vec2CTC
from spg.training import Method, TrainConfig, learning_rate_factor, train

WORDS = ["A B", "CAT", "THE DOG", "HI", "NO YES", "IT IS"]


def tiny_model(seed: int = 0) -> Wav2Vec2CTC:
    torch.manual_seed(seed)
    config = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                         conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), conv_bias=True,
                         feat_extract_norm="layer", do_stable_layer_norm=True,
                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    return Wav2Vec2CTC(config)


def tiny_corpus(tmp_path):
    write_corpus(tmp_path, "train", {f"{i:04d}": (WORDS[i % len(WORDS)], 0.2 + 0.03 * i) for i in range(10)})
    return read_corpus(tmp_path, "train")


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    utterances = tiny_corpus(tmp_path)
    for freeze in (True, False):
        config = TrainConfig(steps=6, batch_size=3, lr=1e-3, save_every=2, freeze_feature_extractor=freeze)
        straight = tiny_model()
        train(straight, utterances, config, checkpoint_path=tmp_path / "a.state", progress=False)

        interrupted = tiny_model()
        first = train(interrupted, utterances, config, checkpoint_path=tmp_path / "b.state",
                      progress=False, stop_after_steps=4)   # crosses an epoch boundary (4 batches/epoch)
        assert first.steps_done == 4
        resumed = tiny_model(seed=123)       # different init: everything must come from the checkpoint
        second = train(resumed, utterances, config, checkpoint_path=tmp_path / "b.state", resume=True,
                       progress=False)
        assert second.steps_done == 6
        expected, got = state_of(straight), state_of(resumed)
        for key in expected:
            assert torch.equal(expected[key], got[key]), key


class NanAtStepTwo(Method):
    def extra_loss(self, model, step, total_steps):
        return torch.tensor(float("nan")) if step == 2 else None


def test_non_finite_loss_is_skipped(tmp_path, capsys):
    utterances = tiny_corpus(tmp_path)
    model = tiny_model()
    result = train(model, utterances, TrainConfig(steps=4, batch_size=3, lr=1e-3), method=NanAtStepTwo(),
                   progress=False)
    assert result.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_learning_rate_schedule():
    # 10 % warm-up of 100 steps, then linear decay to 0 (the SPG paper's schedule)
    assert learning_rate_factor(0, 100, 0.1) == 0.1
    assert learning_rate_factor(9, 100, 0.1) == 1.0
    assert learning_rate_factor(10, 100, 0.1) == 1.0
    assert abs(learning_rate_factor(55, 100, 0.1) - 0.5) < 1e-12
    assert learning_rate_factor(100, 100, 0.1) == 0.0


def test_feature_cache_on_disk_is_reused_and_keyed_on_the_weights(tmp_path):
    utterances = tiny_corpus(tmp_path)
    config = TrainConfig(steps=3, batch_size=3, lr=1e-3, save_every=0, feature_cache_dir=str(tmp_path / "cache"))
    first, second = tiny_model(), tiny_model()
    train(first, utterances, config, progress=False)
    files = list((tmp_path / "cache").glob("features-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    train(second, utterances, config, progress=False)           # reads the stored features
    assert files[0].stat().st_mtime_ns == stamp
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    other = tiny_model(seed=5)                                    # another front end: another key
    train(other, utterances, config, progress=False)
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2
