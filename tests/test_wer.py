"""Tests for spg.wer: jiwer is the reference for WER/CER; MAPSSWE is checked by hand."""

import math
import random

import jiwer
import pytest

from spg.wer import (
    ErrorCounts,
    align,
    cer,
    error_counts,
    format_alignment,
    holm,
    levenshtein_align,
    mapsswe,
    tokenize,
    wer,
)

VOCAB = ["the", "a", "cat", "sat", "on", "mat"]  # small, so alignments have many ties
SEPARATORS = [" ", " ", " ", "  ", "   ", " \t ", "\n "]  # extra spaces and whitespace runs


def _random_sentence(rng: random.Random) -> str:
    words = [rng.choice(VOCAB) for _ in range(rng.randint(0, 10))]
    text = rng.choice(["", "", " ", "  "])
    for word in words:
        text += word + rng.choice(SEPARATORS)
    return text


@pytest.fixture(scope="module")
def random_pairs() -> list[tuple[str, str]]:
    rng = random.Random(1234)
    return [(_random_sentence(rng), _random_sentence(rng)) for _ in range(1000)]


def _jiwer_counts(output) -> tuple[int, int, int, int]:
    return output.hits, output.substitutions, output.deletions, output.insertions


def _our_counts(counts: ErrorCounts) -> tuple[int, int, int, int]:
    return counts.hits, counts.substitutions, counts.deletions, counts.insertions


# ----------------------------------------------------------------------------------
# Agreement with jiwer on random data
# ----------------------------------------------------------------------------------


def test_per_pair_rates_and_counts_match_jiwer(random_pairs):
    assert sum(not r.strip() for r, _ in random_pairs) > 10  # empty references are exercised
    for ref, hyp in random_pairs:
        assert abs(wer(ref, hyp) - jiwer.wer(ref, hyp)) < 1e-12
        assert abs(cer(ref, hyp) - jiwer.cer(ref, hyp)) < 1e-12
        words = jiwer.process_words(ref, hyp)
        chars = jiwer.process_characters(ref, hyp)
        assert _our_counts(align(ref, hyp, unit="word").counts) == _jiwer_counts(words)
        assert _our_counts(align(ref, hyp, unit="char").counts) == _jiwer_counts(chars)


def test_corpus_rates_and_counts_match_jiwer(random_pairs):
    refs = [r for r, _ in random_pairs]
    hyps = [h for _, h in random_pairs]
    assert abs(wer(refs, hyps) - jiwer.wer(refs, hyps)) < 1e-12
    assert abs(cer(refs, hyps) - jiwer.cer(refs, hyps)) < 1e-12
    assert _our_counts(error_counts(refs, hyps)) == _jiwer_counts(jiwer.process_words(refs, hyps))
    assert _our_counts(error_counts(refs, hyps, unit="char")) == _jiwer_counts(
        jiwer.process_characters(refs, hyps)
    )
    # Counts add up over utterances (micro-average), and the sum matches the corpus call.
    summed = sum((align(r, h).counts for r, h in random_pairs[:50]), ErrorCounts())
    assert summed == error_counts(refs[:50], hyps[:50])


def test_alignment_ops_are_consistent_with_tokens(random_pairs):
    for ref, hyp in random_pairs[:200]:
        result = align(ref, hyp)
        assert [r for _, r, _ in result.ops if r is not None] == result.reference_tokens
        assert [h for _, _, h in result.ops if h is not None] == result.hypothesis_tokens
        for op, r, h in result.ops:
            assert (op == "equal") == (r is not None and r == h)


# ----------------------------------------------------------------------------------
# Tokenisation quirks and edge cases (jiwer 4.0 raises for none of them)
# ----------------------------------------------------------------------------------


def test_default_transforms_match_jiwer():
    assert tokenize("  a   b \t c ") == ["a", "b", "c"]
    assert tokenize("a\tb") == ["a\tb"]  # a single tab is not a word separator in jiwer
    assert wer("a\tb", "a b") == jiwer.wer("a\tb", "a b") == 2.0
    assert tokenize(" a  b ", unit="char") == ["a", " ", " ", "b"]  # inner spaces kept for CER
    assert cer(" a  b ", "a b") == jiwer.cer(" a  b ", "a b") == 0.25


@pytest.mark.parametrize(
    "ref, hyp",
    [("", "a b"), ("", ""), ("  ", " "), ("a b", ""), (["", ""], ["a", ""]), (["", "x y"], ["a", ""])],
)
def test_empty_edge_cases_match_jiwer(ref, hyp):
    assert wer(ref, hyp) == jiwer.wer(ref, hyp)
    assert cer(ref, hyp) == jiwer.cer(ref, hyp)


