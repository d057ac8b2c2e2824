"""What the host knows about each model: its loaded versions (what runs them) and every version's state.

Invariant: `ModelRecord.ready` holds only versions that finished loading; routing (traffic_split or the newest)
only ever picks one of them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ladle.batching.batcher import Batcher
from ladle.metrics import VersionMetrics
from ladle.repository.model_config import ModelConfig
from ladle.tensors import TensorSpec


class LLMEngine(Protocol):
    """What the host needs of an LLM engine (ladle.llm.async_engine.AsyncEngine)."""

    @property
    def alive(self) -> bool: ...  # False once the engine thread has died (readiness)
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    async def close(self) -> None: ...


#: counts the tokens a model's tokenizer makes of some texts (blocking: call off the event loop)
TokenCounter = Callable[[list[str]], int]


@dataclass
class ModelVersion:
    """One loaded version: its effective config, served signature, metrics, and what runs it —
    a batcher (classic models) or an LLM engine (backend: llm)."""

    name: str
    version: int
    config: ModelConfig
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batcher: Batcher | None
    metrics: VersionMetrics
    load_seconds: float
    engine: LLMEngine | None = None
    count_tokens: TokenCounter | None = None  # embeddings models: usage.prompt_tokens

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self.engine is not None:
            await self.engine.close()


@dataclass
class VersionStatus:
    state: str
    reason: str = ""


@dataclass
class ModelRecord:
    """Everything known about one model name. `pinned`: given on the command line (--model), it lives as long
    as the process and is not loaded or unloaded through the repository API."""

    name: str
    config: ModelConfig | None = None
    ready: dict[int, ModelVersion] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)
    state: str = "UNAVAILABLE"
    reason: str = ""
    pinned: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def route(self) -> ModelVersion:
        """The version for a request that names none: drawn by the config's traffic_split among its READY
        versions, else (no split, or none of its versions ready) the newest READY one. Needs a READY version."""
        split = self.config.traffic_split if self.config is not None else ()
        if split:
            choices = [(version, weight) for version, weight in split if weight > 0 and version in self.ready]
            if choices:
                versions, weights = zip(*choices, strict=True)
                return self.ready[random.choices(versions, weights)[0]]
        return self.ready[max(self.ready)]
