"""A checkpoint's tokenizer: encode/decode on the Rust `tokenizers` backend, chat templates rendered by transformers.

Invariant: encode/decode go straight to the fast backend (no Python per token), and chat templates render exactly
as transformers' apply_chat_template does. Streaming detokenization lives in ladle.llm.detokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from ladle.errors import InvalidInput, LadleError
from ladle.llm.token_span import max_chars_per_token

__all__ = ["NoChatTemplate", "Tokenizer", "TokenizerLoadError"]


class TokenizerLoadError(LadleError):
    """The model directory has no usable tokenizer."""


class NoChatTemplate(InvalidInput):
    """A chat request reached a model whose tokenizer has no chat template."""


class Tokenizer:
    """Wraps a transformers fast tokenizer (`hf`, used for chat templates) and its Rust backend (`backend`).

    `vocab_size` is max token id + 1, added tokens included (the model's embedding must be at least this big).
    `eos_token_ids` is the tokenizer's eos plus any eos ids in the checkpoint's generation_config.json.
    """

    def __init__(self, hf: Any, extra_eos_token_ids: Sequence[int] = (), name: str = "model") -> None:
        self.hf = hf
        self.name = name
        self.backend: tokenizers.Tokenizer = hf.backend_tokenizer
        # Serving never truncates or pads silently; some tokenizer.json files ship with either switched on.
        self.backend.no_truncation()
        self.backend.no_padding()
        self.bos_token_id: int | None = hf.bos_token_id
        self.eos_token_id: int | None = hf.eos_token_id
        self.pad_token_id: int | None = hf.pad_token_id
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *extra_eos_token_ids]))
        self.all_special_ids: frozenset[int] = frozenset(hf.all_special_ids)
        self.vocab_size: int = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
        #: no token covers more input characters than this (None: this tokenizer's pipeline gives no bound)
        self.max_chars_per_token: int | None = max_chars_per_token(self.backend)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja) with
        transformers' AutoTokenizer, and eos ids from generation_config.json when present."""
        from transformers import AutoTokenizer  # heavy import, paid only when a model is loaded

        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
            raise TokenizerLoadError(
                f"{model_dir} has no tokenizer.json or tokenizer_config.json; save the tokenizer next to the "
                "weights (tokenizer.save_pretrained(model_dir))"
            )
        try:
            hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise TokenizerLoadError(f"cannot load the tokenizer in {model_dir}: {e}") from e
        if getattr(hf, "backend_tokenizer", None) is None:
            raise TokenizerLoadError(
                f"the tokenizer in {model_dir} ({type(hf).__name__}) has no fast (Rust) backend; add a tokenizer.json"
            )
        return cls(hf, _generation_config_eos(model_dir), name=model_dir.name)

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), from its length alone (0 where the tokenizer gives no bound)."""
        span = self.max_chars_per_token
        return 0 if span is None else -(-len(text) // span)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() of each text, in one call to the backend, which releases the GIL while it works (encode() holds
        it: a megabyte would stall every Python thread, the event loop included, for seconds)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Plain backend decode: no clean_up_tokenization_spaces, so streamed and whole-text results agree."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id decoded on its own (special tokens kept): the `token` strings of OpenAI logprobs."""
        return self.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        return self.hf.chat_template

    def get_chat_template(self) -> str:
        """The default chat template, or NoChatTemplate saying why chat completions cannot work."""
        template = self.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise NoChatTemplate(
                f"model {self.name!r} has no chat template (no 'chat_template' in tokenizer_config.json and no "
                "chat_template.jinja), and chat completions need one: use /v1/completions with a plain prompt, "
                "or add a chat template to the checkpoint"
            )
        return template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, chat_template: str | None = None, **kwargs: Any) -> list[int] | str:
        """Render `messages` with the checkpoint's template, or `chat_template` when given (extra kwargs such as
        tools reach the template) and, when `tokenize`, encode the text without adding special tokens, as
        transformers does. Rendering runs whatever the template says: callers bound its time (chat_template.py)."""
        if chat_template is None:
            self.get_chat_template()  # a clear error first; transformers then picks the template (e.g. "tool_use")
        text = self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, chat_template=chat_template,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={list(self.eos_token_ids)})"


def _generation_config_eos(model_dir: Path) -> list[int]:
    """eos_token_id from generation_config.json (an int or a list); chat checkpoints often stop on several ids."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError) as e:
        raise TokenizerLoadError(f"cannot read {path}: {e}") from e
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