def test_empty_reference_rate_is_insertion_count():
    assert wer("", "a b") == 2.0  # jiwer convention: not a proportion
    assert cer("", "a b") == 3.0  # "a", " ", "b"
    assert wer("", "") == 0.0
    assert wer("a b", "") == 1.0
    assert wer([], []) == jiwer.wer([], []) == 0.0


def test_mismatched_lengths_raise_with_both_lengths():
    with pytest.raises(ValueError, match=r"3 references but 2 hypotheses"):
        wer(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError):
        jiwer.wer(["a", "b", "c"], ["a", "b"])


# ----------------------------------------------------------------------------------
# Hand-worked cases
# ----------------------------------------------------------------------------------


def test_hand_worked_word_example():
    ref, hyp = "the cat sat on the mat", "the cat sit on mat"
    counts = error_counts(ref, hyp)
    assert counts == ErrorCounts(hits=4, substitutions=1, deletions=1, insertions=0)
    assert counts.errors == 2 and counts.reference_length == 6
    assert wer(ref, hyp) == 2 / 6
    assert align(ref, hyp).ops == [
        ("equal", "the", "the"),
        ("equal", "cat", "cat"),
        ("sub", "sat", "sit"),
        ("equal", "on", "on"),
        ("del", "the", None),
        ("equal", "mat", "mat"),
    ]
    assert levenshtein_align(["a"], ["a", "b"]) == [("equal", "a", "a"), ("ins", None, "b")]


def test_format_alignment_markers():
    text = format_alignment("the cat sat on the mat", "the cat sit on mat")
    lines = text.splitlines()
    assert lines[0] == "REF: the cat sat on the mat"
    assert lines[1] == "HYP: the cat sit on *** mat"
    assert lines[2] == "             S      D"
    assert "H=4 S=1 D=1 I=0" in lines[3] and "WER = 2/6 = 33.33%" in lines[3]
    chars = format_alignment("abc d", "abd  d", unit="char")
    assert chars.splitlines()[:3] == ["REF: ab*c d", "HYP: abd  d", "       IS"]
    assert "CER = 2/5" in chars


def test_error_counts_arithmetic():
    a = ErrorCounts(hits=3, substitutions=1, deletions=0, insertions=2)
    b = ErrorCounts(hits=1, substitutions=0, deletions=1, insertions=0)
    total = a + b
    assert total == ErrorCounts(4, 1, 1, 2)
    assert total.errors == 4 and total.reference_length == 6 and total.rate == 4 / 6
    assert ErrorCounts(insertions=3).rate == 3.0 and ErrorCounts().rate == 0.0


# ----------------------------------------------------------------------------------
# MAPSSWE
# ----------------------------------------------------------------------------------


def _normal_two_sided_p(z: float) -> float:
    return 2.0 * (1.0 - 0.5 * (1.0 + math.erf(abs(z) / math.sqrt(2.0))))


def test_mapsswe_hand_worked():
    refs = [
        "one two three four five six seven eight",
        "the cat sat on the mat",
        "please call stella ask her",
        "good morning everyone",
    ]
    hyps_a = [
        "one two tree four five six seven eight",
        "the cat sat on the mat",
        "please please call stella ask her",
        "good morning every one",
    ]
    hyps_b = [
        "one two three four five sex seven ate",
        "the cat sat on mat",
        "please call stella ask her",
        "good morning everyone",
    ]
    # Segments (boundaries = runs of >= 2 words both systems got right, unbroken by insertions):
    #  utt1: [one two] | three: A sub            -> (A=1, B=0), d=+1
    #        [four five] | six seven eight: B sub six, B sub eight (seven alone is no boundary)
    #                                             -> (0, 2), d=-2
    #  utt2: [the cat sat on] | the mat: B deletes "the"    -> (0, 1), d=-1
    #  utt3: please <A inserts "please"> [call stella ask her]: the insertion breaks the
    #        run, so "please" + insertion form a segment     -> (1, 0), d=+1
    #  utt4: [good morning] | A: ins "every", sub everyone->one -> (2, 0), d=+2
    # d = [1, -2, -1, 1, 2]: n=5, mean=0.2, squared deviations 0.64+4.84+1.44+0.64+3.24=10.8,
    # variance=10.8/4=2.7, z = 0.2 / sqrt(2.7/5) = 0.27217, p = 2(1 - Phi(z)) = 0.7855
    result = mapsswe(refs, hyps_a, hyps_b)
    assert result.segment_errors == [(1, 0), (0, 2), (0, 1), (1, 0), (2, 0)]
    assert result.n_segments == 5
    assert result.mean_difference == pytest.approx(0.2, abs=1e-12)
    assert result.std == pytest.approx(math.sqrt(2.7), abs=1e-12)
    expected_z = 0.2 / math.sqrt(2.7 / 5)
    assert result.z == pytest.approx(expected_z, abs=1e-12)
    assert result.z == pytest.approx(0.27217, abs=1e-5)
    assert result.p_value == pytest.approx(_normal_two_sided_p(expected_z), abs=1e-12)
    assert result.p_value == pytest.approx(0.7855, abs=1e-4)
    assert not result.significant
    assert result.verdict == "no significant difference (p=0.785)"


