"""Streaming text from token ids: IncrementalDetokenizer turns new ids into new text; StopStringMatcher cuts it.

Invariants: a delta never ends in a broken UTF-8 sequence (those bytes wait for the token that completes them), and
no part of a stop string is emitted while it could still match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ladle.llm.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character
# Prompt tokens decoded in front of the output, so the first output token is decoded in context (a SentencePiece
# "▁Hello" is " Hello" after text but "Hello" at the very start) and its bytes can join a character the prompt began.
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Decodes one request's output as it grows, at O(1) cost per token: only a short window is decoded.

    The window is the ids kept; ids[:read] (the prefix) is text already emitted, decoded again so that whatever the
    decoder does at the start of a sequence (strip a leading space, ...) happens to both and cancels out. Each push
    emits the window's new text except a trailing run of U+FFFD (bytes still waiting for the rest of their
    character); once the window's text ends on a whole character, the new tokens become the next prefix.

    Concatenated deltas (plus `flush()` at the end) equal decode(context + output) minus decode(context), where the
    context is the prompt's last PROMPT_CONTEXT_TOKENS tokens. For byte-level BPE that is decode(output_ids); for
    SentencePiece-style tokenizers it differs only in keeping the first output token's leading space after a prompt
    (as vLLM does). With no prompt it is exactly decode(output_ids) for every tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read = len(self._ids)  # ids[:read] is the prefix; ids[read:] the tokens not yet slid past
        self._prefix_text = self._decode(self._ids)
        # Characters of the window's text already emitted (or belonging to the prompt). A prompt ending mid-character
        # leaves its unfinished bytes to the output, which completes them.
        self._emitted = len(self._prefix_text.rstrip(REPLACEMENT_CHAR))

    @property
    def window_tokens(self) -> int:
        """Token ids kept for decoding: stays small however long the output grows."""
        return len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Add the step's new token ids; return the new complete text ("" while a character is unfinished)."""
        self._ids.extend(new_token_ids)
        return self._emit(self._decode(self._ids), final=False)

    def flush(self) -> str:
        """At the end of the request, release held-back text as decode shows it (U+FFFD for unfinished bytes)."""
        return self._emit(self._decode(self._ids), final=True)

    def _emit(self, text: str, final: bool) -> str:
        complete = len(text) if final else len(text.rstrip(REPLACEMENT_CHAR))
        delta = text[self._emitted:complete]
        self._emitted = max(self._emitted, complete)
        # Slide the window only when its text ends on a whole character and the new tokens added visible text:
        # a prefix window of skipped special tokens alone would let the decoder strip a space that belongs here.
        if complete == len(text) and len(text) > len(self._prefix_text):
            del self._ids[:self._read]
            self._read = len(self._ids)
            self._prefix_text = self._decode(self._ids)
            self._emitted = len(self._prefix_text)
        return delta


class StopStringMatcher:
    """Cuts a stream of text deltas at the first stop string, without ever emitting part of one.

    The stream stops at the earliest point where any stop string is complete (the shortest prefix of the text that
    ends with a stop string; on a tie, the longer stop string). The output is the text before it, or through it
    with `include_stop_str_in_output`. `matched` is the stop string that ended the stream, else None. The result
    does not depend on how the text is split into deltas.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(stop)
        self._include = include_stop_str_in_output
        # Every proper prefix of a stop string: a text tail equal to one of these might still become a match.
        self._prefixes = frozenset(s[:i] for s in self._stop for i in range(1, len(s)))
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)
        self._held = ""
        self.matched: str | None = None

    @property
    def held_text(self) -> str:
        return self._held

    def push(self, delta: str) -> str:
        """Feed new text; return what is safe to emit now. After a match, returns the final piece, then ""."""
        if self.matched is not None:
            return ""
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self.matched, self._held = stop, ""
            return text[:start + len(stop)] if self._include else text[:start]
        keep = self._tail_to_hold(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The stream ended without a match: release the held tail."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that completes earliest in `text`; the longer one on a tie."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stop:
            start = text.find(stop)  # for one stop string the first start is also the first end
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _tail_to_hold(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
