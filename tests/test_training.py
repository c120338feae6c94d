"""The shared training loop: resuming loses nothing (and runs nothing from the state file),
non-finite losses are skipped, non-finite weights stop the run."""

import builtins

import numpy as np
import pytest
import torch
from helpers import write_corpus

from spg.compress.interface import Method
from spg.ctc_training import CTCObjective
from spg.data import DataError, read_corpus
from spg.loading import CheckpointError
from spg.resume import ResumeMismatchError, load_resume_state
from spg.training import NonFiniteWeightsError, TrainConfig, learning_rate_factor, plain_data, train
from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC

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
        train(straight, utterances, config, objective=CTCObjective(),
              checkpoint_path=tmp_path / "a.state", progress=False)

        interrupted = tiny_model()
        first = train(interrupted, utterances, config, objective=CTCObjective(), checkpoint_path=tmp_path / "b.state",
                      progress=False, stop_after_steps=4)   # crosses an epoch boundary (4 batches/epoch)
        assert first.steps_done == 4
        resumed = tiny_model(seed=123)       # different init: everything must come from the checkpoint
        second = train(resumed, utterances, config, objective=CTCObjective(),
                       checkpoint_path=tmp_path / "b.state", resume=True,
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
    result = train(model, utterances, TrainConfig(steps=4, batch_size=3, lr=1e-3), objective=CTCObjective(),
                   method=NanAtStepTwo(),
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
    train(first, utterances, config, objective=CTCObjective(), progress=False)
    files = list((tmp_path / "cache").glob("features-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    train(second, utterances, config, objective=CTCObjective(), progress=False)           # reads the stored features
    assert files[0].stat().st_mtime_ns == stamp
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    other = tiny_model(seed=5)                                    # another front end: another key
    train(other, utterances, config, objective=CTCObjective(), progress=False)
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2


def test_one_ctc_objective_serves_several_runs(tmp_path):
    """An objective passed to a second run keeps nothing of the first (its cached features)."""
    utterances = tiny_corpus(tmp_path)
    frozen = TrainConfig(steps=2, batch_size=3, lr=1e-3, save_every=0)
    trained = TrainConfig(steps=2, batch_size=3, lr=1e-3, save_every=0, freeze_feature_extractor=False)
    shared, reused, fresh = CTCObjective(), tiny_model(), tiny_model()
    train(tiny_model(), utterances, frozen, objective=shared, progress=False)
    train(reused, utterances, trained, objective=shared, progress=False)
    train(fresh, utterances, trained, objective=CTCObjective(), progress=False)
    for (name, a), b in zip(state_of(reused).items(), state_of(fresh).values()):
        assert torch.equal(a, b), name


class Planted:
    """A pickle payload: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_resume_state_with_a_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    utterances = tiny_corpus(tmp_path)
    config = TrainConfig(steps=4, batch_size=3, lr=1e-3, save_every=1)
    # the payload is live: an unrestricted load runs it
    torch.save({"model": Planted(tmp_path / "proof")}, tmp_path / "proof.state")
    torch.load(tmp_path / "proof.state", weights_only=False)
    assert (tmp_path / "proof").exists()

    marker, state = tmp_path / "marker", tmp_path / "run.state"
    torch.save({"model": Planted(marker), "step": 0}, state)
    with pytest.raises(CheckpointError, match=f"refused to load {state}: not a resume state written by "
                                              "train.py; nothing from it was executed"):
        train(tiny_model(), utterances, config, objective=CTCObjective(),
              checkpoint_path=state, resume=True, progress=False)
    assert not marker.exists()
    # a legitimate resume in the same process is still exact
    straight = tiny_model()
    train(straight, utterances, config, objective=CTCObjective(), progress=False)
    train(tiny_model(), utterances, config, objective=CTCObjective(),
          checkpoint_path=state, progress=False, stop_after_steps=2)
    resumed = tiny_model(seed=9)
    train(resumed, utterances, config, objective=CTCObjective(), checkpoint_path=state, resume=True, progress=False)
    for (name, a), b in zip(state_of(straight).items(), state_of(resumed).values()):
        assert torch.equal(a, b), name


def test_every_method_writes_a_weights_only_state(tmp_path):
    from spg.compress.l0 import L0Method
    from spg.compress.magnitude import Mixed, UMP
    from spg.compress.self_pinching import SPG
    utterances = tiny_corpus(tmp_path)
    config = TrainConfig(steps=3, batch_size=3, lr=1e-3, save_every=1)
    for name, make in (("spg", lambda m: SPG(0.5)), ("ump", lambda m: UMP(0.5)),
                       ("mixed", lambda m: Mixed({n: 0.5 for n, _ in m.prunable_linears()})),
                       ("l0", lambda m: L0Method(0.5, seed=0))):
        model = tiny_model()
        path = tmp_path / f"{name}.state"
        train(model, utterances, config, objective=CTCObjective(),
              method=make(model), checkpoint_path=path, progress=False,
              stop_after_steps=1)
        state = load_resume_state(path)                  # weights_only=True inside
        assert state["method_name"] == name and state["step"] == 1
        model = tiny_model()
        assert train(model, utterances, config, objective=CTCObjective(),
                     method=make(model), checkpoint_path=path, resume=True,
                     progress=False).steps_done == 3


def test_plain_data_converts_numpy_and_refuses_other_objects():
    converted = plain_data({"a": np.int64(3), "b": [np.float32(0.5), (np.arange(3),)],
                            "rng": np.random.default_rng(0).bit_generator.state})
    assert converted["a"] == 3 and type(converted["a"]) is int and type(converted["b"][0]) is float
    assert torch.equal(converted["b"][1][0], torch.arange(3))
    torch.save(converted, __import__("io").BytesIO())
    with pytest.raises(TypeError, match=r"state\['method'\]\['gen'\] is a numpy.random.*Generator"):
        plain_data({"method": {"gen": np.random.default_rng(0)}})


def test_resume_with_other_settings_is_refused_by_name(tmp_path):
    utterances = tiny_corpus(tmp_path)
    config = TrainConfig(steps=4, batch_size=3, lr=1e-3, save_every=1)
    state = tmp_path / "run.state"
    train(tiny_model(), utterances, config, objective=CTCObjective(),
          checkpoint_path=state, progress=False, stop_after_steps=2,
          settings={"--sparsity": 0.5})
    before = state.read_bytes()
    other = TrainConfig(steps=4, batch_size=2, lr=2e-3, save_every=1, seed=1)
    with pytest.raises(ResumeMismatchError) as refused:
        train(tiny_model(), utterances, other, objective=CTCObjective(),
              checkpoint_path=state, resume=True, progress=False,
              settings={"--sparsity": 0.6})
    message = str(refused.value)
    for expected in ("--batch-size: stored 3, given 2", "--lr: stored 0.001, given 0.002", "--seed: stored 0, given 1",
                     "--sparsity: stored 0.5, given 0.6"):
        assert expected in message, message
    with pytest.raises(ResumeMismatchError, match="method: stored 'dense', given 'ump'"):
        from spg.compress.magnitude import UMP
        model = tiny_model()
        train(model, utterances, config, objective=CTCObjective(),
              method=UMP(0.5), checkpoint_path=state, resume=True, progress=False,
              settings={"--sparsity": 0.5})
    assert state.read_bytes() == before
    # when and where things are written may change
    allowed = TrainConfig(steps=4, batch_size=3, lr=1e-3, save_every=3, eval_every=2)
    assert train(tiny_model(), utterances, allowed, objective=CTCObjective(),
                 checkpoint_path=state, resume=True, progress=False,
                 settings={"--sparsity": 0.5}).steps_done == 4


class NanWeightAfterStepThree(Method):
    def after_step(self, model, step, total_steps, optimizer=None):
        if step == 3:
            with torch.no_grad():
                model.encoder.layers[1].feed_forward.output_dense.weight[0, 0] = float("nan")
        return {}


def test_non_finite_weights_stop_training_and_keep_the_last_checkpoint(tmp_path):
    utterances = tiny_corpus(tmp_path)
    state = tmp_path / "run.state"
    config = TrainConfig(steps=6, batch_size=3, lr=1e-3, save_every=1)
    with pytest.raises(NonFiniteWeightsError, match=r"step 2: the weights are no longer finite .*"
                                                    r"encoder\.layers\.1\.feed_forward\.output_dense\.weight has 1 "
                                                    rf"NaN/inf .*{state} at step 2"):
        train(tiny_model(), utterances, config, objective=CTCObjective(),
              method=NanWeightAfterStepThree(), checkpoint_path=state,
              progress=False)
    kept = load_resume_state(state)                      # also checks that its weights are finite
    assert kept["step"] == 2


def test_resume_state_with_non_finite_weights_is_refused_by_name(tmp_path):
    utterances = tiny_corpus(tmp_path)
    state_path = tmp_path / "run.state"
    train(tiny_model(), utterances, TrainConfig(steps=2, batch_size=3, save_every=1), objective=CTCObjective(),
          checkpoint_path=state_path,
          progress=False)
    state = torch.load(state_path, weights_only=True)
    state["model"]["lm_head.bias"][3] = float("inf")
    torch.save(state, state_path)
    with pytest.raises(CheckpointError, match=r"run.state: non-finite model weights \(NaN or inf\) in "
                                              r"lm_head.bias \(1 of \d+ values\)"):
        load_resume_state(state_path)


def test_time_estimate_after_the_first_steps(tmp_path, capsys):
    """After ESTIMATE_AFTER_STEPS steps the loop prints how long the rest takes; the arithmetic
    is the first steps' speed times the steps left."""
    from spg.training import ESTIMATE_AFTER_STEPS, time_estimate
    line = time_estimate(30.0, 20, 480)
    assert line.startswith("1.50 s per step: the remaining 480 steps take about 12.0 min (until about ")
    steps = 2 * ESTIMATE_AFTER_STEPS + 5               # short runs (fewer steps left than done) print nothing
    train(tiny_model(), tiny_corpus(tmp_path), TrainConfig(steps=steps, batch_size=3, lr=1e-3, save_every=0),
          objective=CTCObjective())
    assert f"s per step: the remaining {steps - ESTIMATE_AFTER_STEPS} steps take about" in capsys.readouterr().out


# The vocabulary of the common Hugging Face fine-tuning recipe: the sorted characters (a space,
# written "|", sorts first), then [UNK] and [PAD]; the CTC blank is [PAD], the last id.
PAD_LAST_VOCAB = ["|", "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["[UNK]", "[PAD]"]


def pad_last_hf_model(folder):
    """A random-weight transformers Wav2Vec2ForCTC whose pad (blank) is its last id, saved as an
    HF folder with its vocab.json; the head is scaled and the blank favoured so that greedy
    decoding emits blanks, repeats and word delimiters."""
    import json
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(PAD_LAST_VOCAB), pad_token_id=len(PAD_LAST_VOCAB) - 1, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16, 16),
                            conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True,
                            conv_bias=True, ctc_zero_infinity=True, layerdrop=0.0)
    reference = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        reference.lm_head.weight.mul_(20)
        reference.lm_head.bias[-1] += 6.0
    reference.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(PAD_LAST_VOCAB)}))
    return reference


