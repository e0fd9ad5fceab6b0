"""Chat and completions: the one implementation every dialect calls. Checks that need no
model come first; the prompt is rendered and tokenized by the model's backend (off the event
loop when large), and decoded by the model's continuous-batching scheduler on the compute
thread. Closing a stream early (client gone) stops decoding at the next step."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

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
from engine.core import metrics
from engine.core.access import current_caller
from engine.core.compute import off_loop_if_large
from engine.core.errors import InvalidRequestError, UnsupportedFeatureError
from engine.core.limits import check_count
from engine.core.manager import ModelManager
from engine.core.settings import Settings
from engine.generation import vision
from engine.generation.scheduler import ChatScheduler
from engine.generation.structured import check_constraint
from engine.generation.tool_calls import ToolCallParser, join_deltas

_DONE = object()


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


def refuse_unsupported(request: GenerationRequest) -> None:
    """The one place that refuses what a dialect can ask for but ember does not do yet."""
    if request.suffix:
        raise UnsupportedFeatureError("suffix (insertion) is not supported", param="suffix")
    if request.logprobs:
        raise UnsupportedFeatureError("logprobs are not supported yet", param="logprobs")
    if request.best_of is not None and request.best_of != request.params.n:
        raise UnsupportedFeatureError("best_of other than n is not supported", param="best_of")


class GenerationService:
    def __init__(self, settings: Settings, manager: ModelManager):
        self.settings = settings
        self.manager = manager
        self.registry = manager.registry

    def served_by(self, request: GenerationRequest) -> str:
        """The id of the model that answers `request` (a vision model for images)."""
        return vision.chat_entry(self.registry, request).id

    def _check_generation(self, request: GenerationRequest) -> None:
        """Checks that need no model, before any work (a huge `n` must never be worked on)."""
        refuse_unsupported(request)
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
        async with self.manager.lease_as(entry.id, entry.task, ChatBackend,
                                         ChatScheduler) as slot:
            backend, runner = slot.backend, slot.runner
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
        model = self.registry.model_or_default(request.model, "chat")
        return GenerationResult(model=model, choices=choices, usage=usage,
                                served_by=self.served_by(request))

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

