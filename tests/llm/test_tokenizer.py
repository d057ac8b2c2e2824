"""Tokenizer loading and chat templates (against transformers), incremental detokenization, stop strings."""

from __future__ import annotations

import inspect
import itertools
import json
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ladle.llm import detokenizer
from ladle.llm.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopStringMatcher,
    StreamDetokenizer,
    WindowDetokenizer,
)
from ladle.llm.tokenizer import NoChatTemplate, Tokenizer, TokenizerLoadError
from tests.fixtures.tiny_tokenizer import BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, save_tiny_tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Café naïve Zürich — crème brûlée",
    "中文文本：你好，世界！",  # noqa: RUF001 (full-width punctuation on purpose)
    "Emoji 😀 🎉 👍🏽 🇫🇷 👨‍👩‍👧 done",
    "  leading spaces,\nnewlines\n\tand tabs  ",
    "x² ≈ 3.14 € 日本語 😃😃",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! Café? 中文 😀"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Again"},
]


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(save_tiny_tokenizer(tmp_path_factory.mktemp(request.param), kind=request.param))


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(save_tiny_tokenizer(tmp_path_factory.mktemp("bytes"), kind="bytelevel"))


# Every detokenizer test runs on both implementations: DecodeStream (Rust) and the Python window.
DETOKENIZERS = [StreamDetokenizer, WindowDetokenizer]
Detok = type[IncrementalDetokenizer]


@pytest.fixture(params=DETOKENIZERS, ids=lambda cls: cls.__name__)
def detok_cls(request: pytest.FixtureRequest) -> Detok:
    return request.param


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None, skip: bool = True,
            detok_cls: Detok = IncrementalDetokenizer) -> list[str]:
    detok = detok_cls(tok, prompt or [], skip_special_tokens=skip)
    return [detok.push([i]) for i in ids] + [detok.flush()]


# ---------------------------------------------------------------- loading, encode / decode, chat templates


def test_loads_special_tokens(tok: Tokenizer) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (BOS_ID, EOS_ID, (EOS_ID,))
    assert {BOS_ID, EOS_ID, IM_START_ID, IM_END_ID} <= tok.all_special_ids
    assert 300 < tok.vocab_size <= 512


def test_encode_decode_match_transformers(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == tok.hf.encode(text)
        assert tok.encode(text, add_special_tokens=False) == tok.hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == tok.hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == text or text.startswith("  ")  # SentencePiece drops one of two leading spaces
        assert tok.decode(ids, skip_special_tokens=False) == tok.hf.decode(ids, skip_special_tokens=False)


def test_token_texts(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("Hello world")
    assert "".join(byte_tok.token_texts(ids)) == "Hello world"
    assert byte_tok.token_texts([IM_END_ID]) == ["<|im_end|>"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, add_generation_prompt: bool) -> None:
    ours_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    ours_text = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
    theirs_ids = tok.hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, return_dict=False)
    theirs_text = tok.hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours_ids == theirs_ids and ours_text == theirs_text
    assert ours_ids[0] == IM_START_ID and ours_ids.count(IM_END_ID) == len(MESSAGES)
    assert ours_text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_missing_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    path = save_tiny_tokenizer(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(path)
    with pytest.raises(NoChatTemplate, match=r"no chat template.*chat completions need one") as err:
        tok.apply_chat_template(MESSAGES)
    assert err.value.status == 400
    assert tok.encode("still works") != []


def test_generation_config_adds_eos_ids(tmp_path: Path) -> None:
    path = save_tiny_tokenizer(tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END_ID, EOS_ID]}))
    assert Tokenizer.from_dir(path).eos_token_ids == (EOS_ID, IM_END_ID)


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- incremental detokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode_without_prompt(tok: Tokenizer, text: str, detok_cls: Detok) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids, detok_cls=detok_cls)
    assert "".join(deltas) == tok.decode(ids)
    assert deltas[-1] == ""  # every character was complete, so nothing was left for flush
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_after_a_prompt_decodes_in_context(tok: Tokenizer, text: str, detok_cls: Detok) -> None:
    prompt = tok.encode("User said:")
    full = tok.encode("User said: " + text)
    assert full[:len(prompt) - 1] == prompt[:-1]
    split = len(prompt) - 1  # re-tokenising may merge the prompt's last token with the space, so split before it
    prompt_ids, output_ids = full[:split], full[split:]
    streamed = "".join(_stream(tok, output_ids, prompt_ids, detok_cls=detok_cls))
    assert streamed == tok.decode(full)[len(tok.decode(prompt_ids)):]
    # Byte-level: exactly decode(output). SentencePiece: the same, but the first piece keeps its space in context.
    assert streamed.lstrip(" ") == tok.decode(output_ids).lstrip(" ")


