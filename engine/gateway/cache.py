"""Two in-memory stores the gateway dialects share: the exact-match chat response cache (seed
001's `cache_strategy`) and idempotency keys (a retry with the same key gets the first result).

Both are per process and bounded: entries expire after their TTL, and past the entry limit the
least recently used one is dropped. A dropped idempotency key only means a late retry runs
again; a dropped cache entry only means a miss.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import asdict
from typing import Any, Generic, Literal, TypeVar

from engine.contracts.chat import (
    Choice,
    ChoiceFinished,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    TextDelta,
    Usage,
)
from engine.core.digest import digest
from engine.core.errors import ConflictError, RequestCancelledError
from engine.core.registry import Registry

V = TypeVar("V")
T = TypeVar("T")

# deterministic: only greedy requests (temperature 0), whose reply a fresh run would repeat;
# always: any request, sampled ones included (the caller opted into repeated answers);
# off: neither looked up nor stored.
CachePolicy = Literal["deterministic", "always", "off"]


class TTLStore(Generic[V]):
    """A map whose entries expire `ttl_s` after they were put, holding at most `max_entries`
    (least recently used dropped first). Event-loop only: no locks."""

    def __init__(self, ttl_s: float, max_entries: int):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        found = self._items.get(key)
        if found is None:
            return None
        expires, value = found
        if expires <= time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        self._items[key] = (time.monotonic() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class ResponseCache:
    """Exact-match cache of chat results, keyed on the normalized request: the resolved model
    id (aliases share entries), every message (images by their URL or data), and every
    sampling parameter. Only finished replies (stop or length) are stored."""

    def __init__(self, registry: Registry, ttl_s: float, max_entries: int):
        self.registry = registry
        self._store: TTLStore[GenerationResult] = TTLStore(ttl_s, max_entries)

    def key(self, request: GenerationRequest) -> str:
        messages = [
            [m.role, m.content, [p if isinstance(p, str) else {"image": p.url} for p in m.parts]]
            for m in request.messages or []
        ]
        model = self.registry.resolve(self.registry.model_or_default(request.model, "chat"))
        return digest({
            "model": model.id, "messages": messages,
            "prompt": request.prompt, "echo": request.echo, "params": asdict(request.params),
            "constraint": repr(request.constraint),
        })

    def applies(self, request: GenerationRequest, policy: CachePolicy) -> bool:
        if policy == "off" or self._store.ttl_s <= 0:
            return False
        if request.constraint is not None and request.constraint.calls_tools:
            return False  # calls get fresh ids; a replay would repeat them
        return policy == "always" or request.params.temperature == 0

    def lookup(self, key: str) -> GenerationResult | None:
        found = self._store.get(key)
        return copy.deepcopy(found) if found is not None else None

    def store(self, key: str, result: GenerationResult) -> None:
        if all(c.finish_reason in ("stop", "length") for c in result.choices):
            self._store.put(key, copy.deepcopy(result))

    async def generate(
        self, request: GenerationRequest, policy: CachePolicy,
        generate: Callable[[GenerationRequest], Awaitable[GenerationResult]],
    ) -> tuple[GenerationResult, bool]:
        """(result, cache hit)."""
        if not self.applies(request, policy):
            return await generate(request), False
        key = self.key(request)
        if (cached := self.lookup(key)) is not None:
            return cached, True
        result = await generate(request)
        self.store(key, result)
        return result, False

    def stream(
        self, request: GenerationRequest, policy: CachePolicy,
        stream: Callable[[GenerationRequest], AsyncIterator[GenerationEvent]],
    ) -> tuple[bool, AsyncIterator[GenerationEvent]]:
        """(cache hit, events). A hit replays the stored reply as one delta per choice; a miss
        streams live and stores the reply once every choice has finished."""
        if not self.applies(request, policy):
            return False, stream(request)
        key = self.key(request)
        if (cached := self.lookup(key)) is not None:
            return True, replay(cached)
        return False, self._recording(key, request, stream(request))

    async def _recording(
        self, key: str, request: GenerationRequest, events: AsyncIterator[GenerationEvent]
    ) -> AsyncIterator[GenerationEvent]:
        choices = [Choice(index=i) for i in range(request.params.n)]
        async with aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, TextDelta):
                    choices[event.index].text += event.text
                elif isinstance(event, ChoiceFinished):
                    choices[event.index].finish_reason = event.finish_reason
                elif isinstance(event, Usage):
                    self.store(key, GenerationResult(
                        self.registry.model_or_default(request.model, "chat"), choices, event))
                yield event


async def replay(result: GenerationResult) -> AsyncIterator[GenerationEvent]:
    """A finished result as the events a live stream would have sent."""
    for choice in result.choices:
        if choice.text:
            yield TextDelta(choice.index, choice.text)
        if choice.finish_reason is not None:
            yield ChoiceFinished(choice.index, choice.finish_reason)
    yield Usage(result.usage.prompt_tokens, result.usage.completion_tokens)


class IdempotencyStore:
    """Idempotency keys: the first request with a key runs, and every request with the same
    key (while it runs, or until the key expires) gets its result. The same key with a
    different request is a 409. A failed or abandoned run forgets its key, so a retry runs."""

    def __init__(self, ttl_s: float, max_entries: int):
        self._store: TTLStore[tuple[str, asyncio.Future[Any]]] = TTLStore(ttl_s, max_entries)

    def claim(self, key: str, request_digest: str) -> tuple[asyncio.Future[Any], bool]:
        """(future, owner). The owner must settle the future (`settle`/`fail`); the others
        await it."""
        found = self._store.get(key)
        if found is not None:
            if found[0] != request_digest:
                raise ConflictError(
                    "This idempotency_key was already used for a different request.",
                    param="idempotency_key",
                )
            return found[1], False
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._store.put(key, (request_digest, future))
        return future, True

    def fail(self, key: str, future: asyncio.Future[Any], error: BaseException) -> None:
        found = self._store.get(key)
        if found is not None and found[1] is future:
            self._store.pop(key)
        if not future.done():
            reason = error if isinstance(error, Exception) else RequestCancelledError(
                "the first request with this idempotency_key did not finish"
            )
            future.set_exception(reason)
            future.exception()  # retrieved here: nobody may be waiting

    async def run(self, key: str, request_digest: str, work: Callable[[], Awaitable[T]]) -> T:
        """The result of the first `work` run under this key. A waiter whose owner failed
        claims the key again (and, being first now, runs `work` itself)."""
        while True:
            future, owner = self.claim(key, request_digest)
            if not owner:
                try:
                    result: T = await asyncio.shield(future)
                    return result
                except Exception:
                    continue
            try:
                value = await work()
            except BaseException as error:
                self.fail(key, future, error)
                raise
            future.set_result(value)
            return value
