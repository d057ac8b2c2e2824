"""The most characters of input text one token can stand for, where a tokenizer's pipeline makes that bounded.

A megabyte prompt sent to a model with a 4K context window is refused from its length alone (at least
len(text) / max_chars tokens) instead of being tokenized: the encode itself runs without the GIL, but turning a
million-token result into a list and freeing it hold the GIL for 100-200 ms, a stall of every Python thread, the
event loop included.

Invariant: a bound is returned only where it is sound, i.e. where every character of the input ends up covered by a
token that spans at most that many characters of it:
- the model is BPE and never drops or fuses unknown characters (byte-level alphabet, byte fallback, or an unk token
  without fuse_unk); WordPiece, Unigram and WordLevel map a whole unknown word to one token and get no bound;
- the normalizer only maps characters one to one or adds some (Prepend, Replace of a single character, Lowercase),
  or composes them (NFC: a composed character stands for at most 4 code points of its decomposition);
- the pre-tokenizer removes nothing (ByteLevel, Metaspace, Digits, Punctuation, Split that keeps its matches).
Anything else (an unknown component, a Split that removes, WhitespaceSplit) gives None: no early refusal.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["max_chars_per_token"]

# NFC composes up to 4 code points (a base and up to 3 marks, e.g. U+1F87) into one character
_NFC_COMPOSITION = 4
_KEEPING_NORMALIZERS = frozenset({"Prepend", "Lowercase"})  # Strip and StripAccents drop characters
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation"})
_BYTE_LEVEL_ALPHABET = 256


def max_chars_per_token(backend: Any) -> int | None:
    """For a `tokenizers.Tokenizer`: an upper bound on the input characters any one token covers, or None."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _pre_tokenizer_keeps_all(spec.get("pre_tokenizer")):
        return None
    if not _bpe_covers_every_character(model, spec.get("pre_tokenizer")):
        return None
    factor = _normalizer_factor(spec.get("normalizer"))
    if factor is None:
        return None
    longest = max((len(token) for token in model.get("vocab") or {}), default=1)
    added = max((len(t.get("content", "")) for t in spec.get("added_tokens") or []), default=1)
    return max(longest, added, 1) * factor


def _components(spec: dict | None) -> list[dict]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        key = "normalizers" if "normalizers" in spec else "pretokenizers"
        return [c for part in spec.get(key) or [] for c in _components(part)]
    return [spec]


def _pre_tokenizer_keeps_all(spec: dict | None) -> bool:
    for part in _components(spec):
        kind = part.get("type")
        if kind == "Split" and part.get("behavior") != "Removed":
            continue
        if kind not in _KEEPING_PRE_TOKENIZERS:
            return False
    return True


def _bpe_covers_every_character(model: dict, pre_tokenizer: dict | None) -> bool:
    """True when no input character can vanish or merge with others into one unknown token."""
    if model.get("byte_fallback"):
        return True
    if model.get("unk_token") is not None and not model.get("fuse_unk"):
        return True
    # a byte-level BPE sees only its 256-character byte alphabet; all of it must be in the vocabulary
    if any(p.get("type") == "ByteLevel" for p in _components(pre_tokenizer)):
        return _byte_alphabet_in(model.get("vocab") or {})
    return False


def _byte_alphabet_in(vocab: dict) -> bool:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    return len(alphabet) == _BYTE_LEVEL_ALPHABET and all(ch in vocab for ch in alphabet)


def _normalizer_factor(spec: dict | None) -> int | None:
    """How many input characters one normalized character may stand for (1, or 4 after NFC), None if unbounded."""
    factor = 1
    for part in _components(spec):
        kind = part.get("type")
        if kind == "NFC":
            factor *= _NFC_COMPOSITION
        elif kind == "Replace":
            pattern, content = part.get("pattern") or {}, part.get("content", "")
            if "String" not in pattern or len(pattern["String"]) != 1 or len(content) < 1:
                return None
        elif kind not in _KEEPING_NORMALIZERS:
            return None
    return factor
