"""The in-process engine: the one implementation of each capability, which every dialect's
routes call. Async at the edge; inference runs on the shared compute thread, through each
model's runner (the chat scheduler, the batcher)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import numpy as np
import torch

from engine.contracts.chat import (
    ChatBackend,
    Choice,
    ChoiceFinished,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    PromptInput,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from engine.contracts.chat_templates import detect_format
from engine.contracts.embeddings import EmbeddingRequest, EmbeddingResult
from engine.contracts.images import ImageRequest, ImageResult
from engine.contracts.ranking import (
    ModerationRequest,
    ModerationResult,
    RerankRequest,
    RerankResult,
)
from engine.contracts.speech import (
    SpeechChunk,
    SpeechRequest,
    Transcription,
    TranscriptionInfo,
    TranscriptionRequest,
    TranscriptSegment,
)
from engine.core import metrics
from engine.core.access import AccessPolicy, current_caller
from engine.core.errors import DeadlineExceededError, InvalidRequestError, ModelUnavailableError
from engine.core.limits import check_count
from engine.core.manager import ModelManager
from engine.core.registry import Registry
from engine.core.settings import Settings
from engine.core.sources import is_installed
from engine.gateway.cache import IdempotencyStore, ResponseCache
from engine.gateway.routing import Router
from engine.generation import vision
from engine.generation.structured import check_constraint
from engine.generation.tool_calls import ToolCallParser, join_deltas
from engine.images import service as images
from engine.jobs import chat as chat_jobs
from engine.jobs.runner import InlineKind, JobRunner
from engine.media.artifacts import ArtifactStore
from engine.ranking import service as ranking
from engine.speech import service as speech
from models.embeddings import truncate_dimensions

log = logging.getLogger(__name__)

_DONE = object()
T = TypeVar("T")

# Tokenizing a short input takes tens of microseconds, less than a hop to a worker thread and
# back; only inputs above this many characters are tokenized off the event loop.
INLINE_TOKENIZE_CHARS = 4096


async def off_loop_if_large(size: int, fn: Callable[..., T], *args: Any) -> T:
    if size <= INLINE_TOKENIZE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def prompt_input(backend: ChatBackend, request: GenerationRequest) -> PromptInput:
    """A request's prompt, rendered and tokenized by the model's backend."""
    if request.messages is not None:
        constraint = request.constraint
        tools = constraint.tools if constraint is not None and constraint.calls_tools else ()
        return backend.render_chat(request.messages, tools)
    if isinstance(request.prompt, str):
        return PromptInput(backend.tokenize(request.prompt), request.prompt)
    ids = list(request.prompt or [])
    bad = [t for t in ids if not 0 <= t < backend.vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt token id {bad[0]} is outside the vocabulary (0..{backend.vocab_size - 1})",
            param="prompt",
        )
    return PromptInput(ids, backend.detokenize(ids))


def with_tool_calls(parsers: list[ToolCallParser],
                    event: GenerationEvent) -> list[GenerationEvent]:
    """A choice's text split into content and tool-call deltas; a finished choice that
    made calls finishes with "tool_calls"."""
    if isinstance(event, TextDelta):
        pieces = parsers[event.index].feed(event.text)
    elif isinstance(event, ChoiceFinished):
        parser = parsers[event.index]
        pieces = parser.finish()
        if parser.calls and event.finish_reason == "stop":
            event = ChoiceFinished(event.index, "tool_calls")
    else:
        return [event]
    out: list[GenerationEvent] = [TextDelta(event.index, p) if isinstance(p, str) else p
                                  for p in pieces]
    return [*out, event] if isinstance(event, ChoiceFinished) else out


def request_chars(request: GenerationRequest) -> int:
    if request.messages is not None:
        return sum(len(m.content) for m in request.messages)
    return len(request.prompt or "")


class Engine:
    def __init__(self, settings: Settings, manager: ModelManager | None = None):
        self.settings = settings
        self.registry = manager.registry if manager else Registry.from_settings(settings)
        self.manager = manager or ModelManager(settings, self.registry)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self._preloading: asyncio.Task[None] | None = None
        self.artifacts = ArtifactStore(settings.data_dir / "files", settings.artifact_ttl_s)
        self.jobs = JobRunner(settings, self.manager, self.artifacts)
        self.access = AccessPolicy(settings.accepted_keys(), settings.api_keys_file)
        self._purging: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        # What the gateway dialects add on top: routing by task/prefer, the response cache,
        # idempotency keys, and chat as a job kind (batch mode).
        self.router = Router.from_settings(settings, self.registry, self.manager)
        self.response_cache = ResponseCache(
            self.registry, settings.response_cache_ttl_s, settings.response_cache_entries
        )
        self.idempotency = IdempotencyStore(settings.idempotency_ttl_s,
                                            settings.idempotency_entries)
        self.jobs.inline["chat"] = InlineKind(
            validate=chat_jobs.validate,
            run=functools.partial(chat_jobs.run, self.response_cache, self.generate),
        )

    async def start(self) -> None:
        """Start background work; preloading runs in the background so /health answers
        while models load, and /ready turns 200 when they are done."""
        await self.manager.start()
        self._preloading = asyncio.create_task(self._preload())
        await self.jobs.start()
        self._purging = asyncio.create_task(self._purge_expired_forever())
        if self.settings.step_timeout_s > 0:
            self._watching = asyncio.create_task(self._watch_steps_forever())

    async def _watch_steps_forever(self) -> None:
        """A compute step that never returns (a hung kernel, a deadlock in a library) must not
        leave its requests hanging: past step_timeout_s they end with 504, and so does each
        request that reaches the model while the step is still stuck."""
        limit = self.settings.step_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            if (stuck := self.manager.compute.stuck(limit)) is None:
                continue
            runner, running = stuck
            log.error("%s: a compute step has run %.0fs (setting step_timeout_s=%.0f); its "
                      "requests end with 504", runner.name, running, limit)
            runner.abandon(DeadlineExceededError(
                f"{runner.name!r}: a compute step has run {running:.0f}s, past "
                f"step_timeout_s ({limit:.0f}s); the model may be stuck"))

    async def _purge_expired_forever(self) -> None:
        """Expired generated files and finished jobs are removed in the background."""
        while True:
            try:
                await self.jobs.purge_expired()
                await asyncio.to_thread(self.artifacts.purge_expired)
            except (OSError, sqlite3.Error) as exc:
                log.warning("purging expired files failed: %s", exc)
            await asyncio.sleep(min(60.0, self.settings.artifact_ttl_s))

    def preload_ids(self) -> list[str]:
        """The preload setting with `defaults` expanded to the installed default models."""
        ids: list[str] = []
        for name in self.settings.preload:
            if name == "defaults":
                ids += [e.id for e in self.registry.entries() if e.default and is_installed(e)]
            else:
                ids.append(name)
        return list(dict.fromkeys(ids))

    async def _preload(self) -> None:
        for name in self.preload_ids():
            try:
                await self.manager.load(name)
            except Exception as exc:  # the others still load and serve
                log.error("preloading %s failed: %s", name, exc)
        ready = [s for s in self.manager.status() if s.state == "ready"]
        log.info("models ready: %s", ", ".join(f"{s.id} ({s.task})" for s in ready) or "none")

    @property
    def preloaded(self) -> bool:
        return self._preloading is not None and self._preloading.done()

    async def wait_preloaded(self) -> None:
        if self._preloading is not None:
            await asyncio.shield(self._preloading)

    def end_in_flight(self) -> None:
        """The drain deadline has passed: every request still running or queued ends now with
        a 503 (streams get an error frame), so shutdown never cuts a response silently."""
        self.manager.end_in_flight(ModelUnavailableError(
            f"The server is shutting down: the drain deadline ({self.settings.drain_timeout_s:g}"
            " s, setting drain_timeout_s) passed before this request finished; retry it."))

    async def stop(self) -> None:
        for task in (self._preloading, self._purging, self._watching):
            if task is not None and not task.done():
                task.cancel()
        await self.jobs.stop()
        await self.manager.stop()

    # -- chat and completions ----------------------------------------------------------------

    def _check_generation(self, request: GenerationRequest) -> None:
        """Checks that need no model, before any work (a huge `n` must never be worked on)."""
        if request.params.n > self.settings.max_n:
            raise InvalidRequestError(
                f"n must be at most {self.settings.max_n}; got {request.params.n}", param="n"
            )
        if request.constraint is not None:
            check_constraint(request.constraint)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Text deltas and finish events as they are decoded, then one `Usage`.

        Tokenization, limit checks and queue admission happen before the first event, so a
        caller that awaits the first event gets any 4xx before it commits to a response.
        Closing the iterator early (client gone) stops decoding at the next step.
        """
        self._check_generation(request)
        has_images = bool(request.images())
        # Image URLs are vetted (no connection) before the model is looked up: a bad URL is a
        # 400 even when the model is missing; they are fetched once it is known to be there.
        vetted = await vision.vet_images(request, self.settings) if has_images else None
        entry = vision.chat_entry(self.registry, request)
        if has_images:
            await vision.load_images(request, self.settings, vetted)
        async with self.manager.lease(entry.id) as slot:
            backend, runner = slot.adapter, slot.runner
            if has_images:  # image preprocessing takes milliseconds or more
                prompt = await asyncio.to_thread(prompt_input, backend, request)
            else:
                prompt = await off_loop_if_large(request_chars(request), prompt_input, backend,
                                                 request)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            cancelled = threading.Event()

            def emit(event: GenerationEvent) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, event)

            param = "messages" if request.messages is not None else "prompt"
            grammar, tool_format = None, None
            if request.constraint is not None:
                tool_format = detect_format(backend.chat_template())
                started = time.perf_counter()
                grammar = await asyncio.to_thread(runner.grammars.compile_constraint,
                                                  request.constraint, tool_format)
                metrics.GRAMMAR_SECONDS.observe(time.perf_counter() - started)
            future = runner.submit(prompt, request.params, emit, cancelled, param, grammar)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, _DONE))
            try:
                if request.echo:
                    for index in range(request.params.n):
                        yield TextDelta(index, prompt.text)
                calls_tools = request.constraint is not None and request.constraint.calls_tools
                parsers = ([ToolCallParser(i, tool_format) for i in range(request.params.n)]
                           if calls_tools and tool_format is not None else None)
                while (event := await queue.get()) is not _DONE:
                    if parsers is None:
                        yield event
                    else:
                        for parsed in with_tool_calls(parsers, event):
                            yield parsed
                usage: Usage = future.result()
                metrics.PROMPT_TOKENS.labels(slot.entry.id).inc(usage.prompt_tokens)
                metrics.GENERATED_TOKENS.labels(slot.entry.id).inc(usage.completion_tokens)
                if (caller := current_caller.get()) is not None:
                    caller.charge_tokens(usage.prompt_tokens + usage.completion_tokens)
                yield usage
            finally:
                cancelled.set()
                # Hold the lease until the runner has really stopped using the model.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(asyncio.wrap_future(future))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._check_generation(request)
        choices = [Choice(index=i) for i in range(request.params.n)]
        calls: list[list[ToolCallDelta]] = [[] for _ in choices]
        usage = Usage(0, 0)
        async for event in self.stream(request):
            if isinstance(event, TextDelta):
                choices[event.index].text += event.text
            elif isinstance(event, ToolCallDelta):
                calls[event.index].append(event)
            elif isinstance(event, ChoiceFinished):
                choices[event.index].finish_reason = event.finish_reason
            else:
                usage = event
        for choice, deltas in zip(choices, calls, strict=True):
            choice.tool_calls = join_deltas(deltas)
        return GenerationResult(model=request.model, choices=choices, usage=usage)

    def _check_all(self, requests: list[GenerationRequest]) -> None:
        check_count(len(requests), self.settings.max_prompts, "prompt", "max_prompts")
        for request in requests:
            self._check_generation(request)

    async def generate_all(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Several prompts of one request, decoded concurrently (batched together); the
        first failure cancels the others."""
        self._check_all(requests)
        tasks = [asyncio.create_task(self.generate(request)) for request in requests]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stream_all(
        self, requests: list[GenerationRequest]
    ) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """The events of several prompts as they are decoded concurrently, each with its
        prompt's index; closing the iterator stops them all."""
        self._check_all(requests)
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            try:
                async for event in self.stream(request):
                    queue.put_nowait((index, event))
            finally:
                queue.put_nowait((index, _DONE))

        tasks = [asyncio.create_task(pump(i, request)) for i, request in enumerate(requests)]
        try:
            running = len(tasks)
            while running:
                index, event = await queue.get()
                if event is _DONE:
                    running -= 1
                    await tasks[index]  # raises that prompt's error
                else:
                    yield index, event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- embeddings --------------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        count = len(request)
        check_count(count, self.settings.max_embedding_inputs, "input", "max_embedding_inputs")
        for index, text in enumerate(request.texts or []):
            if not text:
                raise InvalidRequestError(f"input[{index}] is an empty string", param="input")
        async with self.manager.lease(request.model, "embedding") as slot:
            adapter = slot.adapter
            adapter.check_dimensions(request.dimensions)
            size = sum(map(len, request.texts or request.token_ids or []))
            inputs = await off_loop_if_large(size, adapter.tokenize, request)
            tokens = sum(map(len, inputs))
            vectors = await slot.runner.submit_all(inputs)
            metrics.PROMPT_TOKENS.labels(slot.entry.id).inc(tokens)
            metrics.EMBEDDED_INPUTS.labels(slot.entry.id).inc(count)
            if (caller := current_caller.get()) is not None:
                caller.charge_tokens(tokens)
            matrix = truncate_dimensions(np.stack(vectors), request.dimensions)
            return EmbeddingResult(model=request.model, vectors=matrix, prompt_tokens=tokens)

    # -- speech ------------------------------------------------------------------------------

    def transcribe_stream(
        self, request: TranscriptionRequest
    ) -> AsyncIterator[TranscriptSegment | TranscriptionInfo]:
        return speech.transcribe_stream(self.manager, self.settings, request)

    async def transcribe(self, request: TranscriptionRequest) -> Transcription:
        return await speech.transcribe(self.manager, self.settings, request)

    def speak(self, request: SpeechRequest) -> AsyncIterator[SpeechChunk]:
        return speech.speak(self.manager, request)

    # -- images ------------------------------------------------------------------------------

    async def generate_images(self, request: ImageRequest) -> ImageResult:
        return await images.generate_images(self.manager, request)

    # -- rerank and moderation ---------------------------------------------------------------

    async def rerank(self, request: RerankRequest) -> RerankResult:
        return await ranking.rerank(self.manager, self.settings, request)

    async def moderate(self, request: ModerationRequest) -> ModerationResult:
        return await ranking.moderate(self.manager, self.settings, request)
