"""Long-running generation (video, music) as persistent jobs: submit returns at once, clients
poll. Nothing accepted is lost: jobs live in SQLite (WAL) under the data dir; a job that was
running when the process died is queued again at the next start (or failed with the reason
after `job_max_attempts`), and queued ones simply run.

Jobs run on their own threads, not on the shared compute thread: one takes minutes, and chat
and embeddings must keep flowing meanwhile. Workers take jobs first in, first out, with at
most `job_workers` running in all and `job_workers_per_model` per model. Progress is written
as steps complete; a cancel stops a running job at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.contracts.media import MediaGenerator
from engine.core.errors import (
    ConflictError,
    EmberError,
    InvalidRequestError,
    NotFoundError,
    RequestCancelledError,
)
from engine.core.manager import ModelManager, adapter_class, run_in_fresh_thread
from engine.core.registry import ModelEntry, Task
from engine.core.runners import JobSlotRunner
from engine.core.settings import Settings
from engine.core.sources import resolve_source
from engine.jobs.store import JOB_STATUSES, Job, JobStore
from engine.media.artifacts import Artifact, ArtifactStore

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 30.0  # longest a cancel waits for a running job's step to end

JOB_TASKS: tuple[Task, ...] = ("video", "music")
PROGRESS_WRITE_S = 0.5  # progress reaches the database at most this often (and at 100%)
CANCEL_POLL_S = 0.2  # an inline job notices a cancel within this long
T = TypeVar("T")

@dataclass(frozen=True)
class InlineKind:
    """A job kind the engine runs itself, as a coroutine on the event loop (chat: its scheduler
    already batches and paces it), instead of an adapter's `run` on a thread of its own.
    `run` returns what an adapter's `run` does (data, media_type, suffix, metadata)."""

    validate: Callable[[ModelEntry, dict[str, Any]], dict[str, Any]]
    run: Callable[[Job], Awaitable[Any]]


