"""The gateway layer over the capabilities, for the dialects that ask for it (/v1/ai/*):
routing by task and preference, the response cache in front of chat, and idempotency keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from engine.contracts.chat import GenerationEvent, GenerationRequest, GenerationResult
from engine.core.errors import ModelNotFoundError
from engine.core.manager import ModelManager
from engine.core.registry import Registry, Task
from engine.core.settings import Settings
from engine.gateway.cache import CachePolicy, IdempotencyStore, ResponseCache
from engine.gateway.routing import Router

T = TypeVar("T")
Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]
Stream = Callable[[GenerationRequest], AsyncIterator[GenerationEvent]]


class GatewayService:
    def __init__(self, settings: Settings, registry: Registry, manager: ModelManager,
                 generate: Generate, stream: Stream):
        self.registry = registry
        self.router = Router.from_settings(settings, registry, manager)
        self.cache = ResponseCache(registry, settings.response_cache_ttl_s,
                                   settings.response_cache_entries)
        self.idempotency = IdempotencyStore(settings.idempotency_ttl_s,
                                            settings.idempotency_entries)
        self._generate, self._stream = generate, stream

    def pick(self, kind: Task, task: str = "general", prefer: str = "balanced") -> str:
        """The model that serves a `kind` request for `task`, by `prefer` (see routing)."""
        return self.router.pick(kind, task, prefer)

    def vision_model(self) -> str:
        """The router's vision model; with none configured, the default chat model, whose own
        vision routing says which vision model to install."""
        try:
            return self.router.pick("vision")
        except ModelNotFoundError:
            return self.registry.model_or_default(None, "chat")

    async def chat(self, request: GenerationRequest,
                   policy: CachePolicy) -> tuple[GenerationResult, bool]:
        """A reply through the response cache: (result, whether it was a cache hit)."""
        return await self.cache.generate(request, policy, self._generate)

    def chat_stream(self, request: GenerationRequest,
                    policy: CachePolicy) -> tuple[bool, AsyncIterator[GenerationEvent]]:
        return self.cache.stream(request, policy, self._stream)

    async def once(self, key: str | None, digest: str,
                   work: Callable[[], Awaitable[T]]) -> T:
        """`work` run once per idempotency key (None: always run); a retry gets the first
        outcome, a different request under the same key a 409."""
        if key is None:
            return await work()
        return await self.idempotency.run(key, digest, work)

    def claim(self, key: str, digest: str) -> tuple[asyncio.Future[Any], bool]:
        """(future, owner) for a streamed reply: the owner settles the future with the reply
        (or `fail`s it); the others await it."""
        return self.idempotency.claim(key, digest)

    def fail(self, key: str, future: asyncio.Future[Any], error: BaseException) -> None:
        self.idempotency.fail(key, future, error)