def test_emoji_split_across_byte_level_tokens(byte_tok: Tokenizer, detok_cls: Detok) -> None:
    ids = byte_tok.encode("a 👍🏽 b", add_special_tokens=False)
    assert len(ids) > 3  # the emoji spans several tokens, some ending mid-codepoint
    deltas = _stream(byte_tok, ids, detok_cls=detok_cls)
    assert "".join(deltas) == "a 👍🏽 b" and not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "" in deltas[:-1]  # at least one token was held back


def test_byte_fallback_pieces(tmp_path: Path, detok_cls: Detok) -> None:
    tok = Tokenizer.from_dir(save_tiny_tokenizer(tmp_path, kind="metaspace"))
    # a character the training corpus lacks: always byte fallback (the trainer's 90-character alphabet breaks ties
    # between equally rare characters in no fixed order, so a corpus emoji such as 😀 is sometimes a piece)
    ids = tok.encode("🦀", add_special_tokens=False)
    pieces = tok.hf.convert_ids_to_tokens(ids)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    deltas = _stream(tok, ids, detok_cls=detok_cls)
    assert deltas[-2:] == ["🦀", ""] and set(deltas[:-2]) <= {"", " "}


def test_skip_special_tokens(tok: Tokenizer, detok_cls: Detok) -> None:
    ids = [*tok.encode("Hi there", add_special_tokens=False), IM_END_ID, *tok.encode(" more", add_special_tokens=False)]
    assert "".join(_stream(tok, ids, detok_cls=detok_cls)) == tok.decode(ids) and "<|im_end|>" not in tok.decode(ids)
    kept = "".join(_stream(tok, ids, skip=False, detok_cls=detok_cls))
    assert kept == tok.decode(ids, skip_special_tokens=False) and "<|im_end|>" in kept


def _widest_window(tok: Tokenizer, ids: list[int], step: int, detok_cls: Detok) -> tuple[str, int]:
    detok = detok_cls(tok, [], skip_special_tokens=True)
    out, widest = "", 0
    for start in range(0, len(ids), step):
        out += detok.push(ids[start:start + step])
        widest = max(widest, detok.window_tokens)
    return out + detok.flush(), widest


def test_multi_token_pushes_and_bounded_window(byte_tok: Tokenizer, detok_cls: Detok) -> None:
    short = byte_tok.encode(" ".join(TEXTS) * 2, add_special_tokens=False)
    long = byte_tok.encode(" ".join(TEXTS) * 40, add_special_tokens=False)
    for step in (1, 3):
        text, widest = _widest_window(byte_tok, long, step, detok_cls)
        assert text == byte_tok.decode(long)
        # The decoded window depends on the content (runs of split characters), never on the output's length.
        assert widest == _widest_window(byte_tok, short, step, detok_cls)[1] <= 8 * step


@pytest.mark.parametrize("detok_cls", DETOKENIZERS, ids=lambda cls: cls.__name__)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_ids_never_emit_broken_characters(byte_tok: Tokenizer, detok_cls: Detok, data: st.DataObject) -> None:
    # Single-byte tokens (ids 5..260 in the byte-level alphabet) split codepoints; include merges and specials too.
    ids = data.draw(st.lists(st.one_of(st.integers(5, 260), st.integers(0, byte_tok.vocab_size - 1)), max_size=30))
    prompt = data.draw(st.sampled_from([[], byte_tok.encode("Prompt: 日本 "), [IM_START_ID]]))
    skip = data.draw(st.booleans())
    detok = detok_cls(byte_tok, prompt, skip_special_tokens=skip)
    streamed = ""
    for i, token in enumerate(ids):
        streamed += detok.push([token])
        # What has been emitted is final: a prefix of the decode of everything so far.
        assert byte_tok.decode(ids[:i + 1], skip).startswith(streamed)
    full = byte_tok.decode(ids, skip)
    if not full.endswith(REPLACEMENT_CHAR):
        assert streamed == full
    assert streamed + detok.flush() == full


# ---------------------------------------------------------------- stop strings


def _run_stops(deltas: list[str], stop: tuple[str, ...], include: bool = False) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stop, include)
    out = [matcher.push(d) for d in deltas]
    return [*out, matcher.flush()], matcher.matched


