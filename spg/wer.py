"""Word and character error rates, alignments, and the MAPSSWE significance test.

Everything here follows the conventions of jiwer 4.x with its default transforms,
so numbers agree with ``jiwer.wer`` / ``jiwer.cer`` to the last bit:

* Words (``wer_default``): every run of two or more whitespace characters becomes
  one space, leading/trailing whitespace is stripped, and the text is split on the
  space character ``" "``.  Quirk kept on purpose: a *single* tab or newline
  between two words is not a separator ("a\\tb" is one word), because jiwer only
  collapses runs of length >= 2 and then splits on " ".
* Characters (``cer_default``): leading/trailing whitespace is stripped and every
  remaining character counts, spaces included; inner runs of spaces are NOT
  collapsed.
* Corpus rates are micro-averaged: total errors / total reference tokens.
* Empty reference (total reference length 0): the "rate" is the number of
  inserted tokens (0.0 when the hypothesis is empty too).  This is jiwer's
  convention; it is not a proportion, but it never divides by zero and a
  non-zero value flags output on silence.

Alignment tie-breaking copies rapidfuzz's ``Levenshtein.editops`` (used by
jiwer): the common prefix and suffix are matched first, then the edit-distance
matrix of the remaining middle is traced back from the end, preferring a
deletion, then an insertion, then the diagonal (match/substitution).  The total
number of errors is the same for every optimal path; this rule only decides how
ties are split between S, D and I.

The module depends on the standard library and numpy only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import numpy as np

Unit = Literal["word", "char"]
OpName = Literal["equal", "sub", "del", "ins"]
AlignedOp = tuple[OpName, Union[str, None], Union[str, None]]
"""One alignment step: (operation, reference token or None, hypothesis token or None)."""

TextOrTexts = Union[str, Sequence[str]]

_WHITESPACE_RUN = re.compile(r"\s\s+")


# ----------------------------------------------------------------------------------
# Tokenisation (jiwer default transforms)
# ----------------------------------------------------------------------------------


def tokenize(text: str, unit: Unit = "word") -> list[str]:
    """Split ``text`` into tokens exactly as jiwer's default WER/CER transforms do."""
    if unit == "word":
        collapsed = _WHITESPACE_RUN.sub(" ", text).strip()
        return [word for word in collapsed.split(" ") if word]
    if unit == "char":
        return list(text.strip())
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


