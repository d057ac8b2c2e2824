"""Streaming text from token ids: IncrementalDetokenizer turns new ids into new text; StopStringMatcher cuts it.

Invariants: a delta never ends in a broken UTF-8 sequence (those bytes wait for the token that completes them), and
no part of a stop string is emitted while it could still match.
"""

from __future__ import annotations

import bisect
import logging
import re
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ladle.llm.tokenizer import Tokenizer

try:  # tokenizers >= 0.21; without it every request uses WindowDetokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover
    DecodeStream = None

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character
# Prompt tokens decoded in front of the output, so the first output token is decoded in context (a SentencePiece
# "▁Hello" is " Hello" after text but "Hello" at the very start) and its bytes can join a character the prompt began.
PROMPT_CONTEXT_TOKENS = 6
# Candidate starts of a partial stop string checked exactly per push; past them the matcher holds from the next one
# without checking (holding more is always safe): bounds the engine thread's work per delta for any text.
STOP_EXACT_CHECKS = 8
# StreamDetokenizer (DecodeStream) for tokenizers that pass the probe; False: WindowDetokenizer for every request.
PREFER_DECODE_STREAM = True


class IncrementalDetokenizer:
    """Decodes one request's output as it grows, at O(1) cost per token: only a short window is decoded.

    Concatenated deltas (plus `flush()` at the end) equal decode(context + output) minus decode(context), where the
    context is the prompt's last PROMPT_CONTEXT_TOKENS tokens. For byte-level BPE that is decode(output_ids); for
    SentencePiece-style tokenizers it differs only in keeping the first output token's leading space after a prompt
    (as vLLM does). With no prompt it is exactly decode(output_ids) for every tokenizer. A delta never ends in an
    unfinished character: its bytes wait for the token that completes them (`flush()` shows them as U+FFFD).

    `IncrementalDetokenizer(tokenizer, ...)` builds a StreamDetokenizer (the `tokenizers` library's DecodeStream, in
    Rust) when the tokenizer passed `decode_stream_supported` (checked once per tokenizer), else a WindowDetokenizer
    (the same algorithm in Python). Both subclasses can be built directly.
    """

    def __new__(cls, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        if cls is IncrementalDetokenizer:
            cls = StreamDetokenizer if decode_stream_supported(tokenizer) else WindowDetokenizer
        return super().__new__(cls)

    @property
    def window_tokens(self) -> int:
        """Token ids kept for decoding: stays small however long the output grows."""
        raise NotImplementedError

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Add the step's new token ids; return the new complete text ("" while a character is unfinished)."""
        raise NotImplementedError

    def flush(self) -> str:
        """At the end of the request, release held-back text as decode shows it (U+FFFD for unfinished bytes)."""
        raise NotImplementedError


class WindowDetokenizer(IncrementalDetokenizer):
    """The window algorithm in Python, for tokenizers DecodeStream cannot serve (and DecodeStream's own fallback).

    The window is the ids kept; ids[:read] (the prefix) is text already emitted, decoded again so that whatever the
    decoder does at the start of a sequence (strip a leading space, ...) happens to both and cancels out. Each push
    emits the window's new text except a trailing run of U+FFFD (bytes still waiting for the rest of their
    character); once the window's text ends on a whole character, the new tokens become the next prefix.
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
        return len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, new_token_ids: Sequence[int]) -> str:
        self._ids.extend(new_token_ids)
        return self._emit(self._decode(self._ids), final=False)

    def flush(self) -> str:
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


class StreamDetokenizer(IncrementalDetokenizer):
    """The same window algorithm run by `tokenizers.decoders.DecodeStream` in Rust: one call per push.

    DecodeStream keeps the window itself and returns None while the window's text ends in U+FFFD (or adds nothing
    visible); ladle mirrors which ids it holds (`_context`: the prefix it decodes again, `_pending`: ids whose text
    is held back) only to implement `flush()`, which DecodeStream lacks. Should DecodeStream ever refuse a step (it
    raises when the text stops extending its prefix), the request carries on with a WindowDetokenizer from the same
    point, so no text is lost or repeated.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend
        self._skip_special_tokens = skip_special_tokens
        self._context: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])  # DecodeStream's prefix ids
        self._pending: list[int] = []  # ids pushed since DecodeStream last returned text
        self._fallback: WindowDetokenizer | None = None
        self._stream = DecodeStream(ids=self._context, skip_special_tokens=skip_special_tokens)
        if self._backend.decode(self._context, skip_special_tokens).endswith(REPLACEMENT_CHAR):
            # A prompt ending mid-character (rare: token-id prompts) would have DecodeStream emit the prompt's text as
            # output; the window algorithm lets the output complete that character instead.
            self._fallback = WindowDetokenizer(tokenizer, self._context, skip_special_tokens)

    @property
    def window_tokens(self) -> int:
        if self._fallback is not None:
            return self._fallback.window_tokens
        return len(self._context) + len(self._pending)

    @property
    def uses_decode_stream(self) -> bool:
        """False once this request moved to the Python window (prompt ending mid-character, a refused step)."""
        return self._fallback is None

    def push(self, new_token_ids: Sequence[int]) -> str:
        if self._fallback is not None:
            return self._fallback.push(new_token_ids)
        ids = list(new_token_ids)
        try:
            text = self._stream.step(self._backend, ids)
        except Exception:  # tokenizers raises a bare Exception when the text stops extending its prefix
            log.warning("DecodeStream refused a step; this request continues with the Python detokenizer")
            self._fallback = WindowDetokenizer(self._tokenizer, self._context, self._skip_special_tokens)
            return self._fallback.push(self._pending + ids)
        if text is None:
            self._pending.extend(ids)
            return ""
        # DecodeStream's window is now exactly the ids since its last emission: they are the prefix from here on.
        self._context = self._pending + ids
        self._pending = []
        return text

    def flush(self) -> str:
        if self._fallback is not None:
            return self._fallback.flush()
        if not self._pending:
            return ""
        prefix = self._backend.decode(self._context, self._skip_special_tokens)
        text = self._backend.decode(self._context + self._pending, self._skip_special_tokens)
        self._pending = []
        return text[len(prefix):]


