"""Prompt-lookup ("n-gram") speculation: propose the tokens that followed an earlier occurrence of a sequence's suffix.

Owns the per-request token buffers the lookup runs on. Invariant: a request's buffer holds exactly the tokens it was
last synced with (its first `length` entries); token lists are taken to be append-only between syncs.
"""

from __future__ import annotations

import numpy as np

_MIN_CAPACITY = 64
# Above 1/_DENSE_RATIO of the sequence matching, a full-length mask pass beats gathering the candidates (measured).
_DENSE_RATIO = 16


def find_ngram_proposal(tokens: np.ndarray, ngram_min: int, ngram_max: int, k: int) -> list[int]:
    """Up to k token ids that followed the most recent earlier occurrence of the longest suffix n-gram
    (ngram_min <= n <= ngram_max) of `tokens` (1-D int64: prompt + output so far); [] when there is none.

    An occurrence starting at i needs i + n < len(tokens) (a token follows it, so it is not the suffix itself; it
    may overlap the suffix). The proposal is tokens[i + n : i + n + k], shorter than k near the end."""
    length = len(tokens)
    if k <= 0 or ngram_max < max(ngram_min, 1) or length < ngram_min + 1:
        return []
    last = length - 1
    # Track occurrences by their END position e (= i + n - 1), not their start: the survivors for n + 1 are then a
    # subset of those for n, so one full-length compare seeds everything and each longer n only filters them.
    # e < last keeps at least one token after the occurrence.
    mask = tokens[:last] == tokens[last]
    ends = np.flatnonzero(mask)
    best_n, best_end = 0, -1
    n = 1
    while ends.size:
        best_n, best_end = n, int(ends[-1])  # ends ascend, so the last is the most recent occurrence
        if n == ngram_max:
            break
        # Extend every surviving match one token to the left (its start e - n must exist). Many survivors (small
        # alphabets, runs, periodic text): AND a shifted full-length compare into the mask, a few contiguous passes.
        # Few (the usual case with a real vocabulary): gather just their tokens, which is O(survivors).
        if ends.size * _DENSE_RATIO > last:
            mask[:n] = False
            mask[n:] &= tokens[: last - n] == tokens[last - n]
            ends = np.flatnonzero(mask)
        else:
            if ends[0] < n:
                ends = ends[np.searchsorted(ends, n) :]
            ends = ends.compress(tokens.take(ends - n) == tokens[last - n])
        n += 1
    # Matches only shrink as n grows, so the longest n that matched is the answer iff it reaches ngram_min.
    if best_n < ngram_min:
        return []
    return tokens[best_end + 1 : best_end + 1 + k].tolist()


class NgramProposer:
    """Per-request token buffers so a step's lookup does not rebuild an array from a Python list.
    Invariant: the buffer of a request holds exactly the tokens it was last synced with."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got ngram_min={ngram_min}, ngram_max={ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self._buffers: dict[str, tuple[np.ndarray, int]] = {}  # request id -> (buffer, tokens synced)

    def propose(self, request_id: str, all_token_ids: list[int], k: int) -> list[int]:
        """Sync the request's buffer with all_token_ids (appending only the new tail when the old content is a
        prefix, rebuilding otherwise) and return find_ngram_proposal over it."""
        if k <= 0:
            return []
        tokens = self._sync(request_id, all_token_ids)
        return find_ngram_proposal(tokens, self.ngram_min, self.ngram_max, k)

    def remove(self, request_id: str) -> None:
        self._buffers.pop(request_id, None)

    def clear(self) -> None:
        self._buffers.clear()

    def _sync(self, request_id: str, token_ids: list[int]) -> np.ndarray:
        new_length = len(token_ids)
        entry = self._buffers.get(request_id)
        if entry is not None:
            buf, length = entry
            # Proving the old content is a prefix would cost the O(len) conversion the buffer exists to avoid, so
            # check O(1) witnesses: no shrinking, same first and last synced token. That catches shrinking and an
            # id reused by another sequence; an edit strictly inside the synced prefix breaks the append-only
            # contract and is not detected.
            if length <= new_length and (
                length == 0 or (buf[0] == token_ids[0] and buf[length - 1] == token_ids[length - 1])
            ):
                if new_length > buf.size:
                    grown = np.empty(max(new_length, 2 * buf.size), dtype=np.int64)  # doubling: O(1) amortised
                    grown[:length] = buf[:length]
                    buf = grown
                if new_length > length:
                    buf[length:new_length] = token_ids[length:]
                self._buffers[request_id] = (buf, new_length)
                return buf[:new_length]
        buf = np.empty(max(_MIN_CAPACITY, 2 * new_length), dtype=np.int64)
        buf[:new_length] = token_ids
        self._buffers[request_id] = (buf, new_length)
        return buf[:new_length]