# ----------------------------------------------------------------------------------
# Error counts
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCounts:
    """Hits (H), substitutions (S), deletions (D) and insertions (I).

    Counts add up over a corpus: ``sum(per_utterance, ErrorCounts())``.
    """

    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def errors(self) -> int:
        """S + D + I."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def reference_length(self) -> int:
        """H + S + D: the number of reference tokens."""
        return self.hits + self.substitutions + self.deletions

    @property
    def rate(self) -> float:
        """errors / reference_length; for an empty reference, the insertion count (jiwer)."""
        if self.reference_length == 0:
            return float(self.insertions)
        return self.errors / self.reference_length

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(
            self.hits + other.hits,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )

    @classmethod
    def from_ops(cls, ops: Sequence[AlignedOp]) -> ErrorCounts:
        """Count the operations of one alignment."""
        names = [name for name, _, _ in ops]
        return cls(names.count("equal"), names.count("sub"), names.count("del"), names.count("ins"))


# ----------------------------------------------------------------------------------
# Levenshtein alignment
# ----------------------------------------------------------------------------------


def _edit_distance_matrix(reference: Sequence[str], hypothesis: Sequence[str]) -> np.ndarray:
    """Full (len(ref)+1) x (len(hyp)+1) Levenshtein matrix, unit costs.

    ``D[i, j]`` is the edit distance between ``reference[:i]`` and ``hypothesis[:j]``.
    Each row is computed with numpy: deletions and diagonal moves come from the
    previous row; insertions (moves along the row) are resolved with the identity
    ``min_k<=j (row[k] + j - k) = j + cumulative_min(row[k] - k)``.
    """
    token_ids: dict[str, int] = {}
    hyp_ids = np.array([token_ids.setdefault(t, len(token_ids)) for t in hypothesis], dtype=np.int64)
    n_ref, n_hyp = len(reference), len(hypothesis)
    columns = np.arange(n_hyp + 1)
    matrix = np.empty((n_ref + 1, n_hyp + 1), dtype=np.int64)
    matrix[0] = columns
    for i in range(1, n_ref + 1):
        substitution_cost = (hyp_ids != token_ids.get(reference[i - 1], -1)).astype(np.int64)
        previous = matrix[i - 1]
        row = np.empty(n_hyp + 1, dtype=np.int64)
        row[0] = i
        row[1:] = np.minimum(previous[1:] + 1, previous[:-1] + substitution_cost)
        matrix[i] = np.minimum.accumulate(row - columns) + columns
    return matrix


def levenshtein_align(reference: Sequence[str], hypothesis: Sequence[str]) -> list[AlignedOp]:
    """Minimum-edit alignment of two token sequences, tie-broken like rapidfuzz/jiwer.

    Returns one ``(op, ref_token, hyp_token)`` per step, in order, where op is
    "equal", "sub", "del" (ref token missing from hyp) or "ins" (extra hyp token).
    """
    n_ref, n_hyp = len(reference), len(hypothesis)
    prefix = 0
    while prefix < min(n_ref, n_hyp) and reference[prefix] == hypothesis[prefix]:
        prefix += 1
    suffix = 0
    while (
        suffix < min(n_ref, n_hyp) - prefix
        and reference[n_ref - 1 - suffix] == hypothesis[n_hyp - 1 - suffix]
    ):
        suffix += 1
    ref_core = reference[prefix : n_ref - suffix]
    hyp_core = hypothesis[prefix : n_hyp - suffix]

    distance = _edit_distance_matrix(ref_core, hyp_core)
    i, j = len(ref_core), len(hyp_core)
    backwards: list[AlignedOp] = []
    while i > 0 and j > 0:
        if distance[i, j] == distance[i - 1, j] + 1:  # deletion is optimal
            i -= 1
            backwards.append(("del", ref_core[i], None))
        elif distance[i, j - 1] == distance[i - 1, j - 1] - 1:  # insertion is optimal
            j -= 1
            backwards.append(("ins", None, hyp_core[j]))
        else:  # diagonal: match or substitution
            i, j = i - 1, j - 1
            op: OpName = "equal" if ref_core[i] == hyp_core[j] else "sub"
            backwards.append((op, ref_core[i], hyp_core[j]))
    while i > 0:
        i -= 1
        backwards.append(("del", ref_core[i], None))
    while j > 0:
        j -= 1
        backwards.append(("ins", None, hyp_core[j]))

    ops: list[AlignedOp] = [("equal", t, t) for t in reference[:prefix]]
    ops.extend(reversed(backwards))
    ops.extend(("equal", t, t) for t in reference[n_ref - suffix :])
    return ops


@dataclass(frozen=True)
class Alignment:
    """Alignment of one reference/hypothesis pair after tokenisation."""

    reference_tokens: list[str]
    hypothesis_tokens: list[str]
    ops: list[AlignedOp]
    counts: ErrorCounts


def align(reference: str, hypothesis: str, *, unit: Unit = "word") -> Alignment:
    """Tokenise (jiwer default transforms) and align one pair of strings."""
    ref_tokens, hyp_tokens = tokenize(reference, unit), tokenize(hypothesis, unit)
    ops = levenshtein_align(ref_tokens, hyp_tokens)
    return Alignment(ref_tokens, hyp_tokens, ops, ErrorCounts.from_ops(ops))


def format_alignment(reference: str, hypothesis: str, *, unit: Unit = "word") -> str:
    """Human-readable alignment in the style of jiwer's ``visualize_alignment``.

    Missing tokens are shown as asterisks; the third line marks S, D and I under
    the affected column.  Example::

        REF: the cat sat on the mat
        HYP: the cat sit on *** mat
                     S      D
        H=4 S=1 D=1 I=0 | WER = 2/6 = 33.33%
    """
    alignment = align(reference, hypothesis, unit=unit)
    separator = " " if unit == "word" else ""
    marker_for = {"equal": " ", "sub": "S", "del": "D", "ins": "I"}
    ref_cells, hyp_cells, marker_cells = [], [], []
    for op, ref_token, hyp_token in alignment.ops:
        width = max(len(ref_token or ""), len(hyp_token or ""))
        ref_cells.append((ref_token if ref_token is not None else "*" * width).ljust(width))
        hyp_cells.append((hyp_token if hyp_token is not None else "*" * width).ljust(width))
        marker_cells.append(marker_for[op].ljust(width))
    c = alignment.counts
    name = "WER" if unit == "word" else "CER"
    lines = [
        "REF: " + separator.join(ref_cells),
        "HYP: " + separator.join(hyp_cells),
        ("     " + separator.join(marker_cells)).rstrip(),
        f"H={c.hits} S={c.substitutions} D={c.deletions} I={c.insertions} | "
        f"{name} = {c.errors}/{c.reference_length} = {100 * c.rate:.2f}%",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Corpus error rates
# ----------------------------------------------------------------------------------


def _as_paired_lists(references: TextOrTexts, hypotheses: TextOrTexts) -> tuple[list[str], list[str]]:
    """Wrap single strings into lists and check that the two lists pair up."""
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(
            f"got {len(refs)} references but {len(hyps)} hypotheses; the lists must have equal length"
        )
    return refs, hyps


def error_counts(references: TextOrTexts, hypotheses: TextOrTexts, *, unit: Unit = "word") -> ErrorCounts:
    """Corpus totals of H/S/D/I over utterance pairs (one string or a list each)."""
    refs, hyps = _as_paired_lists(references, hypotheses)
    total = ErrorCounts()
    for ref, hyp in zip(refs, hyps):
        total = total + align(ref, hyp, unit=unit).counts
    return total


def wer(references: TextOrTexts, hypotheses: TextOrTexts) -> float:
    """Corpus word error rate, identical to ``jiwer.wer`` with default transforms."""
    return error_counts(references, hypotheses, unit="word").rate


def cer(references: TextOrTexts, hypotheses: TextOrTexts) -> float:
    """Corpus character error rate, identical to ``jiwer.cer`` (spaces count as characters)."""
    return error_counts(references, hypotheses, unit="char").rate


def corpus_scores(references: TextOrTexts, hypotheses: TextOrTexts) -> dict:
    """The figures the evaluation reports print: {"wer", "cer", "substitutions", "deletions",
    "insertions", "reference_words"} (the counts are the word-level ones)."""
    words = error_counts(references, hypotheses)
    return {"wer": words.rate, "cer": cer(references, hypotheses), "substitutions": words.substitutions,
            "deletions": words.deletions, "insertions": words.insertions, "reference_words": words.reference_length}


# ----------------------------------------------------------------------------------
# MAPSSWE significance test
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapssweResult:
    """Outcome of :func:`mapsswe`. Differences are (errors of A) - (errors of B)."""

    n_segments: int
    mean_difference: float
    std: float
    z: float
    p_value: float
    significant: bool
    verdict: str
    segment_errors: list[tuple[int, int]]
    """(errors of A, errors of B) for every kept segment, in corpus order."""


def _errors_by_position(ops: Sequence[AlignedOp], n_ref: int) -> tuple[list[int], list[int]]:
    """Per reference word: 1 if substituted/deleted; per gap 0..n_ref: number of insertions.

    Gap g lies just before reference word g (gap n_ref is after the last word).
    """
    word_errors = [0] * n_ref
    gap_insertions = [0] * (n_ref + 1)
    position = 0
    for op, _, _ in ops:
        if op == "ins":
            gap_insertions[position] += 1
        else:
            if op != "equal":
                word_errors[position] = 1
            position += 1
    return word_errors, gap_insertions


def _segment_errors(
    ops_a: Sequence[AlignedOp], ops_b: Sequence[AlignedOp], n_ref: int, min_good_run: int = 2
) -> list[tuple[int, int]]:
    """Split one utterance into MAPSSWE segments; return (errors A, errors B) per segment.

    A reference word is "good" when both systems recognise it correctly.  Good words
    form a run when no insertion (by either system) sits between them; runs of at
    least ``min_good_run`` good words are boundaries.  Everything between two
    boundaries (or an utterance edge) is a segment.  Segments with no errors in
    either system are dropped.
    """
    word_err_a, gap_ins_a = _errors_by_position(ops_a, n_ref)
    word_err_b, gap_ins_b = _errors_by_position(ops_b, n_ref)
    is_good = [word_err_a[k] == 0 and word_err_b[k] == 0 for k in range(n_ref)]
    gap_is_clean = [gap_ins_a[g] == 0 and gap_ins_b[g] == 0 for g in range(n_ref + 1)]

    # Label each good word with the length of the unbroken good run it belongs to.
    run_length = [0] * n_ref
    start = 0
    while start < n_ref:
        if not is_good[start]:
            start += 1
            continue
        end = start + 1
        while end < n_ref and is_good[end] and gap_is_clean[end]:
            end += 1
        for k in range(start, end):
            run_length[k] = end - start
        start = end
    is_boundary = [length >= min_good_run for length in run_length]

    segments: list[tuple[int, int]] = []
    errors_a = errors_b = 0
    for position in range(n_ref + 1):
        errors_a += gap_ins_a[position]
        errors_b += gap_ins_b[position]
        if position == n_ref:
            break
        if is_boundary[position]:
            if errors_a or errors_b:
                segments.append((errors_a, errors_b))
            errors_a = errors_b = 0
        else:
            errors_a += word_err_a[position]
            errors_b += word_err_b[position]
    if errors_a or errors_b:
        segments.append((errors_a, errors_b))
    return segments


def _two_sided_normal_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def mapsswe(
    references: Sequence[str],
    hypotheses_a: Sequence[str],
    hypotheses_b: Sequence[str],
    *,
    alpha: float = 0.05,
) -> MapssweResult:
    """Matched-Pairs Sentence-Segment Word Error test of system A against system B.

    Gillick, L. & Cox, S. (1989), "Some statistical issues in the comparison of speech
    recognition algorithms", ICASSP; implemented in NIST SCTK ``sc_stats`` (mtchprs.c).

    Algorithm:
      1. Align each system's hypothesis to the reference (word level, jiwer tokens).
      2. Cut every utterance into segments bounded by runs of >= 2 consecutive
         reference words that both systems got right (an insertion by either system
         breaks a run).  Errors (S, D, and I - an insertion belongs to the reference
         gap where it occurs) are summed per segment; segments where both systems
         are error-free are dropped.
      3. With d_k = errors_A - errors_B per segment, n segments, mean m and sample
         standard deviation s (divisor n - 1, as in SCTK): z = m / (s / sqrt(n)),
         two-sided p = erfc(|z| / sqrt(2)) under the normal approximation.

    Details the paper leaves open, and our choices:
      * Boundary words: SCTK includes the bounding correct words in the segments'
        reference counts.  They carry no errors, so z and p are unaffected; we do
        not report reference counts.
      * Trailing insertions: SCTK's loop stops at the end of system A's path, so an
        insertion by B after the last reference word can be dropped when A ends
        cleanly.  We count trailing insertions of both systems in the last segment,
        because ignoring errors depending on argument order is an artefact.
      * n < 2 segments (variance undefined) or all differences 0: z = 0, p = 1.0,
        not significant - there is no evidence of a difference.
      * Zero variance but non-zero mean (every segment differs by the same amount):
        SCTK sets z = 0; we return the limit z = +-inf, p = 0.0, since every
        segment favours the same system by the same margin.
      * Alignment ties follow jiwer/rapidfuzz, not SCTK's aligner, so segment
        boundaries can differ from sclite's on tied alignments.
    """
    refs, hyps_a = _as_paired_lists(references, hypotheses_a)
    _, hyps_b = _as_paired_lists(references, hypotheses_b)

    segment_errors: list[tuple[int, int]] = []
    for ref, hyp_a, hyp_b in zip(refs, hyps_a, hyps_b):
        ref_tokens = tokenize(ref, "word")
        ops_a = levenshtein_align(ref_tokens, tokenize(hyp_a, "word"))
        ops_b = levenshtein_align(ref_tokens, tokenize(hyp_b, "word"))
        segment_errors.extend(_segment_errors(ops_a, ops_b, len(ref_tokens)))

    differences = np.array([a - b for a, b in segment_errors], dtype=np.float64)
    n_segments = len(differences)
    mean = float(differences.mean()) if n_segments else 0.0
    std = float(differences.std(ddof=1)) if n_segments >= 2 else 0.0

    if n_segments < 2 or not differences.any():
        z, p_value = 0.0, 1.0
    elif std == 0.0:
        z, p_value = math.copysign(math.inf, mean), 0.0
    else:
        z = mean / (std / math.sqrt(n_segments))
        p_value = _two_sided_normal_p(z)

    significant = p_value < alpha
    if not significant:
        verdict = f"no significant difference (p={p_value:.3g})"
    elif mean > 0:
        verdict = f"A is significantly worse than B (p={p_value:.3g})"
    else:
        verdict = f"B is significantly worse than A (p={p_value:.3g})"
    return MapssweResult(n_segments, mean, std, z, p_value, significant, verdict, segment_errors)


# ----------------------------------------------------------------------------------
# Multiple comparisons
# ----------------------------------------------------------------------------------


def holm(p_values: Sequence[float], *, alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Holm's step-down correction of m p-values: (adjusted p-values, rejected at `alpha`).

    Holm, S. (1979), "A simple sequentially rejective multiple test procedure",
    Scandinavian Journal of Statistics 6(2). Sort the p-values p_(1) <= ... <= p_(m);
    the adjusted value of the i-th smallest is max_{j <= i} min(1, (m - j + 1) p_(j)),
    and a test is rejected when its adjusted value is <= alpha. This controls the
    family-wise error rate at alpha with no assumption on how the tests depend on each
    other (the comparisons of one table share their references and often a system). The
    adjusted values are returned in the input order; ties keep their input order.
    """
    p = [float(value) for value in p_values]
    if any(not 0.0 <= value <= 1.0 for value in p):
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted, [value <= alpha for value in adjusted]
