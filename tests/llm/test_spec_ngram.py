"""Prompt-lookup speculation: hand-worked proposals, a property test against a pure-Python reference, and the
NgramProposer's incremental buffers (appends match fresh lookups; non-extensions are rebuilt)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ladle.llm.spec.ngram import NgramProposer, find_ngram_proposal


def reference(tokens: list[int], ngram_min: int, ngram_max: int, k: int) -> list[int]:
    """The definition, written for clarity: longest n first, then the most recent occurrence start i with
    i + n < len (a token follows it, so it is not the suffix itself), proposing tokens[i + n : i + n + k]."""
    if k <= 0:
        return []
    length = len(tokens)
    for n in range(ngram_max, max(ngram_min, 1) - 1, -1):
        suffix = tokens[length - n :]
        for i in range(length - n - 1, -1, -1):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


def propose(tokens: list[int], ngram_min: int, ngram_max: int, k: int) -> list[int]:
    return find_ngram_proposal(np.array(tokens, dtype=np.int64), ngram_min, ngram_max, k)


# ---- hand-worked cases -----------------------------------------------------------------------------------------------


def test_no_match():
    assert propose([1, 2, 3, 4], 1, 3, 5) == []
    assert propose([1, 2, 3, 4, 5, 6, 7], 1, 4, 5) == []


def test_match_in_prompt_proposes_its_continuation():
    # Suffix [5, 6] (n=2) occurs at i=0; [1, 5, 6] (n=3) does not occur earlier.
    assert propose([5, 6, 7, 8, 9, 1, 5, 6], 1, 3, 3) == [7, 8, 9]


def test_proposal_truncated_at_k_and_at_end_of_sequence():
    tokens = [5, 6, 7, 8, 9, 1, 5, 6]
    assert propose(tokens, 1, 3, 1) == [7]
    assert propose(tokens, 1, 3, 4) == [7, 8, 9, 1]
    assert propose(tokens, 1, 3, 100) == [7, 8, 9, 1, 5, 6]  # everything after i + n, never past the end
    assert propose([3, 4, 3], 1, 1, 5) == [4, 3]


def test_longest_n_wins_over_a_more_recent_shorter_match():
    # [1, 2, 3] at i=0 is followed by 9; the bare [3] at i=4 is more recent and followed by 8.
    tokens = [1, 2, 3, 9, 3, 8, 1, 2, 3]
    assert propose(tokens, 1, 3, 2) == [9, 3]
    assert propose(tokens, 1, 1, 2) == [8, 1]  # n capped at 1: the most recent [3]


def test_most_recent_occurrence_among_several():
    # 7 occurs at 0, 2, 4 before the suffix: the most recent (i=4) is followed by 3.
    assert propose([7, 1, 7, 2, 7, 3, 7], 1, 2, 2) == [3, 7]
    # Same for n=2: [4, 5] at i=0 and i=3; i=3 wins.
    assert propose([4, 5, 1, 4, 5, 2, 4, 5], 2, 2, 1) == [2]


def test_ngram_max_bounds_the_match_length():
    # n=3 [1, 2, 3] matches at i=0 (followed by 5); n=2 [2, 3] most recently at i=5 (followed by 6).
    tokens = [1, 2, 3, 5, 9, 2, 3, 6, 1, 2, 3]
    assert propose(tokens, 1, 3, 2) == [5, 9]
    assert propose(tokens, 1, 2, 2) == [6, 1]


def test_ngram_shorter_than_ngram_min_never_matches():
    tokens = [1, 2, 3, 9, 3]  # only the 1-gram [3] occurs earlier
    assert propose(tokens, 1, 3, 2) == [9, 3]
    assert propose(tokens, 2, 3, 2) == []
    assert propose([1, 2, 1], 2, 4, 3) == []


def test_overlapping_and_periodic_sequences():
    tokens = [1, 2, 1, 2, 1, 2]
    # n=2: occurrences with a following token start at 0 and 2 (4 is the suffix); i=2 proposes tokens[4:6].
    assert propose(tokens, 2, 2, 5) == [1, 2]
    # n=4 [1, 2, 1, 2] at i=0 overlaps the suffix; n=5 [2, 1, 2, 1, 2] only occurs as the suffix.
    assert propose(tokens, 1, 5, 5) == [1, 2]
    assert propose(tokens, 4, 4, 1) == [1]
    assert propose([1, 2, 1, 2, 1], 1, 3, 5) == [2, 1]  # n=3 [1, 2, 1] at i=0
    # A run: the longest n is len - 1 (i=0) and only one token follows it.
    assert propose([0, 0, 0, 0, 0], 1, 10, 3) == [0]
    assert propose([0, 0, 0, 0, 0], 1, 2, 3) == [0]  # n=2, most recent i=2: tokens[4:]


def test_k_not_positive():
    assert propose([1, 2, 1, 2], 1, 2, 0) == []
    assert propose([1, 2, 1, 2], 1, 2, -3) == []


def test_short_sequences():
    assert propose([], 1, 3, 4) == []
    assert propose([1], 1, 3, 4) == []
    assert propose([1, 1], 1, 3, 4) == [1]
    assert propose([1, 1], 2, 3, 4) == []  # shorter than ngram_min + 1
    assert propose([1, 1, 1], 2, 3, 4) == [1]
    assert propose([1, 2], 1, 3, 4) == []


def test_candidates_too_early_to_extend_are_dropped():
    # Few candidates (the gathering path): 9 at position 0 matches the last token, but the 2-gram [9, 9] would
    # have to start before the sequence; only the 1-gram at position 52 counts.
    tokens = [9, *range(100, 150), 9, 9]
    assert propose(tokens, 1, 2, 3) == [9]
    assert propose(tokens, 2, 2, 3) == []


def test_empty_ngram_range_proposes_nothing():
    assert propose([1, 2, 1, 2], 3, 2, 4) == []


def test_returns_plain_python_ints_and_handles_large_ids():
    out = propose([150_000, 2**40, 7, 150_000, 2**40], 1, 3, 3)
    assert out == [7, 150_000, 2**40]
    assert all(type(t) is int for t in out)


@pytest.mark.parametrize(
    "tokens",
    [
        [0] * 3000,  # every position matches: the dense (full-length mask) path throughout
        [1, 2, 3] * 1000,
        list(np.random.default_rng(1).integers(0, 2, 3000)),
        [*np.random.default_rng(2).integers(0, 50_000, 3000), 7, 8, 9, 7, 8],  # few candidates: sparse path
        [*([5] * 40), *np.random.default_rng(3).integers(0, 4, 2000)],  # dense first, sparse later
    ],
)
@pytest.mark.parametrize(("ngram_min", "ngram_max"), [(1, 1), (1, 3), (2, 5), (3, 8)])
def test_long_sequences_match_reference(tokens, ngram_min, ngram_max):
    tokens = [int(t) for t in tokens]
    assert propose(tokens, ngram_min, ngram_max, 6) == reference(tokens, ngram_min, ngram_max, 6)


@settings(max_examples=1500, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=60),
    ngram_min=st.integers(1, 6),
    ngram_max=st.integers(1, 8),
    k=st.integers(-1, 8),
)
def test_matches_reference(tokens, ngram_min, ngram_max, k):
    assert propose(tokens, ngram_min, ngram_max, k) == reference(tokens, ngram_min, ngram_max, k)


# ---- NgramProposer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ngram_min", "ngram_max"), [(0, 3), (-1, 2), (3, 2), (0, 0)])
def test_proposer_rejects_bad_bounds(ngram_min, ngram_max):
    with pytest.raises(ValueError):
        NgramProposer(ngram_min, ngram_max)


@settings(max_examples=200, deadline=None)
@given(
    sequences=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=300), min_size=1, max_size=3),
    steps=st.lists(st.integers(1, 9), min_size=1, max_size=80),
    k=st.integers(0, 6),
)
def test_proposer_incremental_appends_match_fresh_lookups(sequences, steps, k):
    # Several requests grow interleaved by a few tokens per step, past the initial capacity (so buffers double).
    proposer = NgramProposer(2, 4)
    seen = [0] * len(sequences)
    for step, size in enumerate(steps):
        r = step % len(sequences)
        seen[r] = min(seen[r] + size, len(sequences[r]))
        prefix = sequences[r][: seen[r]]
        assert proposer.propose(f"req-{r}", prefix, k) == reference(prefix, 2, 4, k)


def test_proposer_grows_one_token_at_a_time_through_several_doublings():
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 6, 700)]
    proposer = NgramProposer(1, 3)
    for end in range(len(tokens) + 1):
        assert proposer.propose("r", tokens[:end], 4) == reference(tokens[:end], 1, 3, 4)


def test_proposer_buffer_holds_the_synced_tokens_and_grows_geometrically():
    # White-box: the invariant itself, and capacity doubling (amortised O(1) appends) rather than exact-fit growth.
    proposer = NgramProposer(1, 3)
    tokens: list[int] = []
    reallocations, previous = 0, None
    for t in range(2000):
        tokens.append(t % 7)
        proposer.propose("r", tokens, 2)
        buf, length = proposer._buffers["r"]
        assert length == len(tokens)
        assert buf[:length].tolist() == tokens
        reallocations += buf is not previous
        previous = buf  # held, so a new buffer can never reuse its identity
    assert reallocations <= 7  # 64 -> 128 -> ... -> 2048, not one per append


def test_proposer_k_not_positive():
    proposer = NgramProposer(1, 2)
    assert proposer.propose("r", [1, 2, 1, 2], 0) == []
    assert proposer.propose("r", [1, 2, 1, 2], -1) == []
    assert proposer.propose("r", [1, 2, 1, 2], 2) == [1, 2]


def test_proposer_rebuilds_a_shrunk_sequence():
    proposer = NgramProposer(1, 3)
    long = [1, 2, 3, 4, 1, 2, 3, 9, 9, 1, 2]
    assert proposer.propose("r", long, 3) == reference(long, 1, 3, 3)
    short = [1, 2, 3, 4, 1, 2]
    assert proposer.propose("r", short, 3) == reference(short, 1, 3, 3) == [3, 4, 1]
    grown = [*short, 3]
    assert proposer.propose("r", grown, 3) == reference(grown, 1, 3, 3) == [4, 1, 2]


@pytest.mark.parametrize(
    "other",
    [
        # Each answer differs from the one a stale buffer (old tokens + the new tail) would give.
        [8, 2, 3, 4, 1, 2, 8],  # only the first token differs
        [1, 2, 3, 4, 1, 9, 2],  # last synced token differs
        [7, 7, 7, 7, 7, 7],  # same length, nothing in common
    ],
)
def test_proposer_rebuilds_a_sequence_that_is_not_an_extension(other):
    proposer = NgramProposer(1, 3)
    first = [1, 2, 3, 4, 1, 2]
    assert proposer.propose("r", first, 3) == [3, 4, 1]
    assert proposer.propose("r", other, 3) == reference(other, 1, 3, 3)


def test_proposer_empty_then_growing():
    proposer = NgramProposer(1, 2)
    assert proposer.propose("r", [], 3) == []
    assert proposer.propose("r", [4, 5, 4], 3) == [5, 4]


def test_remove_forgets_a_request_so_a_reused_id_starts_reference():
    proposer = NgramProposer(1, 3)
    first = [1, 2, 3, 4, 1]
    assert proposer.propose("r", first, 3) == [2, 3, 4]
    proposer.remove("r")
    # Shares its first and last synced tokens with `first`, so only a forgotten buffer makes this correct.
    other = [1, 9, 9, 9, 1, 9, 9]
    assert proposer.propose("r", other, 3) == reference(other, 1, 3, 3) == [9, 1, 9]
    proposer.remove("r")
    proposer.remove("r")  # unknown ids are fine
    proposer.remove("never-seen")


def test_clear_forgets_every_request():
    proposer = NgramProposer(1, 3)
    assert proposer.propose("a", [1, 2, 3, 4, 1], 3) == [2, 3, 4]
    assert proposer.propose("b", [5, 6, 7, 5], 3) == [6, 7, 5]
    proposer.clear()
    a, b = [1, 9, 9, 9, 1, 9, 9], [5, 8, 8, 5, 8]
    assert proposer.propose("a", a, 3) == reference(a, 1, 3, 3)
    assert proposer.propose("b", b, 3) == reference(b, 1, 3, 3)
    proposer.clear()
    proposer.clear()


def test_proposer_returns_plain_ints():
    out = NgramProposer(1, 2).propose("r", [3, 4, 3], 2)
    assert out == [4, 3]
    assert all(type(t) is int for t in out)