def test_mapsswe_identical_systems():
    refs = ["the cat sat on the mat", "a b c d e f", "one two three"]
    hyps = ["the cat sit on mat", "a x c d e f g", "one two three"]
    # Segments: "sat->sit on del(the)" (2, 2); "a x" (1, 1); trailing insertion "g" (1, 1).
    result = mapsswe(refs, hyps, hyps)
    assert result.n_segments == 3 and result.segment_errors == [(2, 2), (1, 1), (1, 1)]
    assert result.mean_difference == 0.0 and result.z == 0.0
    assert result.p_value == 1.0 and not result.significant
    assert result.verdict.startswith("no significant difference")


def test_mapsswe_clearly_worse_system():
    rng = random.Random(7)
    refs, hyps_a, hyps_b = [], [], []
    for k in range(40):
        words = [f"w{rng.randint(0, 99)}" for _ in range(12)]
        worse = list(words)
        worse[3] = "oops"  # one substitution in every utterance ...
        if k % 2:
            worse[8] = "oops"  # ... and a second, separate segment in every other one
        refs.append(" ".join(words))
        hyps_a.append(" ".join(words))
        hyps_b.append(" ".join(worse))
    result = mapsswe(refs, hyps_a, hyps_b)
    assert result.n_segments == 60  # 40 + 20 segments, each d = -1
    # All differences are -1: zero variance, non-zero mean -> documented limit z=-inf, p=0.
    assert result.z == -math.inf and result.p_value == 0.0 and result.significant
    assert result.verdict.startswith("B is significantly worse than A")

    # Make B's errors vary (1 or 2 adjacent errors per segment) so the variance is non-zero.
    hyps_b = [h.replace("oops", "oops oops", 1) if k % 3 == 0 else h for k, h in enumerate(hyps_b)]
    result = mapsswe(refs, hyps_a, hyps_b)
    diffs = [a - b for a, b in result.segment_errors]
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    assert result.z == pytest.approx(mean / (std / math.sqrt(len(diffs))), abs=1e-9)
    assert result.p_value < 1e-6 and result.significant
    assert result.verdict.startswith("B is significantly worse than A")
    assert mapsswe(refs, hyps_b, hyps_a).verdict.startswith("A is significantly worse than B")


def test_mapsswe_degenerate_inputs():
    # No errors anywhere: zero segments.
    empty = mapsswe(["a b c"], ["a b c"], ["a b c"])
    assert empty.n_segments == 0 and empty.p_value == 1.0 and not empty.significant
    # One segment (a trailing insertion by B is counted): variance undefined -> p = 1.
    single = mapsswe(["a b c"], ["a b c"], ["a b c d"])
    assert single.segment_errors == [(0, 1)] and single.p_value == 1.0 and single.std == 0.0
    with pytest.raises(ValueError):
        mapsswe(["a", "b"], ["a"], ["a", "b"])


def test_holm_hand_worked():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> max(0.06, 0.04)
    adjusted, rejected = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rejected == [True, False, False, True]
    assert holm([0.6, 0.9]) == ([1.0, 1.0], [False, False])      # capped at 1
    assert holm([]) == ([], [])
    with pytest.raises(ValueError, match="p-values"):
        holm([0.5, 1.5])


def test_holm_matches_the_sequential_procedure():
    """Holm's definition: walk the sorted p-values, reject while p_(i) <= alpha / (m - i + 1)."""
    rng = random.Random(3)
    for _ in range(300):
        m = rng.randint(1, 12)
        p = [rng.choice([rng.random(), rng.random() ** 6, 0.0, 1.0]) for _ in range(m)]
        expected = [False] * m
        for i, index in enumerate(sorted(range(m), key=lambda k: p[k])):
            if p[index] > 0.05 / (m - i):
                break
            expected[index] = True
        adjusted, rejected = holm(p, alpha=0.05)
        assert rejected == expected
        assert all(a >= q for a, q in zip(adjusted, p))                    # never below the raw p
        assert all(a <= min(1.0, m * q) + 1e-15 for a, q in zip(adjusted, p))   # never above Bonferroni