def test_stop_string_across_delta_boundaries() -> None:
    out, matched = _run_stops(["hello ST", "O", "P world"], ("STOP",))
    assert out == ["hello ", "", "", ""] and matched == "STOP"


def test_stop_string_at_the_very_start() -> None:
    assert _run_stops(["STOP", "more"], ("STOP",)) == (["", "", ""], "STOP")
    assert _run_stops(["S", "TOPx"], ("STOP",), include=True) == (["", "STOP", ""], "STOP")


def test_held_text_released_when_it_stops_matching() -> None:
    assert _run_stops(["the ST", "ONE"], ("STOP",)) == (["the ", "STONE", ""], None)
    assert _run_stops(["the ST"], ("STOP",)) == (["the ", "ST"], None)  # flush at the end


def test_overlapping_candidates_shorter_completes_first() -> None:
    assert _run_stops(["xabc"], ("abc", "ab")) == (["x", ""], "ab")
    assert _run_stops(["xa", "bc"], ("abc", "ab"), include=True) == (["x", "ab", ""], "ab")
    assert _run_stops(["abcd"], ("bcd", "abc")) == (["", ""], "abc")  # earliest end wins
    assert _run_stops(["zabcd"], ("abcd", "bc")) == (["za", ""], "bc")


def test_multiple_stop_strings_and_include() -> None:
    out, matched = _run_stops(["Answer: 42\n", "\nUser: hi"], ("\n\n", "User:"), include=True)
    assert "".join(out) == "Answer: 42\n\n" and matched == "\n\n"
    assert _run_stops(["a", "b"], ()) == (["a", "b", ""], None)


def _reference_stop(text: str, stop: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[:end] if include else text[:end - len(s)], s
    return text, None


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=25),
    stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3).map(tuple),
    cuts=st.lists(st.integers(0, 25), max_size=6),
    include=st.booleans(),
)
def test_stop_strings_do_not_depend_on_chunking(text: str, stop: tuple[str, ...], cuts: list[int],
                                                include: bool) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    matcher = StopStringMatcher(stop, include)
    emitted = ""
    for a, b in itertools.pairwise(bounds):
        emitted += matcher.push(text[a:b])
        if not include:
            assert not any(s in emitted for s in stop)  # never emitted, not even at the end
    emitted += matcher.flush()
    assert (emitted, matcher.matched) == _reference_stop(text, stop, include)


def test_detokenizer_and_stop_strings_together(byte_tok: Tokenizer, detok_cls: Detok) -> None:
    ids = byte_tok.encode("Hi 😀 there STOP ignored", add_special_tokens=False)
    detok, matcher = detok_cls(byte_tok, []), StopStringMatcher(("STOP",))
    out = ""
    for token in ids:
        out += matcher.push(detok.push([token]))
        if matcher.matched:
            break
    assert (out, matcher.matched) == ("Hi 😀 there ", "STOP")


def test_decode_stream_is_chosen_once_per_tokenizer(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert detokenizer.decode_stream_supported(tok)  # both fixture kinds pass the probe
    assert type(IncrementalDetokenizer(tok, [BOS_ID])) is StreamDetokenizer
    monkeypatch.setattr(detokenizer, "PREFER_DECODE_STREAM", False)
    assert type(IncrementalDetokenizer(tok, [BOS_ID])) is WindowDetokenizer


class _AlwaysRefuses:
    def __init__(self, ids: list[int], skip_special_tokens: bool) -> None:
        pass

    def step(self, tokenizer: object, ids: list[int]) -> str | None:
        raise Exception("Invalid prefix encountered while decoding stream")  # the bare type tokenizers raises


@pytest.mark.parametrize("decode_stream", [None, _AlwaysRefuses], ids=["absent", "refuses"])
def test_without_a_working_decode_stream_the_window_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           decode_stream: type | None) -> None:
    monkeypatch.setattr(detokenizer, "DecodeStream", decode_stream)  # tokenizers too old, or wrong for this tokenizer
    fresh = Tokenizer.from_dir(save_tiny_tokenizer(tmp_path))
    assert not detokenizer.decode_stream_supported(fresh)
    assert type(IncrementalDetokenizer(fresh)) is WindowDetokenizer
    assert "".join(_stream(fresh, fresh.encode("Café 😀", add_special_tokens=False))) == "Café 😀"


