"""The gateway layer over the capabilities, for the dialects that ask for it (/v1/ai/*):
routing by task and preference, the response cache in front of chat, and idempotency keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from engine.contracts.chat import GenerationEvent, GenerationRequest, GenerationResult
from engine.core.errors import ModelNotFoundError, RequestCancelledError
from engine.core.manager import ModelManager
from engine.core.registry import Task
from engine.core.settings import Settings
from engine.gateway.cache import CachePolicy, IdempotencyStore, ResponseCache
from engine.gateway.routing import Router

T = TypeVar("T")
F = TypeVar("F")
Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]
Stream = Callable[[GenerationRequest], AsyncIterator[GenerationEvent]]


class GatewayService:
    def __init__(self, settings: Settings, manager: ModelManager, generate: Generate,
                 stream: Stream):
        self.registry = registry = manager.registry
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

    async def stream_once(
        self, key: str | None, digest: str,
        open_stream: Callable[[], Awaitable[RecordedStream[F]]],
        once: Callable[[], Awaitable[Any]],
        replay: Callable[[Any], AsyncIterator[F]],
    ) -> AsyncIterator[F]:
        """A streamed reply under an idempotency key. The first request streams live, and
        its outcome (once the stream has it) is what every retry with the key gets, replayed
        as a stream; a retry while the first still runs waits for it. If the first fails or
        its client leaves before the outcome, the key is forgotten and a retry runs anew
        (`once`, the unstreamed reply). No key: just the live stream."""
        if key is None:
            return (await open_stream()).frames
        future, owner = self.idempotency.claim(key, digest)
        if not owner:
            return replay(await self.idempotency.run(key, digest, once))
        try:
            stream = await open_stream()
        except BaseException as error:
            self.idempotency.fail(key, future, error)
            raise
        return self._settling(key, future, stream)

    async def _settling(self, key: str, future: asyncio.Future[Any],
                        stream: RecordedStream[F]) -> AsyncIterator[F]:
        try:
            async for frame in stream.frames:
                if not future.done() and (outcome := stream.outcome()) is not None:
                    future.set_result(outcome)
                yield frame
            if not future.done() and (outcome := stream.outcome()) is not None:
                future.set_result(outcome)
        except BaseException as error:
            if not future.done():
                self.idempotency.fail(key, future, error)
            raise
        finally:
            if not future.done():  # the stream ended without an outcome
                self.idempotency.fail(key, future, RequestCancelledError(
                    "the first request with this idempotency_key did not finish"))


@dataclass(frozen=True)
class RecordedStream(Generic[F]):
    """A live stream and what its outcome is so far (None until the stream has it)."""

    frames: AsyncIterator[F]
    outcome: Callable[[], Any]
