"""Whisper's byte-level BPE tokenizer (GPT-2 style, encode and decode), read from a
`tokenizer.json` by hand: no `tokenizers` or `transformers` needed."""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Optional, Sequence, Union

from spg.checkpoint import CheckpointError, read_json, short_repr

__all__ = ["WhisperTokenizer", "bytes_to_unicode", "gpt2_pre_tokenizer", "merge_ranks", "check_vocab",
           "check_added_tokens", "load_tokenizer"]

PathLike = Union[str, os.PathLike]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: the 188 printable Latin-1 bytes
    map to themselves, the other 68 to chr(256 + n) in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


@functools.lru_cache(maxsize=None)
def gpt2_pre_tokenizer() -> re.Pattern:
    r"""GPT-2's pre-tokenisation pattern (the ByteLevel pre-tokenizer of `tokenizers`)
        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    in Python `re`, which has no \p{...}. Python's \w is exactly \p{L}, \p{N} and "_", and its
    \d is \p{Nd} only, so the other numbers (categories Nl and No: ², ½, Ⅻ, ①; the characters
    that are numeric but neither decimal nor letters) are listed explicitly:
        letters = [^\W\d_<Nl/No>]    numbers = [\d<Nl/No>]    others = [^\s\w]|[_\x1c-\x1f]
    and whitespace is [^\S\x1c-\x1f]: `re`'s \s includes U+001C..U+001F, Oniguruma's (used by
    `tokenizers`) does not. Built once, on first use (a scan of the code points, ~0.1 s).
    Checked against `tokenizers` 0.23 on every code point: the pieces agree for all characters
    that Python's `unicodedata` knows; they differ only for characters assigned after that
    Unicode version (14.0 in Python 3.11), which `re` takes as "others" and Oniguruma, on a
    newer Unicode, may take as letters or numbers."""
    other_numbers = "".join(c for c in map(chr, range(0x110000))
                            if c.isnumeric() and not c.isdecimal() and not c.isalpha())
    letters, numbers = rf"[^\W\d_{other_numbers}]", rf"[\d{other_numbers}]"
    others, space, not_space = r"(?:[^\s\w]|[_\x1c-\x1f])", r"[^\S\x1c-\x1f]", r"[\S\x1c-\x1f]"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?{letters}+| ?{numbers}+| ?{others}+"
                      rf"|{space}+(?!{not_space})|{space}+")


def merge_ranks(raw: object, source: str = "merges") -> dict[tuple[str, str], int]:
    """BPE merges as {(left, right): rank}, from tokenizer.json's `model.merges`: strings
    "left right" (one space) or, in newer files, [left, right] pairs."""
    if not isinstance(raw, list):
        raise CheckpointError(f"{source}: merges must be a list, not {type(raw).__name__}")
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(raw):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise CheckpointError(f"{source}: merge {rank} is {short_repr(merge)}; expected 'left right' or "
                                  "[left, right]")
        ranks[(pair[0], pair[1])] = rank
    return ranks


def _is_id(value: object) -> bool:
    return type(value) is int and value >= 0


def check_vocab(vocab: object, source: str) -> dict[str, int]:
    """`vocab` if it is {token: id} with string tokens and non-negative integer ids, else
    CheckpointError naming the first bad entry."""
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{source}: vocab is a {type(vocab).__name__}; expected an object {{token: id}}")
    for token, token_id in vocab.items():
        if not (isinstance(token, str) and _is_id(token_id)):
            raise CheckpointError(f"{source}: vocab entry {short_repr(token)}: {short_repr(token_id)}; expected a "
                                  "string token"
                                  " with a non-negative integer id")
    return vocab


def check_added_tokens(added_tokens: object, source: str) -> list[dict]:
    """`added_tokens` if it is a list of {"id": non-negative int, "content": str, "special":
    bool (optional)} (further fields, such as lstrip, are allowed and ignored), else
    CheckpointError naming the first bad entry."""
    if not isinstance(added_tokens, list):
        raise CheckpointError(f"{source}: added_tokens is a {type(added_tokens).__name__}; expected a list")
    for i, added in enumerate(added_tokens):
        if not (isinstance(added, dict) and _is_id(added.get("id")) and isinstance(added.get("content"), str)
                and isinstance(added.get("special", False), bool)):
            raise CheckpointError(f"{source}: added_tokens[{i}] is {short_repr(added)}; expected {{'id': non-negative "
                                  "integer, 'content': string, 'special': true or false}")
    return added_tokens