# A short text that exercises what a decoder can get wrong in a stream: leading spaces, multi-byte characters split
# across byte tokens, an emoji sequence, newlines. A tokenizer whose DecodeStream output differs from the Python
# window on it (or that raises) is served by the Python window.
_PROBE_PROMPT = "Probe: "
_PROBE_TEXT = " Hello, world! Café naïve 中文 😀 👍🏽 x² ≈ 3.14\n  tabs\tand  spaces "
_stream_support: weakref.WeakKeyDictionary[Tokenizer, bool] = weakref.WeakKeyDictionary()


def decode_stream_supported(tokenizer: Tokenizer) -> bool:
    """Whether StreamDetokenizer serves this tokenizer: DecodeStream is installed (with prompt prefill, tokenizers
    >= 0.22), is preferred, and streams a probe text exactly as the window algorithm does. Checked once a tokenizer."""
    if not PREFER_DECODE_STREAM or DecodeStream is None:
        return False
    known = _stream_support.get(tokenizer)
    if known is None:
        known = _stream_support[tokenizer] = _streams_like_the_window(tokenizer)
    return known


def _streams_like_the_window(tokenizer: Tokenizer) -> bool:
    prompt = tokenizer.backend.encode(_PROBE_PROMPT).ids
    output = tokenizer.backend.encode(_PROBE_TEXT, add_special_tokens=False).ids
    for skip in (True, False):
        try:
            stream = StreamDetokenizer(tokenizer, prompt, skip)
            streamed = [stream.push([token]) for token in output] + [stream.flush()]
        except Exception:  # any failure means: not this tokenizer
            streamed, stream = [], None
        if stream is None or not stream.uses_decode_stream:
            log.info("tokenizer %s: DecodeStream unusable, streaming with the Python detokenizer", tokenizer.name)
            return False
        window = WindowDetokenizer(tokenizer, prompt, skip)
        if "".join(streamed) != "".join([window.push([token]) for token in output] + [window.flush()]):
            log.info("tokenizer %s: DecodeStream differs, streaming with the Python detokenizer", tokenizer.name)
            return False
    return True


class StopStringMatcher:
    """Cuts a stream of text deltas at the first stop string, without ever emitting part of one.

    The stream stops at the earliest point where any stop string is complete (the shortest prefix of the text that
    ends with a stop string; on a tie, the longer stop string). The output is the text before it, or through it
    with `include_stop_str_in_output`. `matched` is the stop string that ended the stream, else None. The result
    does not depend on how the text is split into deltas.

    Cost: memory O(total stop length), and the held text is at most max_len - 1 characters (the longest a partial
    match can be), so each push searches held + delta with str.find and checks a bounded number of candidate
    starts (positions of a stop string's first character) exactly, all in C: near-linear in the delta.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(stop)
        self._include = include_stop_str_in_output
        self._window = max((len(s) for s in self._stop), default=1) - 1  # longest possible partial match
        # Sorted, the stop strings that extend a given text follow it directly: a prefix test is one bisect.
        self._sorted = sorted(set(self._stop))
        self._starts = re.compile("[" + "".join(map(re.escape, {s[0] for s in self._stop})) + "]" if stop else "$^")
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
        match = self._first_match(text, delta)
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

    def _first_match(self, text: str, delta: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that completes earliest in `text`; the longer one on a tie.
        The held text holds no complete match, so one must end in `delta` (and end with a character of it)."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        held = len(text) - len(delta)
        for stop in self._stop:
            if stop[-1] not in delta:
                continue
            start = _find_ending_after(text, stop, held)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _tail_to_hold(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string; after
        STOP_EXACT_CHECKS candidates that are not, the tail from the next candidate unchecked (never less)."""
        if not self._window:
            return 0
        for checked, found in enumerate(self._starts.finditer(text, max(0, len(text) - self._window))):
            tail = text[found.start():]
            if checked == STOP_EXACT_CHECKS or self._may_continue(tail):
                return len(tail)
        return 0

    def _may_continue(self, tail: str) -> bool:
        """Whether `tail` is a proper prefix of a stop string: of the first one sorting after it, if of any."""
        after = bisect.bisect_right(self._sorted, tail)
        return after < len(self._sorted) and self._sorted[after].startswith(tail)


def _find_ending_after(text: str, stop: str, held: int) -> int:
    """The first start of `stop` in `text` whose end lies past `held`, or -1. Few candidate starts: startswith at
    each (str.find would first scan the whole needle to build its skip table, costly for long stop strings)."""
    first = max(0, held - len(stop) + 1)
    last = len(text) - len(stop)
    if last - first >= 16:
        return text.find(stop, first)
    return next((p for p in range(first, last + 1) if text.startswith(stop, p)), -1)
