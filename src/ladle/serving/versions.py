"""What the host knows about each model: its loaded versions (what runs them) and every version's state.

Invariant: `ModelRecord.ready` holds only versions that finished loading; routing (traffic_split or the newest)
only ever picks one of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ladle.batching.batcher import Batcher
from ladle.metrics import VersionMetrics
from ladle.repository.model_config import ModelConfig
from ladle.serving import traffic
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

    def route(self, key: str | None = None, override: traffic.Split | None = None) -> ModelVersion:
        """The version for a request that names none: the traffic split (a rollout's `override`, else the config's)
        among its READY versions — by sticky `key` when the request has one — else the newest READY version that is
        not the shadow candidate. Needs a READY version."""
        config = self.config
        split = override if override is not None else (config.traffic_split if config is not None else ())
        spare = config.shadow.version if config is not None and config.shadow is not None else None
        return self.ready[traffic.choose(split, self.ready, key, spare)]