def test_blank_is_the_configs_pad_token_in_loss_and_decoding_as_in_transformers(tmp_path):
    """Item 4 of issue 24: an HF model whose <pad> is last trains and decodes with that blank.
    Our CTC loss (the training objective's, both reductions) equals transformers' `labels=` loss,
    and our greedy decoding (the corpus decoder and `transcribe`) equals its argmax decoded by
    Wav2Vec2CTCTokenizer (pad as blank, `|` as the space)."""
    import spg
    from spg.data import AudioCache
    from spg.ctc_training import ctc_loss, forward_batch, transcribe_corpus
    from transformers import Wav2Vec2CTCTokenizer
    reference = pad_last_hf_model(tmp_path / "hf")
    ours = spg.load(tmp_path / "hf").eval()
    assert ours.vocab == PAD_LAST_VOCAB and ours.blank_id == len(PAD_LAST_VOCAB) - 1
    write_corpus(tmp_path / "corpus", "train", {"0000": ("HELLO WORLD", 0.5), "0001": ("A CAT", 0.5),
                                                "0002": ("IT IS", 0.5)})
    utterances = read_corpus(tmp_path / "corpus", "train", ours.vocab)
    audio = AudioCache(utterances)
    batch = audio.batch([0, 1, 2], normalize=ours.config.do_normalize, vocab=ours.vocab)
    labels = torch.full((3, int(batch.target_lengths.max())), -100)
    for row, (start, length) in enumerate(zip(batch.target_lengths.cumsum(0) - batch.target_lengths,
                                              batch.target_lengths)):
        labels[row, :length] = batch.targets[start:start + length]
    assert (labels == 0).any()               # "|" is id 0: the old hard-coded blank
    objective = CTCObjective()
    for reduction in ("sum", "mean"):
        reference.config.ctc_loss_reduction = reduction
        with torch.no_grad():
            expected = reference(batch.waveforms, labels=labels).loss
            objective.freeze(ours, TrainConfig(loss_reduction=reduction))
            got = objective.loss(ours, audio, [0, 1, 2], torch.device("cpu"))
        assert torch.allclose(got, expected, rtol=1e-5), (reduction, got, expected)
    with pytest.raises(ValueError, match="is the CTC blank id 0"):     # blank 0 would treat "|" as the blank
        logits, frames = forward_batch(ours, batch, torch.device("cpu"))
        ctc_loss(logits, frames, batch, "sum", blank=0)

    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "hf" / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                                     word_delimiter_token="|")
    with torch.no_grad():
        best = reference(batch.waveforms).logits.argmax(-1)
    assert (best == ours.blank_id).float().mean() > 0.2 and (best == 0).any()
    expected = [" ".join(text.split()) for text in tokenizer.batch_decode(best)]
    assert all(" " in text for text in expected)
    assert transcribe_corpus(ours, audio, progress=False) == expected
    assert ours.transcribe([batch.waveforms[i] for i in range(3)]) == expected


