"""The generation core: iteration-level continuous batching over any `ChatBackend`.

It owns sequences and holds no tensors. Each step, on the engine's shared compute thread:
admit waiting requests while the backend has room (sequences and KV tokens, reserved for a
request's whole reply so a running sequence never runs out), drop cancelled ones, then hand
the backend one plan: a chunk of each admitted prompt (up to `prefill_chunk_tokens` in all,
so running streams keep flowing while a long prompt prefills) and the newest token of every
running sequence. From the logits rows it gets back it samples each sequence's next token,
detokenizes, finds stop strings and emits text; finished and cancelled sequences are released
at once. A prompt's `n` choices share its prefill: the backend forks its cache.

A prompt with backend extras (images) is prefilled whole, in a backend call of its own: the
vision tower's features must land on the prompt's image tokens in a single pass, and a prompt
the model refuses fails alone.

Failures: a backend step that raises fails the requests in that step; a sampling or
detokenizing error fails only its own request. Nothing here can stop the compute thread.

Locking: `_cond` (the compute thread's condition) guards the waiting queue and the reserved
counters shared with submitters; everything else is touched only by the compute thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.contracts.chat import (
    ChatBackend,
    ChoiceFinished,
    DecodeToken,
    FinishReason,
    GenerationEvent,
    PrefillChunk,
    PromptInput,
    Sampling,
    SamplingParams,
    StepPlan,
    TextDelta,
    Usage,
)
from engine.core import logs, metrics
from engine.core.compute import ComputeThread
from engine.core.errors import (
    ContextLengthExceededError,
    DeadlineExceededError,
    EmberError,
    InvalidRequestError,
    ModelUnavailableError,
    OverloadedError,
    is_out_of_memory,
    model_failure,
)
from engine.core.sampling import SamplerState, choose_tokens
from engine.generation.structured import GrammarCompiler, mask_logits
from engine.generation.text_stream import IncrementalDetokenizer, StopStringMatcher

log = logging.getLogger(__name__)

RECOVERY_STEPS = 200  # clean steps after an out-of-memory step before the batch cap doubles


@dataclass(eq=False)  # compared by identity
class SequenceState:
    """One choice being generated."""

    seq_id: int
    index: int
    sampler: SamplerState
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    length: int  # tokens in the backend's KV cache
    next_token: int = -1  # sampled, not yet in the cache
    last_token_at: float = 0.0  # monotonic time of its latest token (inter-token metric)
    text: str = ""
    emitted: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    # The grammar the output must follow (an llguidance matcher), advanced token by token.
    matcher: Any = None


@dataclass(eq=False)  # compared by identity
class ChatJob:
    """One request: its prompt, its settled sampling, and its `n` sequences once prefilled."""

    prompt: PromptInput
    sampling: Sampling
    max_tokens: int
    emit: Callable[[GenerationEvent], None]
    cancelled: threading.Event
    deadline: float
    reserved_kv: int
    grammar: Any = None  # a compiled matcher at its start, for every choice to copy
    future: Future[Usage] = field(default_factory=Future)
    prefill_id: int = -1  # the sequence the prompt is prefilled under (choice 0's)
    prefilled: int = 0
    sequences: list[SequenceState] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    settled: bool = False  # released and its future set (by `_complete`)
    # The HTTP request's id (read at submit, on the event loop), for the compute thread's logs.
    request_id: str = field(default_factory=logs.request_id.get)

    def usage(self) -> Usage:
        return Usage(len(self.prompt.ids), sum(s.completion_tokens for s in self.sequences))


class ChatScheduler:
    def __init__(
        self,
        backend: ChatBackend,
        name: str,
        compute: ComputeThread,
        *,
        max_batch_size: int,
        max_queue: int,
        kv_cache_tokens: int,
        prefill_chunk_tokens: int,
        timeout_s: float = 0,
        sampling_defaults: Mapping[str, Any] | None = None,
    ):
        self.backend = backend
        self.name = name
        self.max_sequences = min(max_batch_size, backend.max_sequences)
        # Admission cap: halved when a step runs out of memory (its requests get a 503 to
        # retry), doubled back after RECOVERY_STEPS clean steps.
        self.sequence_cap = self.max_sequences
        self._clean_steps = 0
        self.kv_capacity = min(kv_cache_tokens, backend.kv_capacity)
        self.max_queue = max_queue
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.timeout_s = timeout_s
        # The model's defaults: its registry `sampling:` block, then its generation_config.
        self.sampling_defaults = [dict(sampling_defaults or {}), backend.generation_defaults()]
        self._waiting: deque[ChatJob] = deque()
        self._compute = compute
        self._cond = compute.cond
        # Under _cond: what admitted jobs hold, read by submitters.
        self._admitted_jobs = 0
        self._reserved_sequences = 0
        self._reserved_kv = 0
        # Compute-thread state:
        self._prefilling: list[ChatJob] = []
        self._running: list[tuple[ChatJob, SequenceState]] = []
        self._ids = itertools.count()
        self.steps = 0
        # Output grammars for this model's vocabulary (compiled by submitters, off this thread).
        self.grammars = GrammarCompiler(backend.grammar_tokenizer)
        self._time_to_first_token = metrics.TIME_TO_FIRST_TOKEN.labels(name)
        self._inter_token = metrics.INTER_TOKEN_SECONDS.labels(name)
        self._kv_used = metrics.KV_CACHE_USED.labels(name)
        compute.add(self)

    # -- submitters (any thread) -------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return len(self._waiting) + self._admitted_jobs

    @property
    def queued(self) -> int:
        """Requests waiting for admission (not yet running)."""
        return len(self._waiting)

    @property
    def active_sequences(self) -> int:
        return len(self._running)

    @property
    def load_fraction(self) -> float:
        return len(self._waiting) / self.max_queue

    def settle(self, params: SamplingParams) -> Sampling:
        """The request's sampling with the model's defaults filled in."""
        return params.resolved(*self.sampling_defaults)

    def submit(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        emit: Callable[[GenerationEvent], None],
        cancelled: threading.Event,
        param: str = "messages",
        grammar: Any = None,
    ) -> Future[Usage]:
        """Queue a request. Raises a 400-class error if it cannot fit the model (nothing is
        truncated silently) and OverloadedError (429) when the queue is full. `grammar`: a
        compiled matcher (engine/generation/structured.py) the output must follow."""
        sampling = self.settle(params)
        max_tokens, reserved = self._fit(prompt, sampling, explicit=params.max_tokens, param=param)
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else float("inf")
        job = ChatJob(prompt, sampling, max_tokens, emit, cancelled, deadline, reserved,
                      grammar)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise OverloadedError(
                    f"{self.name!r} has {len(self._waiting)} requests waiting (limit "
                    f"{self.max_queue}); retry shortly",
                    retry_after=1.0,
                )
            self._waiting.append(job)
            self._cond.notify()
        return job.future

    def _fit(
        self, prompt: PromptInput, sampling: Sampling, *, explicit: int | None, param: str
    ) -> tuple[int, int]:
        """(max_tokens, KV tokens to reserve) for a request, or a 400 stating the numbers."""
        if not prompt.ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        if sampling.n > self.backend.max_sequences:  # its hard limit (the batch size is not)
            raise InvalidRequestError(
                f"n must be at most {self.backend.max_sequences} for {self.name!r}; "
                f"got {sampling.n}",
                param="n",
            )
        context = self.backend.context_length
        prompt_len, n = len(prompt.ids), sampling.n
        room = context - prompt_len
        asked = sampling.max_tokens
        if room <= 0 or (explicit is not None and explicit > room):
            wanted = f"{prompt_len} in the prompt" + (f" + {asked} to generate" if explicit else "")
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens; the request needs "
                f"{wanted} = {prompt_len + (explicit or 0)} tokens. Shorten the prompt or "
                "lower max_tokens.",
                param=param if room <= 0 else "max_tokens",
            )
        max_tokens = min(asked, room) if asked is not None else room
        # n choices reserve their whole replies; a default max_tokens shrinks to fit, one the
        # caller set is refused with the numbers rather than cut.
        fits = self.kv_capacity // n - prompt_len
        if max_tokens > fits:
            if explicit is not None or fits < 1:
                raise ContextLengthExceededError(
                    f"{n} choice(s) of {prompt_len} prompt + {max_tokens} completion tokens "
                    f"need {n * (prompt_len + max_tokens)} KV-cache tokens; {self.name!r} "
                    f"holds {self.kv_capacity}. Lower n or max_tokens.",
                    param="max_tokens" if explicit is not None else param,
                )
            max_tokens = fits
        return max_tokens, n * (prompt_len + max_tokens)

    def shutdown(self, error: EmberError | None = None) -> None:
        """Leave the compute thread; anything still queued fails with `error` (the manager
        unloads a model only when no request holds it, so normally nothing is)."""
        self._compute.remove(self)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        gone = error or ModelUnavailableError(f"{self.name!r} was unloaded")
        for job in waiting:
            with contextlib.suppress(InvalidStateError):
                job.future.set_exception(gone)
        self._fail(self._jobs_in_flight(), gone)

    # -- the compute thread ------------------------------------------------------------------

    def ready_in(self, now: float) -> float | None:
        return 0 if (self._waiting or self._running or self._prefilling) else None

    def step(self) -> None:
        try:
            self._step()
        except Exception as exc:  # a bug here must not leave requests waiting forever
            jobs = self._jobs_in_flight()
            log.exception("%s: scheduler step failed; failing requests %s", self.name,
                          _ids(jobs))
            self._fail(jobs, model_failure(self.name, exc))
        self._kv_used.set(self._reserved_kv / self.kv_capacity)

    def _step(self) -> None:
        with self._cond:
            self._admit()
        self._drop_cancelled()
        for plan in self._plans():
            try:
                logits = self.backend.execute(plan)
            except Exception as exc:  # a broken step fails its requests, never the server
                jobs = self._jobs_in(plan)
                log.exception("%s: step failed; failing requests %s", self.name, _ids(jobs))
                if is_out_of_memory(exc):
                    self._shrink_batches()
                self._fail(jobs, model_failure(self.name, exc))
                continue
            self.steps += 1
            self._clean_steps += 1
            if self.sequence_cap < self.max_sequences and self._clean_steps >= RECOVERY_STEPS:
                self.sequence_cap = min(self.max_sequences, self.sequence_cap * 2)
                self._clean_steps = 0
            if plan.decode:
                metrics.BATCH_SIZE.labels(self.name).observe(len(plan.decode))
            self._take_logits(plan, logits)

    def _shrink_batches(self) -> None:
        """Out of memory: the next batches hold half as many sequences (what the failed
        requests' retries get), until clean steps bring the cap back."""
        with self._cond:
            self.sequence_cap = max(1, min(self.sequence_cap, self._reserved_sequences) // 2)
        self._clean_steps = 0
        log.warning("%s: out of memory; at most %d sequences per batch for now", self.name,
                    self.sequence_cap)

    def _admit(self) -> None:
        """Under `_cond`: take waiting jobs, in order, while sequences and KV allow."""
        now = time.monotonic()
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set() or now > job.deadline:
                self._waiting.popleft()
                self._finish_unstarted(job, now)
                continue
            n = job.sampling.n
            fits = (self._reserved_sequences + n <= self.sequence_cap
                    and self._reserved_kv + job.reserved_kv <= self.kv_capacity)
            if not fits and self._admitted_jobs:  # a job that would run alone always goes
                return
            self._waiting.popleft()
            self._admitted_jobs += 1
            self._reserved_sequences += n
            self._reserved_kv += job.reserved_kv
            job.prefill_id = next(self._ids)
            self._prefilling.append(job)

    def _finish_unstarted(self, job: ChatJob, now: float) -> None:
        with contextlib.suppress(InvalidStateError):  # abandoned: the caller was told
            if job.cancelled.is_set():
                job.future.set_result(job.usage())
            else:
                waited = now - (job.deadline - self.timeout_s)
                job.future.set_exception(DeadlineExceededError(
                    f"{self.name!r}: the request waited {waited:.1f}s in the queue, past its "
                    f"{self.timeout_s:.0f}s deadline"))

    def _plans(self) -> list[StepPlan]:
        """This step's work: every running sequence's next token and prompt chunks within
        the chunk budget; a prompt with extras goes whole in a plan of its own, after the
        others, so that if it fails it fails alone."""
        plan = StepPlan(decode=[DecodeToken(seq.seq_id, seq.next_token, seq.length)
                                for _, seq in self._running])
        plans = [plan]
        budget = self.prefill_chunk_tokens
        for job in self._prefilling:
            ids = job.prompt.ids
            if job.prompt.extras is not None:
                if not plan.prefill:
                    chunk = PrefillChunk(job.prefill_id, ids, 0, True, job.prompt.extras)
                    plans.append(StepPlan(prefill=[chunk]))
                break
            take = min(len(ids) - job.prefilled, budget)
            if take <= 0:
                break
            end = job.prefilled + take
            plan.prefill.append(PrefillChunk(job.prefill_id, ids[job.prefilled:end],
                                             job.prefilled, end == len(ids)))
            budget -= take
        return [p for p in plans if p]

    def _take_logits(self, plan: StepPlan, logits: np.ndarray) -> None:
        by_id = {seq.seq_id: (job, seq) for job, seq in self._running}
        decoded = [by_id[d.seq_id] for d in plan.decode]
        decode_rows = logits[len(logits) - len(plan.decode):]
        for chunk in plan.prefill:
            job = next(j for j in self._prefilling if j.prefill_id == chunk.seq_id)
            job.prefilled = chunk.start + len(chunk.tokens)
        rows = {seq_id: row for row, seq_id in enumerate(plan.logit_seq_ids())}
        started = [job for job in self._prefilling if job.prefilled == len(job.prompt.ids)]
        self._prefilling = [job for job in self._prefilling if job not in started]
        for job in started:
            job.prompt.extras = None  # in the KV cache now; free the pixels
            self._guarded(job, self._start, job, logits[rows[job.prefill_id]])
        if decoded:
            self._advance_running(decoded, decode_rows)

    def _start(self, job: ChatJob, row: np.ndarray) -> None:
        """A prompt is prefilled: fork it into its n choices, each sampling its first token."""
        n = job.sampling.n
        ids = [job.prefill_id] + [next(self._ids) for _ in range(n - 1)]
        vocab = self.backend.vocab_size
        job.sequences = [
            SequenceState(
                seq_id=seq_id, index=index,
                sampler=SamplerState(job.sampling, vocab, job.prompt.ids, index),
                detok=IncrementalDetokenizer(self.backend.detokenize),
                stops=StopStringMatcher(job.sampling.stop), length=len(job.prompt.ids),
            )
            for index, seq_id in enumerate(ids)
        ]
        if n > 1:
            self.backend.fork(job.prefill_id, ids[1:])
        rows: np.ndarray = np.broadcast_to(row, (n, len(row)))
        if job.grammar is not None:  # each choice its own matcher, and its own masked row
            rows = rows.copy()
            for seq, masked in zip(job.sequences, rows, strict=True):
                seq.matcher = job.grammar.deep_copy()
                mask_logits(seq.matcher, masked)
        tokens = choose_tokens(rows, [seq.sampler for seq in job.sequences])
        for seq in job.sequences:
            self._running.append((job, seq))
        for seq, token in zip(job.sequences, tokens, strict=True):
            self._advance(job, seq, token)
        self._finish_if_done(job)

    def _advance_running(
        self, decoded: list[tuple[ChatJob, SequenceState]], logits: np.ndarray
    ) -> None:
        """The sequences decoded this step take their next token."""
        constrained = [row for row, (_, seq) in enumerate(decoded) if seq.matcher is not None]
        if constrained and not logits.flags.writeable:
            logits = logits.copy()
        for row in constrained:  # by sequence: the row is wherever the plan put it
            self._guarded(decoded[row][0], mask_logits, decoded[row][1].matcher, logits[row])
        tokens = logits.argmax(axis=1).tolist() if len(logits) else []
        for row, (job, seq) in enumerate(decoded):
            if not seq.sampler.sampling.greedy:  # each alone: a failure fails its own request
                picked = self._guarded(job, choose_tokens, logits[row:row + 1], [seq.sampler])
                tokens[row] = picked[0] if picked else -1
        for (job, seq), token in zip(decoded, tokens, strict=True):
            if token < 0 or job.future.done() or seq.finish_reason:
                continue
            seq.length += 1  # the token it decoded is in the cache now
            self._guarded(job, self._advance, job, seq, token)
        for job in {id(job): job for job, seq in decoded if seq.finish_reason}.values():
            self._finish_if_done(job)

    def _advance(self, job: ChatJob, seq: SequenceState, token: int) -> None:
        """Account one generated token: finished (eos, a stop string, max_tokens)? Emit the
        text that is now final."""
        seq.completion_tokens += 1
        seq.sampler.record(token)
        seq.next_token = token
        now = time.monotonic()
        if seq.completion_tokens == 1:
            self._time_to_first_token.observe(now - job.submitted)
        else:
            self._inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            raise RuntimeError(f"the output grammar refused token {token}: "
                               f"{seq.matcher.get_error()}")
        if token in self.backend.eos_ids and (not job.sampling.ignore_eos or seq.matcher):
            seq.finish_reason = "stop"
        else:
            before = len(seq.text)
            seq.text += seq.detok.add(token)
            cut = seq.stops.find(seq.text, before)
            if cut >= 0:
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
            elif seq.matcher is not None and seq.matcher.is_stopped():
                seq.finish_reason = "stop"  # the grammar is complete: nothing may follow
            elif seq.completion_tokens >= job.max_tokens:
                seq.finish_reason = "length"
        safe = len(seq.text) if seq.finish_reason else seq.stops.safe_length(seq.text)
        if safe > seq.emitted:
            job.emit(TextDelta(seq.index, seq.text[seq.emitted:safe]))
            seq.emitted = safe
        if seq.finish_reason:
            job.emit(ChoiceFinished(seq.index, seq.finish_reason))
            self._release(seq)

    def _guarded(self, job: ChatJob, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn for one job; if it raises, that job fails alone."""
        try:
            return fn(*args)
        except Exception as exc:
            log.exception("%s: request %s failed while decoding", self.name, job.request_id)
            self._fail([job], model_failure(self.name, exc))
            return None

    def _release(self, seq: SequenceState) -> None:
        self._running = [(j, s) for j, s in self._running if s is not seq]
        self._release_id(seq.seq_id)

    def abandon(self, error: Exception) -> None:
        """Another thread, while a step is stuck: every request held ends with `error` now;
        they are released (as cancelled) once the compute thread is back."""
        with self._cond:
            held = [*self._waiting, *self._prefilling, *(job for job, _ in self._running)]
        for job in held:
            job.cancelled.set()
            with contextlib.suppress(InvalidStateError):
                job.future.set_exception(error)

    def _drop_cancelled(self) -> None:
        gone = [job for job in self._jobs_in_flight() if job.cancelled.is_set()]
        for job in gone:
            self._complete(job)

    def _jobs_in_flight(self) -> list[ChatJob]:
        jobs = {id(job): job for job in self._prefilling}
        jobs.update({id(job): job for job, _ in self._running})
        return list(jobs.values())

    def _jobs_in(self, plan: StepPlan) -> list[ChatJob]:
        ids = {c.seq_id for c in plan.prefill} | {d.seq_id for d in plan.decode}
        jobs = {id(job): job for job in self._prefilling if job.prefill_id in ids}
        jobs.update({id(job): job for job, seq in self._running if seq.seq_id in ids})
        return list(jobs.values())

    def _finish_if_done(self, job: ChatJob) -> None:
        if job.sequences and all(seq.finish_reason for seq in job.sequences):
            self._complete(job)

    def _complete(self, job: ChatJob, error: BaseException | None = None) -> None:
        """Release whatever the job still holds in the backend, and settle its future (unless
        `abandon` already did)."""
        if job.settled:
            return
        job.settled = True
        if job in self._prefilling:
            self._prefilling.remove(job)
        if not job.sequences:
            self._release_id(job.prefill_id)
        for seq in job.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                self._release(seq)
            elif any(s is seq for _, s in self._running):
                self._release(seq)  # finished, but the job failed (emit raised) before that
        with self._cond:
            self._admitted_jobs -= 1
            self._reserved_sequences -= job.sampling.n
            self._reserved_kv -= job.reserved_kv
        with contextlib.suppress(InvalidStateError):  # abandoned: the caller was told
            if error is None:
                job.future.set_result(job.usage())
            else:
                job.future.set_exception(error)

    def _release_id(self, seq_id: int) -> None:
        try:
            self.backend.release(seq_id)
        except Exception:
            log.exception("%s: releasing sequence %d failed", self.name, seq_id)

    def _fail(self, jobs: list[ChatJob], error: BaseException) -> None:
        for job in jobs:
            self._complete(job, error)


def _ids(jobs: list[ChatJob]) -> str:
    return ", ".join(job.request_id for job in jobs) or "none"
