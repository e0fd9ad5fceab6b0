"""ChatScheduler, the generation core, over a fake ChatBackend in pure Python and numpy.

`FakeBackend` is a deterministic "model" with a 64-token vocabulary: its next token is a
function of the sequence so far (`FakeBackend.predict`), so greedy output can be computed
independently (`reference`) and compared with what the scheduler streams. It checks the
ChatBackend contract on every call and raises (recording a violation) when the core breaks
it: a chunk that does not continue its sequence, a decode at the wrong position or of a
sequence it does not hold, a fork before the prompt is in, more sequences or KV tokens than
it has.

How the tests drive the scheduler: most build it on a ComputeThread that is closed at once.
`ComputeThread.add` only registers the runner, so a closed thread never steps it and the test
calls `scheduler.step()` itself: each step's plan is exact and assertable, with no sleeps and
no races (a live thread can take several steps between two looks). A few tests run on a live
ComputeThread and wait on futures with timeouts, to check the threaded path end to end; they
use callbacks on the compute thread, not timing, to decide when things happen.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import llguidance
import numpy as np
import pytest

import engine.generation.scheduler as scheduler_module
from engine.contracts.chat import (
    ChatBackend,
    ChatMessage,
    ChoiceFinished,
    DecodeToken,
    FinishReason,
    GenerationEvent,
    PromptInput,
    SamplingParams,
    StepPlan,
    TextDelta,
    ToolSpec,
    Usage,
)
from engine.core.compute import ComputeThread
from engine.core.errors import (
    ContextLengthExceededError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelExecutionError,
    ModelOutOfMemoryError,
    OverloadedError,
)
from engine.core.sampling import SamplerState
from engine.generation.scheduler import ChatScheduler

# -- the fake model ----------------------------------------------------------------------------

VOCAB = 64
EOS = VOCAB - 1
# Tokens 0..51 are one letter each (t -> chr(ord("a") + t % 26)); these are longer.
MULTI = {52: "ab", 53: "cd", 54: " the", 55: "<e", 56: "nd>", 57: "xy", 58: "z!", 59: "..",
         60: "\n", 61: "é", 62: "  "}
BY_TEXT = {text: token for token, text in MULTI.items()}
TIMEOUT = 5.0

Rule = Callable[[Sequence[int]], int]


def token_text(token: int) -> str:
    if token == EOS:
        return ""  # special: skipped
    return MULTI.get(token, chr(ord("a") + token % 26))


def text_of(tokens: Sequence[int]) -> str:
    return "".join(token_text(t) for t in tokens)


def tok(*texts: str) -> list[int]:
    """Token ids of texts, one token each ("h" -> 7, " the" -> 54)."""
    return [BY_TEXT[t] if t in BY_TEXT else ord(t) - ord("a") for t in texts]


def arithmetic(tokens: Sequence[int]) -> int:
    """The default model: never EOS on its own, and multi-character tokens now and then."""
    return (sum(tokens) + len(tokens)) % EOS


def scripted(prompt_len: int, reply: Sequence[int]) -> Rule:
    """A model that continues any prompt of `prompt_len` tokens with `reply`, then EOS."""

    def rule(tokens: Sequence[int]) -> int:
        done = len(tokens) - prompt_len
        return reply[done] if 0 <= done < len(reply) else EOS

    return rule


def make_prompt(length: int, salt: int) -> list[int]:
    """Prompts of different salts differ in their first token (salt < 50)."""
    return [(salt + 5 * i) % 50 for i in range(length)]


class FakeVocabulary:
    """The fake model's tokens, as llguidance's TokenizerWrapper reads a tokenizer."""

    eos_token_id = EOS
    bos_token_id = None
    special_token_ids = [EOS]
    tokens = [b"\xff<eos>" if t == EOS else token_text(t).encode() for t in range(VOCAB)]

    def __call__(self, text: bytes) -> list[int]:
        """Longest match first, as a BPE tokenizer would tend to."""
        ids, rest = [], text.decode()
        while rest:
            piece = max((t for t in BY_TEXT if rest.startswith(t)), key=len, default=rest[0])
            ids += tok(piece)
            rest = rest[len(piece):]
        return ids


class ContractViolation(AssertionError):
    pass


@dataclass(frozen=True)
class ChunkRecord:
    seq_id: int
    start: int
    tokens: tuple[int, ...]
    last: bool
    extras: bool


@dataclass(frozen=True)
class PlanRecord:
    prefill: tuple[ChunkRecord, ...]
    decode: tuple[DecodeToken, ...]

    @property
    def chunks(self) -> list[tuple[int, int, int, bool]]:
        """(seq_id, start, length, last) of each prefill chunk."""
        return [(c.seq_id, c.start, len(c.tokens), c.last) for c in self.prefill]

    @property
    def decoded(self) -> list[int]:
        return [d.seq_id for d in self.decode]

    def touches(self, seq_id: int | None) -> bool:
        return seq_id is not None and (
            seq_id in self.decoded or any(c.seq_id == seq_id for c in self.prefill))


class FakeBackend:
    vocab_size = VOCAB
    eos_ids = frozenset({EOS})

    def __init__(
        self,
        *,
        kv_capacity: int = 4096,
        max_sequences: int = 16,
        context_length: int = 512,
        eos_at: int | None = None,
        rule: Rule = arithmetic,
        defaults: dict[str, Any] | None = None,
        poison: int | None = None,
    ):
        self.kv_capacity = kv_capacity
        self.max_sequences = max_sequences
        self.context_length = context_length
        self.eos_at = eos_at  # EOS is the next token once a sequence is this long
        self.rule = rule
        self.defaults = defaults or {}
        self.poison = poison  # detokenize raises on it
        self.fail_calls: set[int] = set()  # execute calls (1-based) that raise
        self.fail_with: type[Exception] = RuntimeError
        self.tokens: dict[int, list[int]] = {}  # live sequences: their tokens in the "cache"
        self.prefilling: set[int] = set()  # live, prompt not all in yet
        self.prompt_len: dict[int, int] = {}
        self.prefilled: dict[int, list[int]] = {}  # every sequence's prompt tokens, ever
        self.ever: set[int] = set()
        self.plans: list[PlanRecord] = []
        self.forks: list[tuple[int, tuple[int, ...]]] = []
        self.released: list[int] = []
        self.violations: list[str] = []
        self.peak_sequences = 0
        self.peak_kv = 0
        self.calls = 0
        self._lock = threading.Lock()  # the live-thread tests read while the core runs

    # -- the "model" ---------------------------------------------------------------------------

    def predict(self, tokens: Sequence[int]) -> int:
        if self.eos_at is not None and len(tokens) == self.eos_at:
            return EOS
        return self.rule(tokens)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        # Greedy picks `predict`; at temperature 1 it has ~46% of the mass, the other
        # non-EOS tokens share the rest, and EOS is (all but) never drawn unless predicted.
        row = np.zeros(VOCAB, dtype=np.float32)
        row[EOS] = -30.0
        row[self.predict(tokens)] = 4.0
        return row

    # -- the contract --------------------------------------------------------------------------

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            self.violations.append(message)
            raise ContractViolation(message)

    def render_chat(self, messages: Sequence[ChatMessage],
                    tools: Sequence[ToolSpec] = ()) -> PromptInput:
        text = "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"
        return PromptInput(self.tokenize(text), text)

    def chat_template(self) -> str | None:
        return None

    def grammar_tokenizer(self) -> Any:
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(FakeVocabulary()),
                                      n_vocab=VOCAB)

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % EOS for c in text]

    def detokenize(self, ids: Sequence[int]) -> str:
        if self.poison is not None and self.poison in ids:
            raise ValueError(f"cannot detokenize {self.poison}")
        return text_of(ids)

    def generation_defaults(self) -> dict[str, Any]:
        return dict(self.defaults)

    def live_sequences(self) -> set[int]:
        with self._lock:
            return set(self.tokens)

    def seq_of(self, prompt: Sequence[int]) -> int | None:
        """The sequence a prompt was (or is being) prefilled under, if any."""
        with self._lock:
            ids = [s for s, got in self.prefilled.items() if got == list(prompt[:len(got)])]
        assert len(ids) <= 1, f"prompt prefilled under {ids}"
        return ids[0] if ids else None

    def execute(self, plan: StepPlan) -> np.ndarray:
        with self._lock:
            return self._execute(plan)

    def _execute(self, plan: StepPlan) -> np.ndarray:
        self.calls += 1
        self.plans.append(PlanRecord(
            tuple(ChunkRecord(c.seq_id, c.start, tuple(c.tokens), c.last, c.extras is not None)
                  for c in plan.prefill),
            tuple(plan.decode)))
        if self.calls in self.fail_calls:
            raise self.fail_with(f"injected failure in call {self.calls}")
        check = self._check
        staged: dict[int, list[int]] = {}  # checked first, applied only if all is well
        for chunk in plan.prefill:
            sid = chunk.seq_id
            check(sid not in staged, f"sequence {sid} twice in one plan")
            check(bool(chunk.tokens), f"empty chunk of {sid}")
            if chunk.extras is not None:
                check(chunk.start == 0 and chunk.last and len(plan.prefill) == 1
                      and not plan.decode, "a prompt with extras is prefilled whole, alone")
                if chunk.extras.get("fail"):
                    raise ValueError("the model cannot take this image")
            if chunk.start == 0:
                check(sid not in self.ever, f"sequence {sid} starts again (ids are never reused)")
                staged[sid] = list(chunk.tokens)
            else:
                check(sid in self.prefilling, f"chunk of {sid} at {chunk.start} continues nothing")
                check(chunk.start == len(self.tokens[sid]),
                      f"chunk of {sid} starts at {chunk.start}, not {len(self.tokens[sid])}")
                staged[sid] = self.tokens[sid] + list(chunk.tokens)
        ready = set(self.tokens) - self.prefilling
        for d in plan.decode:
            check(d.seq_id in ready, f"decode of {d.seq_id}, which it does not hold")
            check(d.seq_id not in staged, f"sequence {d.seq_id} twice in one plan")
            length = len(self.tokens[d.seq_id])
            check(d.position == length, f"decode of {d.seq_id} at {d.position}, not {length}")
            check(0 <= d.token < VOCAB, f"token {d.token} is not in the vocabulary")
            staged[d.seq_id] = self.tokens[d.seq_id] + [d.token]
        if plan.decode:  # as the transformers backend requires
            check({d.seq_id for d in plan.decode} == ready,
                  "a decode step covers exactly the running sequences")
        after = {**self.tokens, **staged}
        check(all(len(t) <= self.context_length for t in staged.values()), "past the context")
        self._check_room(after)
        self.tokens = after
        for chunk in plan.prefill:
            self.ever.add(chunk.seq_id)
            self.prefilled.setdefault(chunk.seq_id, []).extend(chunk.tokens)
            if chunk.last:
                self.prefilling.discard(chunk.seq_id)
                self.prompt_len[chunk.seq_id] = len(after[chunk.seq_id])
            else:
                self.prefilling.add(chunk.seq_id)
        rows = [self.logits(self.tokens[sid]) for sid in plan.logit_seq_ids()]
        return np.stack(rows) if rows else np.zeros((0, VOCAB), dtype=np.float32)

    def _check_room(self, after: dict[int, list[int]]) -> None:
        self._check(len(after) <= self.max_sequences,
                    f"{len(after)} sequences; it holds {self.max_sequences}")
        kv = sum(map(len, after.values()))
        self._check(kv <= self.kv_capacity, f"{kv} KV tokens; it holds {self.kv_capacity}")
        self.peak_sequences = max(self.peak_sequences, len(after))
        self.peak_kv = max(self.peak_kv, kv)

    def fork(self, parent: int, children: Sequence[int]) -> None:
        with self._lock:
            check = self._check
            check(parent in self.tokens and parent not in self.prefilling,
                  f"fork of {parent} before its last prefill chunk")
            check(len(self.tokens[parent]) == self.prompt_len[parent],
                  f"fork of {parent} after it decoded")
            check(len(set(children)) == len(children)
                  and not set(children) & (self.ever | {parent}), f"children {children} not new")
            after = {**self.tokens, **{c: list(self.tokens[parent]) for c in children}}
            self._check_room(after)
            self.tokens = after
            self.ever.update(children)
            self.prompt_len.update({c: self.prompt_len[parent] for c in children})
            self.forks.append((parent, tuple(children)))

    def release(self, seq_id: int) -> None:
        with self._lock:
            self.released.append(seq_id)
            self.tokens.pop(seq_id, None)
            self.prefilling.discard(seq_id)


@dataclass(frozen=True)
class Ref:
    tokens: list[int]
    text: str
    finish: FinishReason


def reference(
    backend: FakeBackend, prompt: Sequence[int], max_tokens: int, *, ignore_eos: bool = False,
    stop: Sequence[str] = (),
) -> Ref:
    """Greedy decoding of the fake model, one token at a time, with no scheduler."""
    seq, out = list(prompt), []
    while True:
        token = backend.predict(seq)
        out.append(token)
        text = text_of(out)
        if token == EOS and not ignore_eos:
            return Ref(out, text, "stop")
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return Ref(out, text[:min(hits)], "stop")
        if len(out) >= max_tokens:
            return Ref(out, text, "length")
        seq.append(token)


# -- driving the scheduler ---------------------------------------------------------------------


@dataclass
class Request:
    prompt: PromptInput
    future: Future[Usage]
    events: list[GenerationEvent]
    cancelled: threading.Event

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids

    def deltas(self, index: int = 0) -> list[str]:
        return [e.text for e in self.events if isinstance(e, TextDelta) and e.index == index]

    def text(self, index: int = 0) -> str:
        return "".join(self.deltas(index))

    def finishes(self, index: int = 0) -> list[FinishReason]:
        return [e.finish_reason for e in self.events
                if isinstance(e, ChoiceFinished) and e.index == index]

    def finish(self, index: int = 0) -> FinishReason | None:
        found = self.finishes(index)
        assert len(found) <= 1, f"choice {index} finished {len(found)} times"
        return found[0] if found else None

    def usage(self) -> Usage:
        return self.future.result(timeout=TIMEOUT)

    def error(self) -> BaseException:
        error = self.future.exception(timeout=TIMEOUT)
        assert error is not None, "the request did not fail"
        return error


def submit(
    scheduler: ChatScheduler, prompt: Sequence[int], *,
    on_event: Callable[[GenerationEvent], None] | None = None,
    extras: dict[str, Any] | None = None, cancelled: threading.Event | None = None,
    **params: Any,
) -> Request:
    events: list[GenerationEvent] = []

    def emit(event: GenerationEvent) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event)

    cancelled = cancelled or threading.Event()
    prompt_input = PromptInput(list(prompt), text_of(prompt), extras)
    future = scheduler.submit(prompt_input, SamplingParams(**params), emit, cancelled)
    return Request(prompt_input, future, events, cancelled)


def closed_compute() -> ComputeThread:
    compute = ComputeThread("test-scheduler-by-hand")
    compute.close()  # its loop has returned: only the test steps the scheduler
    return compute


def make(
    backend: FakeBackend, compute: ComputeThread | None = None, **options: Any
) -> ChatScheduler:
    settings: dict[str, Any] = {"max_batch_size": 8, "max_queue": 16, "kv_cache_tokens": 1 << 20,
                                "prefill_chunk_tokens": 64, "timeout_s": 0}
    settings.update(options)
    return ChatScheduler(backend, "fake", compute or closed_compute(), **settings)


@pytest.fixture
def live() -> Iterator[ComputeThread]:
    compute = ComputeThread("test-scheduler-live")
    yield compute
    compute.close()


def drain(scheduler: ChatScheduler, limit: int = 2000) -> int:
    """Step by hand until the scheduler has no work; the steps taken."""
    steps = 0
    while scheduler.ready_in(time.monotonic()) == 0:
        assert steps < limit, "the scheduler never went idle"
        scheduler.step()
        steps += 1
    return steps


def assert_idle(scheduler: ChatScheduler, backend: FakeBackend) -> None:
    assert backend.violations == []
    assert backend.live_sequences() == set()
    assert scheduler.pending == 0 and scheduler.active_sequences == 0
    assert scheduler.ready_in(time.monotonic()) is None
    held = (scheduler._admitted_jobs, scheduler._reserved_sequences, scheduler._reserved_kv)
    assert held == (0, 0, 0)


def wait_idle(scheduler: ChatScheduler, backend: FakeBackend) -> None:
    """A live thread settles a future a moment before its step ends."""
    deadline = time.monotonic() + TIMEOUT
    while scheduler.ready_in(time.monotonic()) is not None or backend.live_sequences():
        assert time.monotonic() < deadline, "the scheduler never went idle"
        time.sleep(0.001)
    assert_idle(scheduler, backend)


def assert_matches(request: Request, ref: Ref, index: int = 0) -> None:
    assert request.text(index) == ref.text
    assert request.finish(index) == ref.finish


def assert_greedy(request: Request, backend: FakeBackend, max_tokens: int, **options: Any) -> Ref:
    usage = request.usage()  # first: on a live thread, the text is complete once it is done
    ref = reference(backend, request.ids, max_tokens, **options)
    assert_matches(request, ref)
    assert usage == Usage(len(request.ids), len(ref.tokens))
    return ref


# -- the fake itself ---------------------------------------------------------------------------


def test_the_fake_backend_is_a_chat_backend_and_polices_the_contract() -> None:
    backend = FakeBackend()
    assert isinstance(backend, ChatBackend)
    assert backend.render_chat([ChatMessage("user", "hi")]).ids == backend.tokenize(
        "<user>hi<assistant>")
    with pytest.raises(ContractViolation, match="does not hold"):
        backend.execute(StepPlan(decode=[DecodeToken(7, 1, 0)]))
    backend.violations.clear()
    assert text_of(tok("h", "i", " the", "<e", "nd>")) == "hi the<end>"


def test_the_scheduler_module_imports_no_torch() -> None:
    code = ("import sys, engine.generation.scheduler, tests.unit.test_scheduler; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


# -- admission ---------------------------------------------------------------------------------


def test_a_request_whose_reservation_does_not_fit_waits_for_the_running_one() -> None:
    backend = FakeBackend(kv_capacity=64, context_length=128)
    scheduler = make(backend)
    first = submit(scheduler, make_prompt(10, 1), max_tokens=30, temperature=0)  # reserves 40
    second = submit(scheduler, make_prompt(10, 2), max_tokens=30, temperature=0)  # 40 more
    while not first.future.done():
        scheduler.step()
        assert backend.seq_of(second.ids) is None, "prefilled while the first still ran"
        assert scheduler.pending == (1 if first.future.done() else 2)
        # /v1/models' queued_requests: only the request still waiting, not the running one.
        assert scheduler.queued == 1
    scheduler.step()
    assert scheduler.queued == 0 and scheduler.pending == 1  # admitted: running, not queued
    assert backend.plans[-1].chunks == [(backend.seq_of(second.ids), 0, 10, True)]
    drain(scheduler)
    assert_greedy(first, backend, 30)
    assert_greedy(second, backend, 30)
    assert backend.peak_kv <= 40
    assert_idle(scheduler, backend)


def test_requests_that_fit_together_are_admitted_together() -> None:
    backend = FakeBackend(kv_capacity=80, context_length=128)
    scheduler = make(backend)
    first = submit(scheduler, make_prompt(10, 1), max_tokens=30, temperature=0)
    second = submit(scheduler, make_prompt(10, 2), max_tokens=30, temperature=0)  # 80 in all
    scheduler.step()
    assert [c[0] for c in backend.plans[0].chunks] == [backend.seq_of(first.ids),
                                                        backend.seq_of(second.ids)]
    drain(scheduler)
    assert_greedy(first, backend, 30)
    assert_greedy(second, backend, 30)
    assert_idle(scheduler, backend)


def test_a_request_that_would_run_alone_always_runs() -> None:
    # Its reservation is the whole KV budget; then n above the batch size (not the backend's
    # limit) runs alone, while the request behind it waits.
    backend = FakeBackend(kv_capacity=64, context_length=128, max_sequences=8)
    whole = make(backend)
    everything = submit(whole, make_prompt(10, 1), max_tokens=54, temperature=0)
    drain(whole)
    assert_greedy(everything, backend, 54)
    assert backend.peak_kv == 63  # the last token is sampled, never cached
    assert_idle(whole, backend)

    backend = FakeBackend(kv_capacity=512, max_sequences=8)
    scheduler = make(backend, max_batch_size=2)
    wide = submit(scheduler, make_prompt(5, 1), n=3, max_tokens=4, temperature=0)
    behind = submit(scheduler, make_prompt(5, 2), max_tokens=4, temperature=0)
    while not wide.future.done():
        scheduler.step()
        assert backend.seq_of(behind.ids) is None
    assert backend.peak_sequences == 3
    drain(scheduler)
    ref = reference(backend, wide.ids, 4)
    for index in range(3):
        assert_matches(wide, ref, index)
    assert_greedy(behind, backend, 4)
    assert_idle(scheduler, backend)


def test_a_defaulted_max_tokens_shrinks_to_the_kv_budget_an_explicit_one_is_refused() -> None:
    backend = FakeBackend(kv_capacity=64, context_length=128)
    scheduler = make(backend)
    shrunk = submit(scheduler, make_prompt(10, 1), temperature=0)  # the context allows 118
    drain(scheduler)
    assert_greedy(shrunk, backend, 54)
    assert shrunk.usage().completion_tokens == 54 and shrunk.finish() == "length"

    pair = submit(scheduler, make_prompt(10, 2), temperature=0, n=2)  # 64 // 2 - 10 each
    drain(scheduler)
    ref = reference(backend, pair.ids, 22)
    assert_matches(pair, ref, 0)
    assert_matches(pair, ref, 1)
    assert pair.usage() == Usage(10, 44)

    plans = len(backend.plans)
    with pytest.raises(ContextLengthExceededError) as caught:
        submit(scheduler, make_prompt(10, 3), max_tokens=60, temperature=0)
    assert "70" in caught.value.message and "64" in caught.value.message
    assert caught.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceededError) as caught:
        submit(scheduler, make_prompt(10, 3), max_tokens=25, n=2, temperature=0)
    assert "70" in caught.value.message and "64" in caught.value.message
    assert scheduler.pending == 0 and len(backend.plans) == plans  # nothing was queued
    assert_idle(scheduler, backend)


def test_the_kv_budget_is_the_smaller_of_the_backends_and_the_settings() -> None:
    backend = FakeBackend(kv_capacity=1000, context_length=128)
    scheduler = make(backend, kv_cache_tokens=64)
    assert scheduler.kv_capacity == 64
    with pytest.raises(ContextLengthExceededError, match="64"):
        submit(scheduler, make_prompt(10, 1), max_tokens=60, temperature=0)


def test_prompt_plus_max_tokens_over_the_context_is_refused_with_both_numbers() -> None:
    backend = FakeBackend(context_length=128)
    scheduler = make(backend)
    with pytest.raises(ContextLengthExceededError) as caught:
        submit(scheduler, make_prompt(100, 1), max_tokens=40, temperature=0)
    assert "128" in caught.value.message and "140" in caught.value.message
    assert caught.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceededError) as caught:
        submit(scheduler, make_prompt(128, 1), temperature=0)  # no room for one token
    assert "128" in caught.value.message and caught.value.param == "messages"
    with pytest.raises(InvalidRequestError, match="empty"):
        submit(scheduler, [], temperature=0)
    assert scheduler.pending == 0 and backend.plans == []

    exact = submit(scheduler, make_prompt(100, 1), max_tokens=28, temperature=0)  # = 128
    defaulted = submit(scheduler, make_prompt(120, 2), temperature=0)  # the rest: 8
    drain(scheduler)
    assert_greedy(exact, backend, 28)
    assert_greedy(defaulted, backend, 8)
    assert_idle(scheduler, backend)


@pytest.mark.parametrize("kv_capacity", [4096, 32])
def test_n_over_the_backends_sequences_is_an_invalid_n(kv_capacity: int) -> None:
    # Also when the KV budget could not hold that many choices either: n is what to fix.
    backend = FakeBackend(max_sequences=4, kv_capacity=kv_capacity, context_length=128)
    scheduler = make(backend)
    with pytest.raises(InvalidRequestError) as caught:
        submit(scheduler, make_prompt(10, 1), n=5, temperature=0)
    assert type(caught.value) is InvalidRequestError
    assert caught.value.param == "n" and "4" in caught.value.message
    assert scheduler.pending == 0


def test_the_batch_size_caps_running_sequences_a_third_request_waits() -> None:
    backend = FakeBackend()
    scheduler = make(backend, max_batch_size=2)
    short = submit(scheduler, make_prompt(4, 1), max_tokens=3, temperature=0)
    long = submit(scheduler, make_prompt(4, 2), max_tokens=8, temperature=0)
    third = submit(scheduler, make_prompt(4, 3), max_tokens=4, temperature=0)
    while not short.future.done():
        scheduler.step()
        assert backend.seq_of(third.ids) is None
    scheduler.step()  # the freed row goes to the third, beside the running one
    plan = backend.plans[-1]
    assert plan.chunks == [(backend.seq_of(third.ids), 0, 4, True)]
    assert plan.decoded == [backend.seq_of(long.ids)]
    drain(scheduler)
    assert backend.peak_sequences == 2
    for request, max_tokens in ((short, 3), (long, 8), (third, 4)):
        assert_greedy(request, backend, max_tokens)
    assert_idle(scheduler, backend)


def test_a_full_queue_is_overloaded_and_takes_nothing() -> None:
    backend = FakeBackend()
    scheduler = make(backend, max_queue=2)
    queued = [submit(scheduler, make_prompt(4, i), max_tokens=3, temperature=0) for i in (1, 2)]
    assert scheduler.load_fraction == 1.0
    with pytest.raises(OverloadedError) as caught:
        submit(scheduler, make_prompt(4, 3), max_tokens=3, temperature=0)
    assert caught.value.retry_after >= 1
    drain(scheduler)
    for request in queued:
        assert_greedy(request, backend, 3)
    assert_idle(scheduler, backend)


# -- chunked prefill ---------------------------------------------------------------------------


def test_a_long_prompt_prefills_in_chunks_while_running_streams_keep_flowing() -> None:
    backend = FakeBackend()
    scheduler = make(backend, prefill_chunk_tokens=8)
    running = submit(scheduler, make_prompt(3, 1), max_tokens=20, temperature=0)
    scheduler.step()
    assert len(running.deltas()) == 1
    long = submit(scheduler, make_prompt(30, 2), max_tokens=4, temperature=0)
    for _ in range(4):
        scheduler.step()
    long_id, running_id = backend.seq_of(long.ids), backend.seq_of(running.ids)
    assert running_id is not None
    assert [p.chunks for p in backend.plans[1:5]] == [
        [(long_id, 0, 8, False)], [(long_id, 8, 8, False)], [(long_id, 16, 8, False)],
        [(long_id, 24, 6, True)]]
    ref = reference(backend, running.ids, 20).tokens
    assert [p.decode for p in backend.plans[1:5]] == [
        (DecodeToken(running_id, ref[i], 3 + i),) for i in range(4)]
    assert len(running.deltas()) == 5  # one token a step, chunks or not
    assert len(long.deltas()) == 1  # its first token came with its last chunk
    drain(scheduler)
    assert_greedy(running, backend, 20)
    assert_greedy(long, backend, 4)
    assert_idle(scheduler, backend)


def test_short_prompts_share_one_steps_chunk_budget() -> None:
    backend = FakeBackend()
    scheduler = make(backend, prefill_chunk_tokens=16)
    requests = [submit(scheduler, make_prompt(length, salt), max_tokens=5, temperature=0)
                for salt, length in ((1, 4), (2, 4), (3, 4), (4, 6))]
    scheduler.step()
    ids = [backend.seq_of(r.ids) for r in requests]
    assert backend.plans[0].chunks == [(ids[0], 0, 4, True), (ids[1], 0, 4, True),
                                       (ids[2], 0, 4, True), (ids[3], 0, 4, False)]
    assert backend.plans[0].decode == ()
    scheduler.step()
    assert backend.plans[1].chunks == [(ids[3], 4, 2, True)]
    assert backend.plans[1].decoded == ids[:3]
    drain(scheduler)
    for request in requests:
        assert_greedy(request, backend, 5)
    assert_idle(scheduler, backend)


# -- n -----------------------------------------------------------------------------------------


def test_n_choices_share_one_prefill_and_fork_into_their_own_sequences() -> None:
    backend = FakeBackend()
    scheduler = make(backend, prefill_chunk_tokens=8)
    request = submit(scheduler, make_prompt(12, 1), n=3, max_tokens=6, temperature=0)
    drain(scheduler)
    parent = backend.seq_of(request.ids)
    assert [p.chunks for p in backend.plans[:2]] == [[(parent, 0, 8, False)],
                                                     [(parent, 8, 4, True)]]
    assert len(backend.prefilled) == 1  # the prompt went in once
    assert len(backend.forks) == 1
    forked_from, children = backend.forks[0]
    seqs = [parent, *children]
    assert forked_from == parent and len(set(seqs)) == 3
    assert [(d.seq_id, d.position) for d in backend.plans[2].decode] == [(s, 12) for s in seqs]
    ref = reference(backend, request.ids, 6)
    for index in range(3):
        assert_matches(request, ref, index)
    assert request.usage() == Usage(12, 18)  # the prompt counted once
    assert_idle(scheduler, backend)


def run_sampled(companion: bool) -> list[str]:
    backend = FakeBackend()
    scheduler = make(backend)
    request = submit(scheduler, make_prompt(6, 1), n=3, max_tokens=12, temperature=1.0,
                     seed=1234)
    if companion:  # other rows in the batch must not move a seeded request's draws
        submit(scheduler, make_prompt(9, 2), max_tokens=20, temperature=1.0)
    drain(scheduler)
    assert request.usage() == Usage(6, 36)
    assert [request.finish(i) for i in range(3)] == ["length"] * 3
    assert_idle(scheduler, backend)
    return [request.text(i) for i in range(3)]


def test_seeded_sampling_is_reproducible_and_choices_differ() -> None:
    texts = run_sampled(companion=False)
    assert run_sampled(companion=False) == texts
    assert run_sampled(companion=True) == texts
    assert len(set(texts)) > 1


# -- stop strings, EOS, max_tokens -------------------------------------------------------------

PROMPT = make_prompt(5, 7)
REPLY = tok("h", "i", " the", "<e", "nd>", "x", "y")


@pytest.mark.parametrize(("stop", "text", "tokens"), [
    (["<end>"], "hi the", 5),  # spans "<e" + "nd>"
    (["he<"], "hi t", 4),  # starts inside " the"
    (["zzz", "e<"], "hi th", 4),  # the one that matched
    (["th"], "hi ", 3),  # inside one token
])
def test_a_stop_string_across_tokens_is_cut_and_never_streamed(
    stop: list[str], text: str, tokens: int
) -> None:
    backend = FakeBackend(rule=scripted(len(PROMPT), REPLY))
    scheduler = make(backend)
    request = submit(scheduler, PROMPT, stop=stop, max_tokens=10, temperature=0)
    drain(scheduler)
    assert request.text() == text and request.finish() == "stop"
    assert request.usage() == Usage(5, tokens)
    assert reference(backend, PROMPT, 10, stop=stop) == Ref(REPLY[:tokens], text, "stop")
    assert isinstance(request.events[-1], ChoiceFinished)  # nothing after it
    assert not any(s in request.text() for s in stop)
    assert_idle(scheduler, backend)


def test_a_partial_stop_match_is_held_back_then_released() -> None:
    reply = tok("a", "<e", "x", "b", "c")
    backend = FakeBackend(rule=scripted(len(PROMPT), reply))
    scheduler = make(backend)
    request = submit(scheduler, PROMPT, stop=["<end>"], max_tokens=5, temperature=0)
    seen = []
    for _ in range(5):
        scheduler.step()
        seen.append(request.deltas())
    assert seen == [["a"], ["a"], ["a", "<ex"], ["a", "<ex", "b"], ["a", "<ex", "b", "c"]]
    assert request.finish() == "length"
    assert request.usage() == Usage(5, 5)
    assert_idle(scheduler, backend)


def test_a_stop_string_in_the_first_token_stops_every_choice() -> None:
    backend = FakeBackend(rule=scripted(len(PROMPT), tok(" the", "x")))
    scheduler = make(backend)
    request = submit(scheduler, PROMPT, stop=["th"], n=2, max_tokens=5, temperature=0)
    scheduler.step()
    assert [request.text(i) for i in range(2)] == [" ", " "]
    assert [request.finish(i) for i in range(2)] == ["stop", "stop"]
    assert request.usage() == Usage(5, 2)
    assert backend.plans[0].decode == ()
    assert_idle(scheduler, backend)


@pytest.mark.parametrize(("max_tokens", "ignore_eos", "finish", "tokens"), [
    (10, False, "stop", 5),  # EOS is the 5th token
    (5, False, "stop", 5),  # EOS on the last allowed token is still a stop
    (3, False, "length", 3),
    (10, True, "length", 10),  # past EOS
])
def test_eos_is_stop_max_tokens_is_length_and_ignore_eos_goes_past_eos(
    max_tokens: int, ignore_eos: bool, finish: str, tokens: int
) -> None:
    prompt = make_prompt(6, 1)
    backend = FakeBackend(eos_at=len(prompt) + 4)
    scheduler = make(backend)
    request = submit(scheduler, prompt, max_tokens=max_tokens, ignore_eos=ignore_eos,
                     temperature=0)
    drain(scheduler)
    ref = assert_greedy(request, backend, max_tokens, ignore_eos=ignore_eos)
    assert (ref.finish, len(ref.tokens)) == (finish, tokens)
    assert (EOS in ref.tokens) == (tokens >= 5)
    assert_idle(scheduler, backend)


# -- cancellation and deadlines ----------------------------------------------------------------


def test_cancelling_mid_decode_releases_at_the_next_step_with_the_usage_so_far() -> None:
    backend = FakeBackend()
    scheduler = make(backend)
    cancelled = submit(scheduler, make_prompt(5, 1), max_tokens=20, temperature=0)
    other = submit(scheduler, make_prompt(5, 2), max_tokens=8, temperature=0)
    for _ in range(3):
        scheduler.step()
    seq = backend.seq_of(cancelled.ids)
    assert seq in backend.live_sequences()
    cancelled.cancelled.set()
    plans = len(backend.plans)
    scheduler.step()
    assert cancelled.usage() == Usage(5, 3)
    assert seq not in backend.live_sequences() and seq in backend.released
    drain(scheduler)
    assert not any(p.touches(seq) for p in backend.plans[plans:])
    assert cancelled.finish() is None  # nobody is listening
    assert cancelled.text() == reference(backend, cancelled.ids, 3).text
    assert_greedy(other, backend, 8)
    assert_idle(scheduler, backend)


def test_cancelling_a_waiting_request_means_it_is_never_prefilled() -> None:
    backend = FakeBackend()
    scheduler = make(backend, max_batch_size=1)
    running = submit(scheduler, make_prompt(5, 1), max_tokens=6, temperature=0)
    waiting = submit(scheduler, make_prompt(5, 2), max_tokens=6, temperature=0)
    scheduler.step()
    waiting.cancelled.set()
    drain(scheduler)
    assert waiting.usage() == Usage(5, 0)
    assert waiting.events == [] and backend.seq_of(waiting.ids) is None
    assert_greedy(running, backend, 6)
    assert_idle(scheduler, backend)


def test_cancelling_during_a_chunked_prefill_releases_the_partial_prompt() -> None:
    backend = FakeBackend()
    scheduler = make(backend, prefill_chunk_tokens=8)
    request = submit(scheduler, make_prompt(30, 1), max_tokens=6, temperature=0)
    scheduler.step()
    seq = backend.seq_of(request.ids)
    assert backend.live_sequences() == {seq}
    request.cancelled.set()
    drain(scheduler)
    assert request.usage() == Usage(30, 0)
    assert len(backend.plans) == 1
    assert_idle(scheduler, backend)


def test_cancelling_on_a_live_compute_thread(live: ComputeThread) -> None:
    backend = FakeBackend()
    scheduler = make(backend, live)

    cancelled, deltas = threading.Event(), [0]

    def cancel_after_three(event: GenerationEvent) -> None:  # runs on the compute thread
        deltas[0] += isinstance(event, TextDelta)
        if deltas[0] == 3:
            cancelled.set()

    request = submit(scheduler, make_prompt(5, 1), on_event=cancel_after_three,
                     cancelled=cancelled, max_tokens=50, temperature=0)
    assert request.usage() == Usage(5, 3)
    wait_idle(scheduler, backend)
    assert len(backend.plans) == 3
    scheduler.shutdown()


def test_a_request_waiting_past_its_deadline_gets_deadline_exceeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(scheduler_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    backend = FakeBackend()
    scheduler = make(backend, max_batch_size=1, timeout_s=5)
    running = submit(scheduler, make_prompt(5, 1), max_tokens=6, temperature=0)
    waiting = submit(scheduler, make_prompt(5, 2), max_tokens=6, temperature=0)
    scheduler.step()
    now[0] += 4.9
    scheduler.step()
    assert not waiting.future.done()
    now[0] += 0.2
    scheduler.step()
    error = waiting.error()
    assert isinstance(error, DeadlineExceededError) and "deadline" in str(error)
    drain(scheduler)
    assert backend.seq_of(waiting.ids) is None
    assert_greedy(running, backend, 6)  # admitted in time: it runs to the end
    assert_idle(scheduler, backend)


def test_shutdown_fails_what_is_queued_and_running() -> None:
    backend = FakeBackend()
    scheduler = make(backend, max_batch_size=1)
    running = submit(scheduler, make_prompt(5, 1), max_tokens=6, temperature=0)
    waiting = submit(scheduler, make_prompt(5, 2), max_tokens=6, temperature=0)
    scheduler.step()
    scheduler.shutdown()
    for request in (running, waiting):
        assert "unloaded" in str(request.error())
    assert_idle(scheduler, backend)


def test_unloading_waits_for_the_step_in_progress(live: ComputeThread) -> None:
    """The manager shuts a runner down through `between_steps`: never while a step runs
    (it once unloaded models under a running step at SIGTERM)."""
    backend = FakeBackend()
    in_step = threading.Event()
    real_execute = backend.execute

    def slow_execute(plan: StepPlan) -> Any:
        in_step.set()
        time.sleep(0.05)
        try:
            return real_execute(plan)
        finally:
            in_step.clear()

    backend.execute = slow_execute  # type: ignore[method-assign]
    scheduler = make(backend, live)
    request = submit(scheduler, make_prompt(5, 1), max_tokens=50, temperature=0)
    assert in_step.wait(TIMEOUT)
    seen_in_step = live.between_steps(in_step.is_set).result(TIMEOUT)
    assert seen_in_step is False
    live.between_steps(scheduler.shutdown).result(TIMEOUT)
    assert "unloaded" in str(request.error())
    assert_idle(scheduler, backend)


# -- failure isolation -------------------------------------------------------------------------


def test_a_failing_backend_step_fails_its_requests_and_the_next_one_is_served() -> None:
    backend = FakeBackend()
    backend.fail_calls = {2}
    scheduler = make(backend)
    doomed = [submit(scheduler, make_prompt(5, i), max_tokens=6, temperature=0) for i in (1, 2)]
    scheduler.step()
    scheduler.step()
    for request in doomed:
        assert "injected" in str(request.error())
    assert_idle(scheduler, backend)
    after = submit(scheduler, make_prompt(5, 3), max_tokens=6, temperature=0)
    drain(scheduler)
    assert_greedy(after, backend, 6)
    assert_idle(scheduler, backend)


def test_a_failing_step_says_which_model_failed() -> None:
    backend = FakeBackend()
    backend.fail_calls = {1}
    scheduler = make(backend)
    crashed = submit(scheduler, make_prompt(5, 1), max_tokens=6, temperature=0)
    scheduler.step()
    error = crashed.error()
    assert isinstance(error, ModelExecutionError) and error.status_code == 500
    assert "'fake'" in error.message and "injected failure in call 1" in error.message
    assert_idle(scheduler, backend)


def test_out_of_memory_is_a_503_and_the_retries_run_in_smaller_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("engine.generation.scheduler.RECOVERY_STEPS", 5)
    backend = FakeBackend()
    backend.fail_calls, backend.fail_with = {1}, MemoryError
    scheduler = make(backend)
    starved = [submit(scheduler, make_prompt(5, i), max_tokens=6, temperature=0)
               for i in range(4)]
    scheduler.step()
    for request in starved:
        error = request.error()
        assert isinstance(error, ModelOutOfMemoryError) and error.status_code == 503
        assert error.retry_after == 1.0
    assert scheduler.sequence_cap == 2  # 4 sequences ran out of memory: half as many now
    retried = [submit(scheduler, make_prompt(5, i), max_tokens=6, temperature=0)
               for i in range(4)]
    peak = 0
    while scheduler.ready_in(time.monotonic()) == 0:
        scheduler.step()
        peak = max(peak, scheduler._reserved_sequences)
    assert peak == 2
    for request in retried:
        assert_greedy(request, backend, 6)
    assert scheduler.sequence_cap == scheduler.max_sequences  # clean steps brought it back
    assert_idle(scheduler, backend)


def test_a_prompt_with_extras_is_prefilled_whole_alone_and_fails_alone() -> None:
    backend = FakeBackend()
    scheduler = make(backend, prefill_chunk_tokens=8)
    text = submit(scheduler, make_prompt(5, 1), max_tokens=10, temperature=0)
    scheduler.step()
    image = submit(scheduler, make_prompt(20, 2), extras={"pixels": 1}, max_tokens=4,
                   temperature=0)
    broken = submit(scheduler, make_prompt(6, 3), extras={"fail": True}, max_tokens=4,
                    temperature=0)
    after = submit(scheduler, make_prompt(6, 4), max_tokens=4, temperature=0)
    scheduler.step()
    image_id, text_id = backend.seq_of(image.ids), backend.seq_of(text.ids)
    assert backend.plans[1].decoded == [text_id] and backend.plans[1].prefill == ()
    assert backend.plans[2].chunks == [(image_id, 0, 20, True)]  # past the chunk budget
    assert backend.plans[2].prefill[0].extras and backend.plans[2].decode == ()
    assert image.prompt.extras is None  # in the cache now: the pixels are let go
    drain(scheduler)
    assert "cannot take this image" in str(broken.error())
    for request, max_tokens in ((text, 10), (image, 4), (after, 4)):
        assert_greedy(request, backend, max_tokens)
    assert_idle(scheduler, backend)


@pytest.mark.parametrize("fails_from_step", [1, 2])  # at its first token, or mid-decode
def test_a_request_whose_sampler_raises_fails_alone(
    monkeypatch: pytest.MonkeyPatch, fails_from_step: int
) -> None:
    real = scheduler_module.choose_tokens
    armed = [fails_from_step == 1]

    def flaky(logits: np.ndarray, states: Sequence[SamplerState]) -> list[int]:
        if armed[0] and any(s.sampling.seed == 13 for s in states):
            raise RuntimeError("the sampler broke")
        return real(logits, states)

    monkeypatch.setattr(scheduler_module, "choose_tokens", flaky)
    backend = FakeBackend()
    scheduler = make(backend)
    before = submit(scheduler, make_prompt(5, 1), max_tokens=8, temperature=0)
    broken = submit(scheduler, make_prompt(5, 2), max_tokens=8, temperature=1.0, seed=13)
    after = submit(scheduler, make_prompt(5, 3), max_tokens=8, temperature=0)
    scheduler.step()
    armed[0] = True
    drain(scheduler)
    assert "the sampler broke" in str(broken.error())
    assert len(broken.deltas()) == fails_from_step - 1 and broken.finish() is None
    assert_greedy(before, backend, 8)
    assert_greedy(after, backend, 8)
    assert_idle(scheduler, backend)


def test_a_request_whose_detokenizing_raises_fails_alone() -> None:
    fine, broken = make_prompt(5, 1), make_prompt(5, 2)
    backend = FakeBackend()
    fine_ref = reference(backend, fine, 10)
    poison = next(t for t in reference(backend, broken, 10).tokens if t not in fine_ref.tokens)
    backend.poison = poison
    scheduler = make(backend)
    requests = [submit(scheduler, ids, max_tokens=10, temperature=0) for ids in (fine, broken)]
    drain(scheduler)
    assert f"cannot detokenize {poison}" in str(requests[1].error())
    assert_greedy(requests[0], backend, 10)
    assert_idle(scheduler, backend)


@pytest.mark.parametrize("when", ["delta", "finish"])
def test_a_request_whose_emit_raises_fails_alone_and_frees_its_sequence(when: str) -> None:
    backend = FakeBackend()
    scheduler = make(backend)

    def broken_pipe(event: GenerationEvent) -> None:
        if (when == "delta" and isinstance(event, TextDelta) and len(broken.events) == 2) or (
                when == "finish" and isinstance(event, ChoiceFinished)):
            raise RuntimeError("the event loop is closed")

    fine = submit(scheduler, make_prompt(5, 1), max_tokens=8, temperature=0)
    broken = submit(scheduler, make_prompt(5, 2), on_event=broken_pipe, max_tokens=4,
                    temperature=0)
    drain(scheduler, limit=50)
    assert "closed" in str(broken.error())
    assert_greedy(fine, backend, 8)
    assert_idle(scheduler, backend)


# -- sampling defaults -------------------------------------------------------------------------


def test_the_models_sampling_defaults_apply_beneath_the_request() -> None:
    backend = FakeBackend()
    scheduler = make(backend, sampling_defaults={"temperature": 0, "max_tokens": 5})
    defaulted = submit(scheduler, make_prompt(5, 1))
    capped = submit(scheduler, make_prompt(5, 2), max_tokens=3)
    drain(scheduler)
    assert_greedy(defaulted, backend, 5)
    assert_greedy(capped, backend, 3)
    assert_idle(scheduler, backend)


def test_generation_config_defaults_sit_beneath_the_registrys() -> None:
    backend = FakeBackend(defaults={"temperature": 0.0, "max_tokens": 4, "top_k": 3,
                                    "top_p": 0.5})
    registry = make(backend, sampling_defaults={"max_tokens": 6, "top_p": 0.9})
    settled = registry.settle(SamplingParams())
    assert (settled.temperature, settled.max_tokens, settled.top_k, settled.top_p) == (
        0.0, 6, 3, 0.9)
    assert registry.settle(SamplingParams(temperature=0.7, top_k=0)).temperature == 0.7
    assert registry.settle(SamplingParams(top_k=0)).top_k == 0  # set, even if falsy
    assert registry.settle(SamplingParams()).min_p == 0.0  # neither sets it: OpenAI's
    from_registry = submit(registry, make_prompt(5, 1))
    drain(registry)
    assert_greedy(from_registry, backend, 6)
    assert_idle(registry, backend)

    backend = FakeBackend(defaults=backend.defaults)
    alone = make(backend)  # no registry `sampling:`: the checkpoint's own
    from_checkpoint = submit(alone, make_prompt(5, 2))
    drain(alone)
    assert_greedy(from_checkpoint, backend, 4)
    assert_idle(alone, backend)


# -- continuous batching end to end ------------------------------------------------------------

SPECS = [(3, 9), (17, 4), (5, 12), (30, 6), (9, 7), (12, 10)]  # (prompt length, max_tokens)


def test_staggered_greedy_requests_give_the_same_text_as_sequential_ones(
    live: ComputeThread,
) -> None:
    prompts = [make_prompt(length, salt) for salt, (length, _) in enumerate(SPECS, 1)]
    backend = FakeBackend()
    scheduler = make(backend, live, prefill_chunk_tokens=8, max_batch_size=4)
    alone = []
    for ids, (_, max_tokens) in zip(prompts, SPECS, strict=True):
        request = submit(scheduler, ids, max_tokens=max_tokens, temperature=0)
        request.usage()
        alone.append(request.text())
    wait_idle(scheduler, backend)
    steps_alone = scheduler.steps

    # Each newcomer is submitted while the one before is mid-decode: the one before holds
    # the compute thread in its second delta until the newcomer is queued.
    queued = [threading.Event() for _ in SPECS]
    reached = [threading.Event() for _ in SPECS]

    def hold_for_next(index: int) -> Callable[[GenerationEvent], None]:
        deltas = [0]

        def on_event(event: GenerationEvent) -> None:  # runs on the compute thread
            deltas[0] += isinstance(event, TextDelta)
            if deltas[0] == 2 and not reached[index].is_set():
                reached[index].set()
                assert queued[index].wait(TIMEOUT)

        return on_event

    together: list[Request] = []
    for index, (ids, (_, max_tokens)) in enumerate(zip(prompts, SPECS, strict=True)):
        if index:
            assert reached[index - 1].wait(TIMEOUT)
        together.append(submit(scheduler, ids, on_event=hold_for_next(index),
                               max_tokens=max_tokens, temperature=0))
        if index:
            queued[index - 1].set()
    queued[-1].set()
    for request, text, (_, max_tokens) in zip(together, alone, SPECS, strict=True):
        assert_greedy(request, backend, max_tokens)
        assert request.text() == text
    wait_idle(scheduler, backend)
    assert backend.peak_sequences >= 2
    # They really shared steps.
    assert scheduler.steps - steps_alone < sum(max_tokens for _, max_tokens in SPECS)
    scheduler.shutdown()


# -- output grammars ---------------------------------------------------------------------------


def grammar(scheduler: ChatScheduler, lark: str) -> Any:
    return scheduler.grammars.compile(llguidance.LLMatcher.grammar_from_lark(lark), "grammar")


WORD = r'start: /[a-c]{3,6}/ ".."'  # the fake model alone never writes this


def test_a_grammar_constrains_every_sampled_choice_and_ends_the_reply() -> None:
    backend = FakeBackend()
    scheduler = make(backend, max_queue=32)
    requests = []
    for salt in range(20):
        prompt = PromptInput(make_prompt(6, salt), "", None)
        events: list[GenerationEvent] = []
        future = scheduler.submit(prompt, SamplingParams(n=2, max_tokens=20, temperature=1.0,
                                                         seed=salt),
                                  events.append, threading.Event(),
                                  grammar=grammar(scheduler, WORD))
        requests.append(Request(prompt, future, events, threading.Event()))
    drain(scheduler)
    texts = set()
    for request in requests:
        for index in range(2):
            text = request.text(index)
            # "ab" is one token of the fake vocabulary; every text must still fit the grammar.
            assert re.fullmatch(r"[a-c]{3,6}\.\.", text), text
            assert request.finish(index) == "stop"
            texts.add(text)
    assert len(texts) > 5  # sampled, not forced to one answer
    assert_idle(scheduler, backend)


def test_constrained_and_free_requests_share_a_batch_and_the_free_ones_stay_free() -> None:
    backend = FakeBackend()
    scheduler = make(backend)
    alone = submit(scheduler, make_prompt(7, 3), max_tokens=10, temperature=0)
    drain(scheduler)
    free = submit(scheduler, make_prompt(7, 3), max_tokens=10, temperature=0)
    events: list[GenerationEvent] = []
    prompt = PromptInput(make_prompt(5, 9), "", None)
    future = scheduler.submit(prompt, SamplingParams(max_tokens=10, temperature=0),
                              events.append, threading.Event(),
                              grammar=grammar(scheduler, WORD))
    constrained = Request(prompt, future, events, threading.Event())
    late = submit(scheduler, make_prompt(8, 4), max_tokens=10, temperature=0)  # joins later
    drain(scheduler)
    assert free.text() == alone.text() and free.finish() == "length"
    assert_greedy(late, backend, 10)
    assert re.fullmatch(r"[a-c]{3,6}\.\.", constrained.text())
    assert any(len(p.decode) == 3 for p in backend.plans)  # all three in one step
    assert_idle(scheduler, backend)


def test_a_grammar_cut_by_max_tokens_finishes_with_length() -> None:
    backend = FakeBackend()
    scheduler = make(backend)
    events: list[GenerationEvent] = []
    prompt = PromptInput(make_prompt(5, 2), "", None)
    future = scheduler.submit(prompt, SamplingParams(max_tokens=2, temperature=0),
                              events.append, threading.Event(),
                              grammar=grammar(scheduler, WORD))
    drain(scheduler)
    request = Request(prompt, future, events, threading.Event())
    assert request.finish() == "length" and re.fullmatch(r"[a-c]+", request.text())
    assert_idle(scheduler, backend)


def test_a_grammar_the_compiler_cannot_enforce_is_an_invalid_request() -> None:
    scheduler = make(FakeBackend())
    source = llguidance.LLMatcher.grammar_from_json_schema({"type": "array", "uniqueItems": True})
    with pytest.raises(InvalidRequestError, match="uniqueItems"):
        scheduler.grammars.compile(source, "response_format")