class JobRunner:
    """Admission (validate before accepting), the dispatcher and the workers."""

    def __init__(self, settings: Settings, manager: ModelManager, artifacts: ArtifactStore):
        self.settings = settings
        self.manager = manager
        self.artifacts = artifacts
        self.store = JobStore(settings.data_dir / "jobs.sqlite3")
        self._wake = asyncio.Event()
        self._running: dict[str, tuple[str, threading.Event]] = {}  # job id → (model, cancel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        self.inline: dict[str, InlineKind] = {}

    async def start(self) -> None:
        requeued, failed = await asyncio.to_thread(
            self.store.recover, self.settings.job_max_attempts, self.settings.job_ttl_s
        )
        if requeued or failed:
            log.warning("jobs interrupted by the last stop: %d queued again, %d failed",
                        requeued, failed)
        self._dispatcher = asyncio.create_task(self._dispatch_forever())

    async def stop(self) -> None:
        """Running jobs stop at their next step and go back to the queue for the next start."""
        self._stopping = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for _, cancel in self._running.values():
            cancel.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        await asyncio.to_thread(self.store.close)

    # -- the API -------------------------------------------------------------------------------

    async def submit(self, task: Task, model: str | None, params: dict[str, Any],
                     idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Validate and queue a job (`model` None: the task's default); (job, created),
        created False when `idempotency_key` names a job already submitted."""
        registry = self.manager.registry
        entry = registry.resolve(registry.model_or_default(model, task), task)
        inline = self.inline.get(task)
        validate = inline.validate if inline else adapter_class(entry).validate
        normalized = validate(entry, params)
        resolve_source(entry)  # not installed: fail now with how to get it, not in the queue
        job, created = await asyncio.to_thread(
            self.store.insert, task, entry.id, normalized, idempotency_key, params
        )
        if created:
            log.info("job %s queued: %s on %s", job.id, task, entry.id)
            self._wake.set()
        return job, created

    async def get(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            raise NotFoundError(f"No generation job {job_id!r}", param="job_id")
        return job

    async def content(self, job_id: str) -> Artifact:
        """The file a completed job made."""
        job = await self.get(job_id)
        if job.status != "completed" or not job.result:
            raise ConflictError(f"Job {job_id!r} is {job.status}; it has no file yet",
                                param="job_id")
        return self.artifacts.get(job.result["file_id"])

    async def page(self, status: str | None, limit: int, after: str | None) -> tuple[
            list[Job], bool]:
        if status is not None and status not in JOB_STATUSES:
            raise InvalidRequestError(
                f"status must be one of {', '.join(JOB_STATUSES)}; got {status!r}", param="status"
            )
        if not 1 <= limit <= 100:
            raise InvalidRequestError(f"limit must be between 1 and 100; got {limit}",
                                      param="limit")
        return await asyncio.to_thread(self.store.page, status, limit, after)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job; a running one stops at its next step, and the answer waits for that
        (up to CANCEL_WAIT_S) so it says `cancelled`, not `processing`."""
        job = await asyncio.to_thread(self.store.request_cancel, job_id, self.settings.job_ttl_s)
        if job.id not in self._running:
            return job
        self._running[job.id][1].set()
        deadline = time.monotonic() + CANCEL_WAIT_S
        while job.id in self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await self.get(job_id)

    # -- the workers ---------------------------------------------------------------------------

    def _busy_models(self) -> set[str]:
        per_model: dict[str, int] = {}
        for model, _ in self._running.values():
            per_model[model] = per_model.get(model, 0) + 1
        return {m for m, n in per_model.items() if n >= self.settings.job_workers_per_model}

    async def _dispatch_forever(self) -> None:
        while not self._stopping:
            # Cleared before claiming: a submit that lands while we claim sets it again.
            self._wake.clear()
            while len(self._running) < self.settings.job_workers:
                job = await asyncio.to_thread(self.store.claim_next, self._busy_models())
                if job is None:
                    break
                self._running[job.id] = (job.model, threading.Event())
                task = asyncio.create_task(self._run(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5)

    async def _run(self, job: Job) -> None:
        cancel = self._running[job.id][1]
        ttl = self.settings.job_ttl_s
        last_write, last_fraction = 0.0, 0.0

        def progress(fraction: float) -> None:  # called on the job's thread
            nonlocal last_write, last_fraction
            now = time.monotonic()
            # Throttled, but a big step (5 points or more, e.g. the last step of a short run)
            # always lands, so progress never sits stale through a long decode.
            if (now - last_write >= PROGRESS_WRITE_S or fraction - last_fraction >= 0.05
                    or fraction >= 1):
                last_write, last_fraction = now, fraction
                self.store.set_progress(job.id, 100 * min(max(fraction, 0.0), 1.0))
                if self.store.cancel_requested(job.id):
                    cancel.set()

        log.info("job %s running (attempt %d): %s on %s", job.id, job.attempts, job.kind,
                 job.model)
        started = time.monotonic()
        try:
            if (inline := self.inline.get(job.kind)) is not None:
                media = await _until_cancelled(inline.run(job), cancel)
            else:
                kind: Task = job.kind  # type: ignore[assignment]
                async with self.manager.lease_as(job.model, kind, MediaGenerator,
                                                 JobSlotRunner) as slot:
                    media = await run_in_fresh_thread(slot.backend.run, job.params, progress,
                                                      cancel)
            artifact = await asyncio.to_thread(
                self.artifacts.put, media.data, media.media_type, media.suffix.lstrip("."), ttl
            )
            result = {"file_id": artifact.id,
                      "media_type": media.media_type, "format": media.suffix,
                      "bytes": artifact.bytes, **media.metadata}
            await asyncio.to_thread(self.store.finish, job.id, "completed", ttl, result=result)
            log.info("job %s completed in %.1f s", job.id, time.monotonic() - started)
        except RequestCancelledError:
            if self._stopping:
                await asyncio.to_thread(self.store.requeue, job.id)
                log.info("job %s stopped by shutdown; queued for the next start", job.id)
            else:
                await asyncio.to_thread(self.store.finish, job.id, "cancelled", ttl)
                log.info("job %s cancelled", job.id)
        except EmberError as error:
            await asyncio.to_thread(self.store.finish, job.id, "failed", ttl, error=error.message)
            log.warning("job %s failed: %s", job.id, error.message)
        except Exception as error:
            log.exception("job %s failed", job.id)
            await asyncio.to_thread(self.store.finish, job.id, "failed", ttl,
                                    error=f"Internal error: {type(error).__name__}: {error}")
        finally:
            self._running.pop(job.id, None)
            self._wake.set()

    async def purge_expired(self) -> None:
        """Finished jobs past their TTL. Their files were stored with the same TTL, so the
        artifact store's own purge removes them (they expire just before the job does)."""
        await asyncio.to_thread(self.store.purge_expired)


async def _until_cancelled(work: Awaitable[T], cancel: threading.Event) -> T:
    """Await `work`, cancelling it once `cancel` is set (a job cancel, or shutdown)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=CANCEL_POLL_S)
            if cancel.is_set() and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise RequestCancelledError("the job was cancelled")
        return task.result()
    finally:
        task.cancel()
