"""PrefixIndex: exact matches, holders by recency, candidate filtering, removal, LRU eviction order, and a stateful
property test against a plain-list model (prefix strings instead of hash chains)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ladle.cluster.prefix_index import PrefixIndex

C = 4  # chunk_chars in the exact tests: short, readable prefixes


def index(max_entries: int = 1000, max_chunks: int = 64) -> PrefixIndex:
    return PrefixIndex(chunk_chars=C, max_entries=max_entries, max_chunks_per_text=max_chunks)


SYSTEM = "You are helpful."  # 4 chunks
assert len(SYSTEM) == 4 * C


def test_empty_and_short_texts_record_and_match_nothing():
    idx = index()
    for text in ("", "abc"):
        idx.insert(text, "a")
        assert idx.match(text, ["a"]) == (0, [])
    assert len(idx) == 0 and idx.entries() == 0 and idx.chars("a") == 0
    idx.insert("abcd", "a")
    assert idx.match("", ["a"]) == (0, [])
    assert idx.match("abc", ["a"]) == (0, [])


def test_only_full_chunks_count():
    idx = index()
    idx.insert("abcdefghij", "a")  # two full chunks and a partial "ij"
    assert len(idx) == 2 and idx.chars("a") == 2 * C
    assert idx.match("abcdefghij", ["a"]) == (8, ["a"])
    assert idx.match("abcdefghXY", ["a"]) == (8, ["a"])  # the trailing partial chunk never matters
    assert idx.match("abcdefgh" + "ijkl", ["a"]) == (8, ["a"])  # a third full chunk nobody holds
    assert idx.match("abcdefgX", ["a"]) == (4, ["a"])  # differs inside chunk 1
    assert idx.match("Xbcdefgh", ["a"]) == (0, [])  # differs inside chunk 0: nothing after it can match


def test_a_key_names_the_whole_prefix_not_the_chunk():
    idx = index()
    idx.insert("abababab", "a")
    assert len(idx) == 2  # the same chunk text at two positions: two keys
    idx.insert("xxxxabab", "b")
    assert idx.match("ababxxxx", ["a", "b"]) == (4, ["a"])
    assert idx.match("xxxxabab", ["a", "b"]) == (8, ["b"])
    assert idx.match("abab", ["b"]) == (0, [])  # b holds "abab" only after "xxxx"


def test_shared_and_distinct_prefixes_of_two_replicas():
    idx = index()
    idx.insert(SYSTEM + "What is 2+2?", "a")
    idx.insert(SYSTEM + "Tell me a joke", "b")  # "Tell me a jo" + partial "ke"
    assert len(idx) == 4 + 3 + 3
    assert idx.chars("a") == idx.chars("b") == 7 * C
    assert idx.match(SYSTEM + "What is 2+2?", ["a", "b"]) == (7 * C, ["a"])
    assert idx.match(SYSTEM + "Tell me a joke", ["a", "b"]) == (7 * C, ["b"])
    # only the system prompt is shared: both hold it, b more recently
    assert idx.match(SYSTEM + "Something else", ["a", "b"]) == (4 * C, ["b", "a"])
    assert idx.match(SYSTEM + "What", ["a", "b"]) == (5 * C, ["a"])


def test_holders_are_most_recently_used_first_and_insert_refreshes():
    idx = index()
    for replica in ("a", "b", "c"):
        idx.insert(SYSTEM, replica)
    assert idx.match(SYSTEM, ["a", "b", "c"]) == (4 * C, ["c", "b", "a"])
    idx.insert(SYSTEM, "a")
    assert idx.match(SYSTEM, ["a", "b", "c"]) == (4 * C, ["a", "c", "b"])
    idx.insert(SYSTEM[:C], "b")  # b refreshes the first chunk only: recency is per entry, so per key
    assert idx.match(SYSTEM[:C], ["a", "b", "c"]) == (C, ["b", "a", "c"])
    assert idx.match(SYSTEM, ["a", "b", "c"]) == (4 * C, ["a", "c", "b"])


def test_match_keeps_the_holders_relative_order():
    idx = index()
    idx.insert(SYSTEM, "a")
    idx.insert(SYSTEM, "b")
    for _ in range(3):
        assert idx.match(SYSTEM, ["a", "b"]) == (4 * C, ["b", "a"])


def test_candidates_filter_holders_and_the_matched_length():
    idx = index()
    idx.insert(SYSTEM + "What is 2+2?", "a")
    idx.insert(SYSTEM, "b")
    text = SYSTEM + "What is 2+2?"
    assert idx.match(text, ["a", "b"]) == (7 * C, ["a"])
    assert idx.match(text, ["b"]) == (4 * C, ["b"])  # a is busy or gone: b's shorter match is the answer
    assert idx.match(text, iter(["b", "zzz"])) == (4 * C, ["b"])  # any iterable; unknown replicas ignored
    assert idx.match(text, {"a": 1}) == (7 * C, ["a"])  # a dict's keys, as the router passes them
    assert idx.match(text, ["c"]) == (0, [])
    assert idx.match(text, []) == (0, [])


def test_remove_replica_forgets_only_it():
    idx = index()
    idx.insert(SYSTEM + "What is 2+2?", "a")
    idx.insert(SYSTEM, "b")
    idx.remove_replica("a")
    assert idx.chars("a") == 0 and idx.chars("b") == 4 * C
    assert len(idx) == 4 and idx.entries() == 4
    assert idx.match(SYSTEM + "What is 2+2?", ["a", "b"]) == (4 * C, ["b"])
    idx.remove_replica("a")  # twice, or a replica never seen: nothing happens
    idx.remove_replica("never")
    idx.remove_replica("b")
    assert len(idx) == 0 and idx.entries() == 0
    assert idx.match(SYSTEM, ["a", "b"]) == (0, [])
    idx.insert(SYSTEM, "a")  # a replica id reused after removal starts afresh
    assert idx.match(SYSTEM, ["a"]) == (4 * C, ["a"])


def test_reinsert_does_not_grow():
    idx = index()
    for _ in range(5):
        idx.insert(SYSTEM, "a")
    assert idx.entries() == 4 and len(idx) == 4 and idx.chars("a") == 4 * C


def test_eviction_drops_the_least_recently_used_and_match_refreshes():
    idx = index(max_entries=4)
    idx.insert("aaaabbbb", "a")  # entries, oldest first: (aaaabbbb, a), (aaaa, a)
    idx.insert("ccccdddd", "b")  # ... (ccccdddd, b), (cccc, b)
    assert idx.entries() == 4
    idx.insert("eeee", "c")  # over by one: the oldest, a's deepest chunk, goes
    assert idx.entries() == 4
    assert idx.match("aaaabbbb", ["a"]) == (4, ["a"])  # a hit: (aaaa, a) is now the freshest
    idx.insert("ffff", "c")  # evicts (ccccdddd, b)
    assert idx.match("ccccdddd", ["b"]) == (4, ["b"])  # hit: refreshes (cccc, b)
    idx.insert("gggg", "c")  # evicts (eeee, c)
    assert idx.match("eeee", ["c"]) == (0, [])
    assert idx.match("aaaa", ["a"]) == (4, ["a"])
    assert idx.chars("a") == 4 and idx.chars("b") == 4 and idx.chars("c") == 8
    assert len(idx) == 4


def test_a_text_longer_than_the_whole_index_keeps_its_head():
    idx = index(max_entries=3)
    idx.insert("aaaabbbbccccddddeeee", "a")
    assert idx.entries() == 3 and idx.chars("a") == 3 * C
    assert idx.match("aaaabbbbccccddddeeee", ["a"]) == (3 * C, ["a"])


def test_eviction_trims_prefixes_from_the_tail():
    idx = index(max_entries=6)
    idx.insert("aaaabbbbcccc", "a")
    idx.insert("xxxxyyyyzzzz", "b")
    idx.insert("ppppqqqq", "c")  # evicts a's two deepest chunks: its head stays matchable
    assert idx.match("aaaabbbbcccc", ["a"]) == (4, ["a"])
    assert idx.match("xxxxyyyyzzzz", ["b"]) == (12, ["b"])


def test_max_chunks_per_text_bounds_what_a_text_records_and_matches():
    idx = index(max_chunks=2)
    idx.insert("aaaabbbbccccdddd", "a")
    assert idx.entries() == 2 and idx.chars("a") == 2 * C
    assert idx.match("aaaabbbbccccdddd", ["a"]) == (2 * C, ["a"])
    assert idx.match("aaaabbbbXXXX", ["a"]) == (2 * C, ["a"])  # beyond the head nothing is compared


def test_non_ascii_text_is_cut_by_characters():
    idx = index()
    text = "héllo wörld 🙂🙂 日本語のテキスト"
    idx.insert(text, "a")
    assert idx.chars("a") == len(text) // C * C
    assert idx.match(text, ["a"]) == (len(text) // C * C, ["a"])
    assert idx.match("héllo wörld 🙂🙃 日", ["a"]) == (12, ["a"])  # one emoji differs in the 4th chunk
    assert idx.match("hello", ["a"]) == (0, [])  # é is not e


@pytest.mark.parametrize("field", ["chunk_chars", "max_entries", "max_chunks_per_text"])
def test_sizes_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        PrefixIndex(**{field: 0})


TEXTS = st.text(alphabet="ab\u00e9\U0001f642", max_size=40)  # few letters, so texts share prefixes


@settings(max_examples=200, deadline=None)
@given(
    chunk=st.integers(1, 6),
    max_chunks=st.integers(1, 8),
    before=st.lists(st.tuples(TEXTS, st.sampled_from(["r", "s", "t"])), max_size=10),
    text=TEXTS,
)
def test_with_room_the_last_insert_matches_in_full(chunk, max_chunks, before, text):
    idx = PrefixIndex(chunk_chars=chunk, max_entries=10_000, max_chunks_per_text=max_chunks)
    for other, replica in before:
        idx.insert(other, replica)
    idx.insert(text, "r")
    expected = min(len(text) // chunk, max_chunks) * chunk
    assert idx.match(text, ["r"]) == (expected, ["r"] if expected else [])
    matched, holders = idx.match(text, ["r", "s", "t"])  # others may hold it too, never more of it
    assert matched == expected and ("r" in holders if expected else holders == [])


@settings(max_examples=100, deadline=None)
@given(
    max_entries=st.integers(1, 12),
    inserts=st.lists(st.tuples(TEXTS, st.sampled_from(["r", "s", "t", "u"])), max_size=60),
)
def test_never_more_than_max_entries(max_entries, inserts):
    idx = PrefixIndex(chunk_chars=2, max_entries=max_entries, max_chunks_per_text=8)
    for text, replica in inserts:
        idx.insert(text, replica)
        assert idx.entries() <= max_entries
        assert sum(idx.chars(r) for r in "rstu") == idx.entries() * 2
        assert len(idx) <= idx.entries()


class Model:
    """The index spelled out plainly: entries are (prefix text, replica), least recently used first."""

    def __init__(self, chunk: int, max_entries: int, max_chunks: int) -> None:
        self.chunk, self.max_entries, self.max_chunks = chunk, max_entries, max_chunks
        self.order: list[tuple[str, str]] = []

    def prefixes(self, text: str) -> list[str]:
        n = min(len(text) // self.chunk, self.max_chunks)
        return [text[: (i + 1) * self.chunk] for i in range(n)]

    def touch(self, prefix: str, replica: str) -> None:
        if (prefix, replica) in self.order:
            self.order.remove((prefix, replica))
        self.order.append((prefix, replica))

    def insert(self, text: str, replica: str) -> None:
        for prefix in reversed(self.prefixes(text)):
            self.touch(prefix, replica)
        del self.order[: max(0, len(self.order) - self.max_entries)]

    def match(self, text: str, replicas: list[str]) -> tuple[int, list[str]]:
        best, holders = "", []
        for prefix in self.prefixes(text):
            found = [r for p, r in reversed(self.order) if p == prefix and r in replicas]
            if not found:
                break
            best, holders = prefix, found
        for prefix in reversed(self.prefixes(best)):
            for replica in reversed(holders):
                self.touch(prefix, replica)
        return len(best), holders

    def remove(self, replica: str) -> None:
        self.order = [(p, r) for p, r in self.order if r != replica]


REPLICAS = ["r", "s", "t"]


class PrefixIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.idx = PrefixIndex(chunk_chars=2, max_entries=10, max_chunks_per_text=4)
        self.model = Model(2, 10, 4)

    @rule(text=TEXTS, replica=st.sampled_from(REPLICAS))
    def insert(self, text, replica):
        self.idx.insert(text, replica)
        self.model.insert(text, replica)

    @rule(text=TEXTS, replicas=st.lists(st.sampled_from(REPLICAS), unique=True))
    def match(self, text, replicas):
        assert self.idx.match(text, replicas) == self.model.match(text, replicas)

    @rule(replica=st.sampled_from(REPLICAS))
    def remove(self, replica):
        self.idx.remove_replica(replica)
        self.model.remove(replica)

    @invariant()
    def same_contents(self):
        assert self.idx.entries() == len(self.model.order) <= 10
        assert len(self.idx) == len({p for p, _ in self.model.order})
        for replica in REPLICAS:
            assert self.idx.chars(replica) == 2 * sum(r == replica for _, r in self.model.order)

    @invariant()
    def each_replica_holds_whole_prefixes(self):
        held = set(self.model.order)
        for prefix, replica in held:
            assert all((prefix[:end], replica) in held for end in range(2, len(prefix), 2))


PrefixIndexMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_prefix_index_machine = PrefixIndexMachine.TestCase