def test_prompt_ending_mid_character(byte_tok: Tokenizer, detok_cls: Detok) -> None:
    """The prompt's unfinished bytes are completed by the output: the character is emitted once, with the output."""
    ids = byte_tok.encode("Hi 👍🏽 there", add_special_tokens=False)
    split = next(k for k in range(1, len(ids)) if byte_tok.decode(ids[:k]).endswith(REPLACEMENT_CHAR))
    deltas = _stream(byte_tok, ids[split:], ids[:split], detok_cls=detok_cls)
    prompt_text = byte_tok.decode(ids[:split]).rstrip(REPLACEMENT_CHAR)
    assert "".join(deltas) == byte_tok.decode(ids)[len(prompt_text):]
    assert not any(REPLACEMENT_CHAR in d for d in deltas) and deltas[-1] == ""


def test_decode_stream_refusing_a_step_falls_back_without_losing_text(byte_tok: Tokenizer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """tokenizers raises "Invalid prefix encountered" when a decoder's text stops extending its prefix (vLLM
    #17448); the request continues on the Python window from the same point: nothing lost, nothing repeated."""
    real = detokenizer.DecodeStream

    class RefusesFifthStep:
        def __init__(self, ids: list[int], skip_special_tokens: bool) -> None:
            self._stream, self._steps = real(ids=ids, skip_special_tokens=skip_special_tokens), 0

        def step(self, tokenizer: object, ids: list[int]) -> str | None:
            self._steps += 1
            if self._steps == 5:
                raise Exception("Invalid prefix encountered while decoding stream")  # the bare type tokenizers raises
            return self._stream.step(tokenizer, ids)

    monkeypatch.setattr(detokenizer, "DecodeStream", RefusesFifthStep)
    text = "Hi 😀 there, 中文 done"
    ids = byte_tok.encode(text, add_special_tokens=False)
    for step in (1, 2):
        detok = StreamDetokenizer(byte_tok, byte_tok.encode("Prompt:"))
        out = "".join(detok.push(ids[i:i + step]) for i in range(0, len(ids), step)) + detok.flush()
        assert out == text and detok.window_tokens <= 8 * step


def test_copied_checkpoint_directory_loads(tmp_path: Path) -> None:
    src = save_tiny_tokenizer(tmp_path / "a", kind="metaspace")
    dst = Path(shutil.copytree(src, tmp_path / "b"))
    assert Tokenizer.from_dir(dst).encode("Hello") == Tokenizer.from_dir(src).encode("Hello")


def test_long_stop_strings_cost_bounded_memory_and_time() -> None:
    """16 stop strings of the API's maximum length (1024): construction plus a 100 kB stream in token-sized deltas
    stays small and fast (the old matcher stored every prefix: ~8 M characters here, and quadratic work per delta)."""
    stops = ["a" * 1023 + chr(ord("b") + i) for i in range(16)]
    text = "a" * 50_000 + "xyz " * 12_500
    tracemalloc.start()
    matcher = StopStringMatcher(stops)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200_000
    started = time.perf_counter()
    out = [matcher.push(text[i:i + 4]) for i in range(0, len(text), 4)]
    assert time.perf_counter() - started < 1.0
    assert "".join(out) + matcher.flush() == text and matcher.matched is None
    assert len(matcher.held_text) <= 1023


def test_stop_matcher_past_its_exact_checks_holds_more_but_cuts_the_same() -> None:
    """Many candidate starts that are not partial matches ("xb" vs "xa...") exceed STOP_EXACT_CHECKS: the matcher
    then holds conservatively, and still emits exactly the text before the stop string, whatever the chunking."""
    stop = ("x" + "a" * 30 + "z",)
    text = "xb" * 40 + stop[0] + "tail"
    for step in (1, 3, 7, len(text)):
        out, matched = _run_stops([text[i:i + step] for i in range(0, len(text), step)], stop)
        assert ("".join(out), matched) == ("xb" * 40, stop[0])
        emitted = "".join(out[:-1])
        assert not any(s in emitted for s in stop)


def test_reserved_template_kwargs_cover_apply_chat_template_parameters(byte_tok: Tokenizer) -> None:
    """A client's chat_template_kwargs must not set any named parameter of the installed transformers'
    apply_chat_template (chat_template is checked separately, against --trust-request-chat-template)."""
    from ladle.api.openai_prompts import RESERVED_TEMPLATE_KWARGS

    named = set(inspect.signature(type(byte_tok.hf).apply_chat_template).parameters) - {"self", "kwargs"}
    assert named - {"chat_template"} <= RESERVED_TEMPLATE_KWARGS