class WhisperTokenizer:
    """Whisper's byte-level BPE tokenizer (GPT-2 style), read from a `tokenizer.json`.

    encode() reproduces `tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids`:
    added tokens (<|endoftext|>, ...) written literally in the text become their ids (leftmost,
    longest first; their lstrip/rstrip/single_word options are ignored, Whisper sets none), the
    rest is cut by the GPT-2 pattern (`gpt2_pre_tokenizer`), each piece's UTF-8 bytes are
    mapped through the GPT-2 byte table and merged by BPE, lowest rank first. No prefix space
    and no special tokens are added.

    decode() reproduces `tokenizers.Tokenizer.decode`: each id becomes its token string (added
    tokens first, then the BPE vocabulary; unknown ids are dropped), special tokens are
    skipped when asked, and the ByteLevel decoder maps each token's characters back to bytes
    through the GPT-2 table (a token with a character outside the table contributes its UTF-8
    bytes unchanged); the bytes are decoded as UTF-8 with U+FFFD for invalid sequences.

    merges: {(left, right): rank} (see `merge_ranks`); None for a tokenizer saved without
    them: decoding still works, encoding raises."""

    def __init__(self, vocab: dict[str, int], added_tokens: Sequence[dict],
                 merges: Optional[dict[tuple[str, str], int]] = None):
        self.vocab = dict(vocab)
        self.added_tokens = [{"id": int(a["id"]), "content": a["content"], "special": bool(a.get("special", False))}
                             for a in added_tokens]
        self.merges = None if merges is None else dict(merges)
        self.id_to_token: dict[int, str] = {i: token for token, i in vocab.items()}
        self.token_ids: dict[str, int] = dict(vocab)
        self.special_tokens: set[str] = set()
        for added in added_tokens:
            self.id_to_token[int(added["id"])] = added["content"]
            self.token_ids[added["content"]] = int(added["id"])
            if added.get("special", False):
                self.special_tokens.add(added["content"])
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        # Added tokens in the text, longest first so that the alternation finds the longest match.
        contents = sorted({a["content"] for a in self.added_tokens if a["content"]}, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._cache: dict[str, list[int]] = {}          # pre-tokenized piece -> ids

    @classmethod
    def from_file(cls, path: PathLike) -> "WhisperTokenizer":
        """Read a `tokenizer.json`, refusing (CheckpointError naming the file and the field)
        anything but a BPE model with a {token: id} vocab, [left, right] or "left right"
        merges, added tokens {"id", "content", "special"} and a ByteLevel decoder."""
        path = os.fspath(path)
        data = read_json(path)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or "vocab" not in model:
            raise CheckpointError(f"{path}: expected a tokenizer.json with a BPE model and its vocab")
        decoder = data.get("decoder")
        decoder_type = decoder.get("type") if isinstance(decoder, dict) else None
        if decoder_type != "ByteLevel":
            raise CheckpointError(f"{path}: decoder type {short_repr(decoder_type)} is not supported (ByteLevel only)")
        vocab = check_vocab(model["vocab"], f"{path}: model")
        added_tokens = check_added_tokens(data.get("added_tokens") or [], path)
        merges = None if model.get("merges") is None else merge_ranks(model["merges"], f"{path}: model.merges")
        return cls(vocab, added_tokens, merges)

    def to_dict(self) -> dict:
        """Plain data that `from_dict` turns back into this tokenizer (saved with a model):
        vocab, added_tokens and, when known, merges as [left, right] pairs in rank order."""
        values = {"vocab": dict(self.vocab), "added_tokens": [dict(a) for a in self.added_tokens]}
        if self.merges is not None:
            values["merges"] = [list(pair) for pair in sorted(self.merges, key=self.merges.__getitem__)]
        return values

    @classmethod
    def from_dict(cls, values: dict, source: str = "tokenizer") -> "WhisperTokenizer":
        """The inverse of `to_dict`; dicts saved before merges were kept (no "merges") still
        load, as a decoding-only tokenizer."""
        if not (isinstance(values, dict) and "vocab" in values and "added_tokens" in values):
            raise CheckpointError(f"{source}: expected {{'vocab': {{token: id}}, 'added_tokens': [...]}}")
        vocab, added_tokens = check_vocab(values["vocab"], source), check_added_tokens(values["added_tokens"], source)
        merges = None if values.get("merges") is None else merge_ranks(values["merges"], f"{source}: 'merges'")
        return cls(vocab, added_tokens, merges)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.token_ids.get(token)

    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenized piece: its bytes as GPT-2 characters, then, while some
        adjacent pair has a merge, every occurrence (left to right) of the pair with the lowest
        rank is joined. Symbols missing from the vocab are dropped, as `tokenizers` does
        without an unk token (never happens when the vocab has all 256 byte characters)."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        ranks = self.merges or {}
        word = [self.byte_encoder[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, math.inf))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.vocab[symbol] for symbol in word if symbol in self.vocab]
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added (see the class docstring)."""
        if self.merges is None:
            raise ValueError("this tokenizer has no BPE merges (its tokenizer.json or checkpoint had none), "
                             "so it can decode but not encode")
        ids: list[int] = []
        start = 0
        for match in (self._added_pattern.finditer(text) if self._added_pattern else ()):
            ids += self._encode_ordinary(text[start:match.start()])
            ids.append(self.token_ids[match.group()])
            start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text: str) -> list[int]:
        """encode() of text without added tokens: GPT-2 pre-tokenisation, then BPE per piece."""
        return [i for piece in gpt2_pre_tokenizer().findall(text) for i in self._bpe(piece)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytearray()
        for i in ids:
            token = self.id_to_token.get(int(i))
            if token is None or (skip_special_tokens and token in self.special_tokens):
                continue
            if all(char in self.byte_decoder for char in token):
                data.extend(self.byte_decoder[char] for char in token)
            else:
                data.extend(token.encode("utf-8"))
        return data.decode("utf-8", errors="replace")


def load_tokenizer(folder: PathLike) -> WhisperTokenizer:
    """The tokenizer of a model folder (HF or CTranslate2): its tokenizer.json."""
    path = os.path.join(os.fspath(folder), "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no tokenizer.json")
    return WhisperTokenizer.from_file(path)
