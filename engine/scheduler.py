"""Iteration-level continuous batching for one chat model.

Each step, run on the engine's shared compute thread: admit waiting requests while the batch
has room (rows and a KV-token budget), prefill them (several short prompts in one forward; a
long prompt in chunks across steps, so running streams keep flowing), let them join the
running batch, then run one decode step for every row. Finished rows leave at once; a
cancelled request (client gone) leaves at the next step. Each request streams its own events
through its `emit` callback.

A prompt with images (vision models) is admitted alone and prefilled in one multimodal
forward, never chunked and never batched with other prompts: the vision tower's features
must land on the prompt's image tokens in a single pass. From then on its rows decode in the
shared batch like text rows (with a per-row position offset on mRoPE models).

Locking: `_cond` (the compute thread's condition) guards the waiting queue and counters shared
with submitters; the batch itself (cache, mask, rows) is touched only inside `step`, which
only the compute thread runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from engine import metrics
from engine.compute import ComputeThread
from engine.errors import DeadlineExceededError, OverloadedError
from engine.types import GenerationEvent, SamplingParams, Usage
from models.chat import PreparedPrompt, SequenceState, TransformersChat
from models.chat_batching import KVBlock, concat_blocks, select_rows

log = logging.getLogger(__name__)


@dataclass
class ChatJob:
    prompt: PreparedPrompt
    params: SamplingParams
    emit: Callable[[GenerationEvent], None]
    cancelled: threading.Event
    deadline: float
    future: Future[Usage] = field(default_factory=Future)
    sequences: list[SequenceState] = field(default_factory=list)
    position_offset: int = 0  # set by a vision prefill; see TransformersChat.decode

    @property
    def has_images(self) -> bool:
        return self.prompt.vision_inputs is not None

    def usage(self) -> Usage:
        return Usage(len(self.prompt.ids), sum(s.completion_tokens for s in self.sequences))


@dataclass
class _Row:
    job: ChatJob
    seq: SequenceState
    next_token: int


@dataclass
class _ChunkedPrefill:
    job: ChatJob
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0


class ChatScheduler:
    def __init__(
        self,
        adapter: TransformersChat,
        name: str,
        compute: ComputeThread,
        *,
        max_batch_size: int,
        max_queue: int,
        kv_cache_tokens: int,
        prefill_chunk_tokens: int,
        timeout_s: float = 0,
    ):
        self.adapter = adapter
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.kv_cache_tokens = kv_cache_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.timeout_s = timeout_s
        self._waiting: deque[ChatJob] = deque()
        self._compute = compute
        self._cond = compute.cond
        self._running_jobs = 0  # admitted and not finished; read by submitters under _cond
        # Compute-thread state:
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._chunked: _ChunkedPrefill | None = None
        self.steps = 0
        compute.add(self)

    # -- submitters (any thread) -------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return len(self._waiting) + self._running_jobs

    @property
    def active_sequences(self) -> int:
        return len(self._rows)

    @property
    def load_fraction(self) -> float:
        return len(self._waiting) / self.max_queue

    def submit(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        emit: Callable[[GenerationEvent], None],
        cancelled: threading.Event,
    ) -> Future[Usage]:
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else float("inf")
        job = ChatJob(prompt, params, emit, cancelled, deadline)
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

    def shutdown(self) -> None:
        """Leave the compute thread; anything still queued fails (the manager unloads a
        model only when no request holds it, so normally nothing is)."""
        self._compute.remove(self)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        gone = RuntimeError(f"{self.name!r} was unloaded")
        for job in waiting:
            job.future.set_exception(gone)
        self._fail_everything(gone, [])

    # -- the compute thread ------------------------------------------------------------------

    def ready_in(self, now: float) -> float | None:
        return 0 if (self._waiting or self._rows or self._chunked) else None

    def step(self) -> None:
        with self._cond:
            admitted = self._admit()
        try:
            self._drop_cancelled()
            self._prefill(admitted)
            if self._rows:
                self._decode_step()
        except Exception as exc:  # a broken step fails its requests, never the server
            log.exception("%s: decode step failed", self.name)
            self._fail_everything(exc, admitted)

    def _admit(self) -> list[ChatJob]:
        """Under `_cond`: take waiting jobs while rows, KV budget and the prefill chunk allow."""
        admitted: list[ChatJob] = []
        now = time.monotonic()
        rows = len(self._rows)
        length = 0 if self._mask is None else int(self._mask.shape[1])
        prefill_tokens = 0
        while self._waiting and self._chunked is None:
            job = self._waiting[0]
            if job.cancelled.is_set() or now > job.deadline:
                self._waiting.popleft()
                self._finish_unstarted(job, now)
                continue
            n, prompt_len = job.params.n, len(job.prompt.ids)
            new_length = max(length, prompt_len)
            fits_rows = rows + n <= self.max_batch_size
            fits_kv = (rows + n) * new_length <= self.kv_cache_tokens
            # The first admitted prompt may be long (it is then prefilled alone, in chunks);
            # later ones join its prefill only while the total stays within one chunk.
            fits_chunk = not admitted or prefill_tokens + prompt_len <= self.prefill_chunk_tokens
            # A job that would run alone always goes, whatever its size: else it waits forever.
            alone = rows == 0 and not admitted
            if not alone and not (fits_rows and fits_kv and fits_chunk):
                break
            if job.has_images and admitted:  # an image prompt is prefilled alone
                break
            self._waiting.popleft()
            admitted.append(job)
            self._running_jobs += 1
            rows, length, prefill_tokens = rows + n, new_length, prefill_tokens + prompt_len
            if job.has_images:
                break
        return admitted

    def _finish_unstarted(self, job: ChatJob, now: float) -> None:
        if job.cancelled.is_set():
            job.future.set_result(job.usage())
        else:
            waited = now - (job.deadline - self.timeout_s)
            job.future.set_exception(DeadlineExceededError(
                f"{self.name!r}: the request waited {waited:.1f}s in the queue, past its "
                f"{self.timeout_s:.0f}s deadline"))

    def _prefill(self, admitted: list[ChatJob]) -> None:
        if admitted and admitted[0].has_images:  # _admit admits an image prompt only alone
            job = admitted[0]
            try:
                block, logits, job.position_offset = self.adapter.prefill_vision(job.prompt)
            except Exception as exc:  # model-specific image handling: fail this job only
                log.exception("%s: prefill of a prompt with images failed", self.name)
                self._complete(job, exc)
                return
            job.prompt.vision_inputs = {}  # the pixels are in the KV cache now; free them
            self._start_jobs([job], block, logits)
            return
        chunk = self.prefill_chunk_tokens
        short = [job for job in admitted if len(job.prompt.ids) <= chunk]
        long = [job for job in admitted if len(job.prompt.ids) > chunk]
        if long:  # _admit admits a long prompt only alone
            self._chunked = _ChunkedPrefill(long[0])
        if short:
            block, logits = self.adapter.prefill([job.prompt.ids for job in short])
            self._start_jobs(short, block, logits)
        if self._chunked is not None:
            self._prefill_next_chunk(self._chunked)

    def _prefill_next_chunk(self, work: _ChunkedPrefill) -> None:
        ids = work.job.prompt.ids
        end = min(len(ids), work.done + self.prefill_chunk_tokens)
        logits = self.adapter.prefill_chunk(work.cache, ids[work.done:end])
        work.done = end
        if work.done < len(ids):
            return
        self._chunked = None
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=logits.device)
        self._start_jobs([work.job], KVBlock.from_cache(work.cache, mask), logits)

    def _start_jobs(self, jobs: list[ChatJob], block: KVBlock, logits: torch.Tensor) -> None:
        """Sample each choice's first token from its prompt's logits; choices that go on join
        the running batch."""
        joining_rows: list[int] = []
        for prompt_row, job in enumerate(jobs):
            job.sequences = self.adapter.new_sequences(job.prompt, job.params)
            row_logits = logits[prompt_row:prompt_row + 1].expand(len(job.sequences), -1)
            tokens = self.adapter.choose_tokens(row_logits, job.sequences)
            for seq, token in zip(job.sequences, tokens, strict=True):
                self.adapter.advance(seq, token, job.emit)
                if seq.finish_reason is None:
                    self._rows.append(_Row(job, seq, token))
                    joining_rows.append(prompt_row)
            self._finish_if_done(job)
        if not joining_rows:
            return
        joining = select_rows(block, joining_rows)
        if self._cache is None or self._mask is None:
            merged = joining
        else:
            merged = concat_blocks(KVBlock.from_cache(self._cache, self._mask), joining)
        self._cache, self._mask = merged.to_cache(), merged.mask

    def _decode_step(self) -> None:
        assert self._cache is not None and self._mask is not None
        device = self._mask.device
        tokens = torch.tensor([row.next_token for row in self._rows], device=device)
        offsets = [row.job.position_offset for row in self._rows]
        shift = torch.tensor(offsets, device=device) if any(offsets) else None
        logits, self._mask = self.adapter.decode(self._cache, self._mask, tokens, shift)
        self.steps += 1
        metrics.BATCH_SIZE.labels(self.name).observe(len(self._rows))
        chosen = self.adapter.choose_tokens(logits, [row.seq for row in self._rows])
        for row, token in zip(self._rows, chosen, strict=True):
            self.adapter.advance(row.seq, token, row.job.emit)
            row.next_token = token
        finished_jobs = {id(row.job): row.job for row in self._rows if row.seq.finish_reason}
        self._keep_rows([i for i, row in enumerate(self._rows) if row.seq.finish_reason is None])
        for job in finished_jobs.values():
            self._finish_if_done(job)

    def _drop_cancelled(self) -> None:
        gone = {id(row.job): row.job for row in self._rows if row.job.cancelled.is_set()}
        if self._chunked is not None and self._chunked.job.cancelled.is_set():
            gone[id(self._chunked.job)] = self._chunked.job
            self._chunked = None
        if not gone:
            return
        self._keep_rows([i for i, row in enumerate(self._rows) if id(row.job) not in gone])
        for job in gone.values():
            self._complete(job)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep or self._cache is None or self._mask is None:
            self._cache, self._mask = None, None
            return
        block = select_rows(KVBlock.from_cache(self._cache, self._mask), keep)
        self._cache, self._mask = block.to_cache(), block.mask

    def _finish_if_done(self, job: ChatJob) -> None:
        if all(seq.finish_reason for seq in job.sequences):
            self._complete(job)

    def _complete(self, job: ChatJob, error: BaseException | None = None) -> None:
        if job.future.done():
            return
        with self._cond:
            self._running_jobs -= 1
        if error is None:
            job.future.set_result(job.usage())
        else:
            job.future.set_exception(error)

    def _fail_everything(self, error: BaseException, admitted: list[ChatJob]) -> None:
        jobs: dict[int, Any] = {id(row.job): row.job for row in self._rows}
        jobs.update({id(job): job for job in admitted})
        if self._chunked is not None:
            jobs[id(self._chunked.job)] = self._chunked.job
        self._rows, self._cache, self._mask, self._chunked = [], None, None, None
        for job in jobs.values():
            self._complete(job, error)