def test_a_vocabulary_whose_blank_is_a_character_is_refused_before_training(tmp_path):
    """A config whose pad_token_id points at a character (here "|", the space) would make CTC
    learn that character as its blank: train() refuses, naming the utterance's file."""
    utterances = tiny_corpus(tmp_path)
    model = tiny_model()
    config = model.config
    config.vocab_size, config.pad_token_id = len(PAD_LAST_VOCAB), 0
    model = Wav2Vec2CTC(config, PAD_LAST_VOCAB)
    spaced = next(u for u in utterances if " " in u.transcript)
    with pytest.raises(DataError, match=rf"{spaced.audio_path}: the transcript of {spaced.id} contains ' ', which "
                                        r"is the model's CTC blank \('\|', pad_token_id 0\)"):
        train(model, utterances, TrainConfig(steps=1, batch_size=3), objective=CTCObjective(), progress=False)
    config.pad_token_id = len(PAD_LAST_VOCAB) - 1                   # [PAD]: never a character
    assert train(Wav2Vec2CTC(config, PAD_LAST_VOCAB), utterances, TrainConfig(steps=1, batch_size=3),
                 objective=CTCObjective(), progress=False).steps_done == 1


def test_resume_refuses_edited_optimiser_hyperparameters_by_name(tmp_path):
    """Item 8 of issue 24: lr, betas, eps and weight_decay edited in a state's param_groups are
    refused like the other settings, each named; the unedited state still resumes exactly."""
    utterances = tiny_corpus(tmp_path)
    config = TrainConfig(steps=4, batch_size=3, lr=1e-3, save_every=1)
    path = tmp_path / "run.state"
    train(tiny_model(), utterances, config, objective=CTCObjective(),
          checkpoint_path=path, progress=False, stop_after_steps=2)
    original = path.read_bytes()
    state = torch.load(path, weights_only=True)
    weights, biases = state["optimizer"]["param_groups"]
    weights["base_lr"], weights["betas"], weights["weight_decay"] = 1e-2, (0.5, 0.9), 0.5
    biases["eps"], biases["lr"] = 1e-3, 1.0
    torch.save(state, path)
    with pytest.raises(ResumeMismatchError) as refused:
        train(tiny_model(), utterances, config, objective=CTCObjective(),
              checkpoint_path=path, resume=True, progress=False)
    message = str(refused.value)
    for expected in ("tensors) base_lr: stored 0.01, given 0.001", "betas: stored (0.5, 0.9), given (0.9, 0.999)",
                     "weight_decay: stored 0.5, given 0.01", "optimiser group 1 (", "eps: stored 0.001, given 1e-08",
                     "lr: stored 1.0, given 0.001"):
        assert expected in message, message
    assert message.count("optimiser group") == 5, message

    path.write_bytes(original)
    straight = tiny_model()
    train(straight, utterances, config, objective=CTCObjective(), progress=False)
    resumed = tiny_model(seed=3)
    assert train(resumed, utterances, config, objective=CTCObjective(),
                 checkpoint_path=path, resume=True, progress=False).steps_done == 4
    for (name, a), b in zip(state_of(straight).items(), state_of(resumed).values()):
        assert torch.equal(a, b), name


def test_feature_cache_is_keyed_on_the_audio_content(tmp_path):
    """Item 6 of issue 24: audio replaced with the same size and modification time (os.utime)
    gets new features, not the stored ones."""
    import os
    import soundfile
    utterances = tiny_corpus(tmp_path)
    cache = tmp_path / "cache"
    config = TrainConfig(steps=1, batch_size=3, lr=1e-3, save_every=0, feature_cache_dir=str(cache))
    train(tiny_model(), utterances, config, objective=CTCObjective(), progress=False)
    assert len(list(cache.glob("features-*.pt"))) == 1
    replaced = utterances[0].audio_path
    before = os.stat(replaced)
    samples, rate = soundfile.read(replaced, dtype="int16")
    soundfile.write(replaced, -samples, rate, subtype="PCM_16")          # other samples, same FLAC size
    os.utime(replaced, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(replaced)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    train(tiny_model(), utterances, config, objective=CTCObjective(), progress=False)
    assert len(list(cache.glob("features-*.pt"))) == 2
