"""Route hints (cluster/hints.py): the session key (X-Session-Id over the OpenAI `user` field), the head of a chat
or completion prompt, exact truncation, and hostile bodies that must neither raise nor cost more than a bounded
amount of work (the front end reads hints on its event loop)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from ladle.cluster.hints import PREFIX_CHARS, SESSION_CHARS, SESSION_HEADER, RouteHint, prompt_head, session_key

# -- session key ---------------------------------------------------------------------------------------------------


def test_session_header_wins_over_the_user_field() -> None:
    headers = [(b"content-type", b"application/json"), (SESSION_HEADER, b"abc")]
    assert session_key(headers, {"user": "someone"}) == "abc"


def test_user_field_is_the_session_without_the_header() -> None:
    assert session_key([(b"content-type", b"application/json")], {"user": "u-1"}) == "u-1"


def test_empty_header_falls_back_to_the_user_field() -> None:
    assert session_key([(SESSION_HEADER, b"")], {"user": "u-2"}) == "u-2"


@pytest.mark.parametrize("body", [None, {}, {"user": ""}, {"user": 42}, {"user": ["a"]}, {"user": None}])
def test_no_session_without_a_header_or_a_string_user(body: dict[str, Any] | None) -> None:
    assert session_key([], body) is None


def test_only_the_session_header_counts() -> None:
    assert session_key([(b"x-session", b"no"), (b"x-request-id", b"no")], None) is None


def test_session_keys_are_truncated() -> None:
    long = "s" * (SESSION_CHARS * 3)
    assert session_key([(SESSION_HEADER, long.encode())], None) == "s" * SESSION_CHARS
    assert session_key([], {"user": long}) == "s" * SESSION_CHARS


def test_header_bytes_decode_as_latin_1() -> None:
    assert session_key([(SESSION_HEADER, b"caf\xe9")], None) == "caf\u00e9"


def test_route_hint_defaults() -> None:
    hint = RouteHint("m")
    assert (hint.model, hint.session, hint.prefix, hint.replica) == ("m", None, None, None)


# -- chat messages -------------------------------------------------------------------------------------------------


def test_chat_messages_are_role_and_content_lines_in_order() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert prompt_head(body) == "system:be brief\nuser:hi\n"


def test_content_parts_contribute_their_text_only() -> None:
    parts = [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": 7}, "loose string", None, {"type": "text", "text": "here"}]
    assert prompt_head({"messages": [{"role": "user", "content": parts}]}) == "user:look here\n"


def test_non_dict_messages_are_ignored() -> None:
    body = {"messages": ["junk", 3, None, [1, 2], {"role": "user", "content": "q"}]}
    assert prompt_head(body) == "user:q\n"


def test_odd_roles_and_contents_read_as_empty() -> None:
    body = {"messages": [{"role": 5, "content": "a"}, {"role": "user", "content": 12}, {"content": None}]}
    assert prompt_head(body) == ":a\nuser:\n:\n"


def test_messages_win_over_a_prompt() -> None:
    assert prompt_head({"messages": [{"role": "user", "content": "m"}], "prompt": "p"}) == "user:m\n"


def test_chat_head_is_truncated_to_prefix_chars() -> None:
    content = "x" * (PREFIX_CHARS * 2)
    head = prompt_head({"messages": [{"role": "user", "content": content}, {"role": "user", "content": "tail"}]})
    assert head == ("user:" + content)[:PREFIX_CHARS]


def test_many_small_messages_fill_exactly_prefix_chars() -> None:
    messages = [{"role": "user", "content": "abc"}] * (PREFIX_CHARS // 9 + 10)  # "user:abc\n": 9 chars each
    head = prompt_head({"messages": messages})
    assert head is not None and len(head) == PREFIX_CHARS
    assert head == ("user:abc\n" * (PREFIX_CHARS // 9 + 1))[:PREFIX_CHARS]


@pytest.mark.parametrize("messages", [[], ["a", 1, None]])
def test_no_readable_message_is_no_prefix(messages: list[Any]) -> None:
    assert prompt_head({"messages": messages}) is None


# -- completion prompts --------------------------------------------------------------------------------------------


def test_prompt_string() -> None:
    assert prompt_head({"prompt": "Once upon"}) == "Once upon"


def test_first_prompt_of_a_list_of_strings() -> None:
    assert prompt_head({"prompt": ["first", "second"]}) == "first"


def test_token_ids_as_text() -> None:
    assert prompt_head({"prompt": [11, 22, 33]}) == "11,22,33,"


def test_first_of_a_batch_of_token_id_lists() -> None:
    assert prompt_head({"prompt": [[1, 2], [3, 4]]}) == "1,2,"


def test_non_int_tokens_are_skipped() -> None:
    assert prompt_head({"prompt": [1, "two", 3.0, None, 4]}) == "1,4,"


def test_prompt_string_is_truncated() -> None:
    assert prompt_head({"prompt": "p" * (PREFIX_CHARS + 100)}) == "p" * PREFIX_CHARS


def test_token_ids_are_truncated() -> None:
    head = prompt_head({"prompt": list(range(10_000))})
    assert head is not None and len(head) == PREFIX_CHARS
    assert head == "".join(f"{t}," for t in range(10_000))[:PREFIX_CHARS]


@pytest.mark.parametrize("body", [
    {}, {"prompt": None}, {"prompt": 5}, {"prompt": {"a": 1}}, {"prompt": ""}, {"prompt": []}, {"prompt": [""]},
    {"prompt": [[]]}, {"prompt": [{"x": 1}]}, {"messages": "not a list"}, {"messages": {"role": "user"}},
    {"prompt": [[["deep"]]]}, {"input": "embeddings have no prompt"},
])
def test_no_prompt_is_none(body: dict[str, Any]) -> None:
    assert prompt_head(body) is None


def test_hostile_nested_shapes_never_raise() -> None:
    junk: list[Any] = [{"role": {"x": 1}, "content": [[{"text": ["a"]}], {"text": {"t": 1}}, 3.5]},
                       {"role": "user", "content": {"nested": [1, 2]}}, float("nan"), True]
    assert prompt_head({"messages": junk}) == ":\nuser:\n"
    assert prompt_head({"prompt": [True, False, 2]}) == "True,False,2,"  # bools are ints to Python: harmless


# -- bounded work --------------------------------------------------------------------------------------------------

WALK_BOUND = 100_000  # items a hint may look at: any fixed bound well below HUGE
HUGE = 300_000  # a list that must not be walked whole (1e6 through the counting list would slow the suite)


class CountingList(list):
    """A list that counts the items iterated out of it."""

    def __init__(self, items: list[Any]) -> None:
        super().__init__(items)
        self.seen = 0

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self.seen += 1
            yield item


def test_a_million_messages_stop_at_prefix_chars() -> None:
    messages = CountingList([{"role": "user", "content": "hello"}] * 1_000_000)
    tracemalloc.start()
    try:
        head = prompt_head({"messages": messages})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert head is not None and len(head) == PREFIX_CHARS
    assert messages.seen <= PREFIX_CHARS  # each message adds at least ":\n"
    assert peak < 64 * PREFIX_CHARS  # built a few prefixes' worth of text, not the body


def test_a_million_token_ids_stop_at_prefix_chars() -> None:
    prompt = CountingList(list(range(1_000_000)))
    head = prompt_head({"prompt": prompt})
    assert head is not None and len(head) == PREFIX_CHARS
    assert prompt.seen <= PREFIX_CHARS


def test_huge_lists_of_non_dict_messages_are_not_all_walked() -> None:
    messages = CountingList([0] * HUGE)
    assert prompt_head({"messages": messages}) is None
    assert messages.seen <= WALK_BOUND


def test_huge_lists_of_content_parts_are_not_all_walked() -> None:
    parts = CountingList([{"type": "text", "text": "x"}] * HUGE)
    head = prompt_head({"messages": [{"role": "user", "content": parts}]})
    assert head == ("user:" + "x" * PREFIX_CHARS)[:PREFIX_CHARS]
    assert parts.seen <= WALK_BOUND


def test_huge_lists_of_non_int_tokens_are_not_all_walked() -> None:
    tokens = CountingList([0.5] * HUGE)
    assert prompt_head({"prompt": tokens}) is None
    assert tokens.seen <= WALK_BOUND
