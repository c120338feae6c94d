"""The LibriSpeech-layout reader, bad-input handling, tokenising and batching."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import write_corpus

from spg.data import (DataError, AudioCache, collate, decode_ids, encode_text, length_sorted_batches,
                      normalize_waveform, read_audio, read_corpus)


def test_reader_indexes_every_line(tmp_path):
    write_corpus(tmp_path, "dev", {"0000": ("HELLO WORLD", 0.5), "0001": ("IT'S  A   TEST", 0.25)})
    write_corpus(tmp_path, "dev", {"0000": ("ANOTHER SPEAKER", 0.3)}, speaker="20", chapter="7")
    utterances = read_corpus(tmp_path, "dev")
    assert [u.id for u in utterances] == ["19-198-0000", "19-198-0001", "20-7-0000"]
    assert utterances[1].transcript == "IT'S A TEST"          # white space collapsed
    assert utterances[0].num_samples == 8000 and utterances[2].num_samples == 4800
    audio = read_audio(utterances[0])
    assert audio.dtype == np.float32 and audio.shape == (8000,)


def test_text_round_trip():
    ids = encode_text("it's a test")
    assert decode_ids(ids) == "IT'S A TEST"
    assert ids[2] == 27 and ids[4] == 4   # "'" is token 27, the space becomes "|" (4)


def test_missing_split_names_folder(tmp_path):
    write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    with pytest.raises(DataError, match="test-clean.*available.*dev"):
        read_corpus(tmp_path, "test-clean")


def test_transcript_line_without_audio(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    with open(folder / "19-198.trans.txt", "a") as stream:
        stream.write("19-198-0001 NO AUDIO HERE\n")
    with pytest.raises(DataError, match=r"19-198\.trans\.txt:2.*19-198-0001.*no audio file"):
        read_corpus(tmp_path, "dev")


def test_characters_outside_vocabulary(tmp_path):
    write_corpus(tmp_path, "dev", {"0000": ("COST 5 DOLLARS!", 0.1)})
    with pytest.raises(DataError, match=r"19-198\.trans\.txt:1.*'!5'"):
        read_corpus(tmp_path, "dev")


def test_unreadable_audio(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    (folder / "19-198-0000.flac").write_bytes(b"not a flac file at all")
    with pytest.raises(DataError, match=r"cannot read audio file .*19-198-0000\.flac"):
        read_corpus(tmp_path, "dev")


def test_wrong_sample_rate_is_resampled_and_reported(tmp_path):
    write_corpus(tmp_path, "dev", {"0000": ("HI", 0.5)}, sample_rate=8000)
    with pytest.warns(UserWarning, match=r"1 file\(s\) resampled.*8000 Hz"):
        utterances = read_corpus(tmp_path, "dev")
    assert utterances[0].num_samples == 8000
    assert read_audio(utterances[0]).shape == (8000,)


def test_multichannel_is_mixed_down_and_reported(tmp_path):
    folder = tmp_path / "dev" / "1" / "2"
    folder.mkdir(parents=True)
    left = np.full(1600, 0.25, dtype=np.float32)
    right = np.full(1600, -0.125, dtype=np.float32)
    soundfile.write(folder / "1-2-0000.flac", np.stack([left, right], 1), 16000, subtype="PCM_16")
    (folder / "1-2.trans.txt").write_text("1-2-0000 HI\n")
    with pytest.warns(UserWarning, match=r"mixed down.*2 channels"):
        utterances = read_corpus(tmp_path, "dev")
    np.testing.assert_allclose(read_audio(utterances[0]), 0.0625, atol=1e-4)


def test_clean_corpus_gives_no_warning(tmp_path):
    write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_corpus(tmp_path, "dev")


def test_batches_cover_every_utterance_once_and_respect_limits(tmp_path):
    items = {f"{i:04d}": ("A B", 0.1 + 0.05 * (i % 7)) for i in range(23)}
    write_corpus(tmp_path, "train", items)
    utterances = read_corpus(tmp_path, "train")
    batches = length_sorted_batches(utterances, batch_size=4, shuffle=True, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert all(len(b) <= 4 for b in batches)
    assert batches == length_sorted_batches(utterances, batch_size=4, shuffle=True, seed=3)
    # inside a batch lengths are sorted, so padding is small
    for batch in batches:
        lengths = [utterances[i].num_samples for i in batch]
        assert lengths == sorted(lengths)
    limited = length_sorted_batches(utterances, batch_size=100, max_batch_seconds=1.0)
    for batch in limited:
        longest = max(utterances[i].num_samples for i in batch)
        assert len(batch) == 1 or longest * len(batch) / 16000 <= 1.0


def test_collate_padding_round_trip(tmp_path):
    write_corpus(tmp_path, "dev", {"0000": ("HELLO", 0.3), "0001": ("HI THERE", 0.2)})
    utterances = read_corpus(tmp_path, "dev")
    audio = AudioCache(utterances)
    batch = audio.batch([0, 1], normalize=False)
    assert batch.waveforms.shape == (2, 4800)
    assert batch.lengths.tolist() == [4800, 3200]
    for row in range(2):
        original = read_audio(utterances[row])
        np.testing.assert_allclose(batch.waveforms[row, :batch.lengths[row]].numpy(), original, atol=1 / 32768)
        assert torch.all(batch.waveforms[row, batch.lengths[row]:] == 0)
    assert batch.target_lengths.tolist() == [5, 8]
    assert decode_ids(batch.targets[:5].tolist()) == "HELLO"
    assert decode_ids(batch.targets[5:].tolist()) == "HI THERE"

    normalised = audio.batch([0, 1], normalize=True)
    valid = normalised.waveforms[1, :3200]
    assert abs(float(valid.mean())) < 1e-4 and abs(float(valid.std(unbiased=False)) - 1) < 1e-3
    assert torch.all(normalised.waveforms[1, 3200:] == 0)


def test_normalize_waveform_matches_hf_feature_extractor():
    transformers = pytest.importorskip("transformers")
    waveform = np.random.default_rng(1).standard_normal(5000).astype(np.float32) * 0.3 + 0.1
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
    expected = extractor(waveform, sampling_rate=16000).input_values[0]
    np.testing.assert_allclose(normalize_waveform(waveform), expected, atol=1e-5)
