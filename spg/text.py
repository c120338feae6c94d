"""English text normalisation for WER of a model that writes cased, punctuated text (Whisper).
(The character-vocabulary CTC models have their own, `spg.data.normalize_text`.)"""

from __future__ import annotations

import re

__all__ = ["normalize_english", "spell_number"]

_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell_number(number: int) -> str:
    """0-99 in words: 7 -> "seven", 42 -> "forty two" (the hyphen of "forty-two" is a space,
    as `normalize_english` writes it)."""
    if not 0 <= number <= 99:
        raise ValueError(f"spell_number covers 0-99, got {number}")
    if number < 20:
        return _ONES[number]
    return _TENS[number // 10] + ("" if number % 10 == 0 else " " + _ONES[number % 10])


def normalize_english(text: str) -> str:
    """A small English normaliser for WER on read speech (our choice, far simpler than
    openai's EnglishTextNormalizer): lowercase, expand mr/mrs/dr/st, hyphens and dashes to
    spaces, drop every character other than letters, digits, apostrophes and spaces, collapse
    whitespace, and spell out whole numbers 0-99 ("10 of clubs" -> "ten of clubs": our
    references spell numbers, Whisper writes small ones as digits). Larger numbers are left
    as written ("1984" has several spoken forms)."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"[-–—]", " ", text)
    text = re.sub(r"[^\w' ]+", " ", text).replace("_", " ")
    words = [_ABBREVIATIONS.get(word, word) for word in text.split()]
    words = [word.strip("'") for word in words if word.strip("'")]
    return " ".join(spell_number(int(word)) if word.isdecimal() and word.isascii() and len(word) <= 2 else word
                    for word in words)
