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
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from engine.core.errors import (
    ConflictError,
    EmberError,
    InvalidRequestError,
    NotFoundError,
    RequestCancelledError,
)
from engine.core.manager import ModelManager, adapter_class, run_in_fresh_thread
from engine.core.registry import ModelEntry, Task
from engine.core.settings import Settings
from engine.core.sources import resolve_source
from engine.gateway.cache import digest as canonical_digest
from engine.media.artifacts import ArtifactStore

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 30.0  # longest a cancel waits for a running job's step to end

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
JOB_TASKS: tuple[Task, ...] = ("video", "music")
PROGRESS_WRITE_S = 0.5  # progress reaches the database at most this often (and at 100%)
CANCEL_POLL_S = 0.2  # an inline job notices a cancel within this long
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    error TEXT,
    result TEXT,
    idempotency_key TEXT UNIQUE,
    params_digest TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    model: str
    params: dict[str, Any]
    status: JobStatus
    progress: float
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    error: str | None
    result: dict[str, Any] | None
    seq: int = 0


class JobStore:
    """The jobs table. Every method blocks (SQLite I/O): call them from worker threads."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL keeps commits durable enough
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"], kind=row["kind"], model=row["model"], params=json.loads(row["params"]),
            status=row["status"], progress=row["progress"], attempts=row["attempts"],
            created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], expires_at=row["expires_at"], error=row["error"],
            result=json.loads(row["result"]) if row["result"] else None, seq=row["seq"],
        )

    def _one(self, sql: str, *args: Any) -> Job | None:
        row = self._db.execute(sql, args).fetchone()
        return self._job(row) if row else None

    def insert(self, kind: str, model: str, params: dict[str, Any],
               idempotency_key: str | None, request: dict[str, Any] | None = None) -> tuple[
            Job, bool]:
        """(job, created). The same idempotency key returns the job it made, once more; the
        same key with a different `request` (what the caller sent, before defaults and random
        seeds were filled in) is a 409."""
        digest = canonical_digest([kind, model, params if request is None else request])
        with self._lock:
            if idempotency_key:
                existing = self._db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if existing:
                    if existing["params_digest"] != digest:
                        raise ConflictError(
                            "This Idempotency-Key was used for a different request.",
                            param="Idempotency-Key",
                        )
                    return self._job(existing), False
            job_id = f"gen_{secrets.token_urlsafe(16)}"
            self._db.execute(
                "INSERT INTO jobs (id, kind, model, params, status, created_at, "
                "idempotency_key, params_digest) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, kind, model, json.dumps(params), time.time(), idempotency_key or None,
                 digest),
            )
            job = self._one("SELECT * FROM jobs WHERE id = ?", job_id)
        assert job is not None
        return job, True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._one("SELECT * FROM jobs WHERE id = ?", job_id)

    def page(self, status: str | None, limit: int, after: str | None) -> tuple[list[Job], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        with self._lock:
            if after:
                cursor = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    raise InvalidRequestError(f"after: no job {after!r}", param="after")
                where.append("seq < ?")
                args.append(cursor["seq"])
            clause = f"WHERE {' AND '.join(where)}" if where else ""
            rows = self._db.execute(
                f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*args, limit + 1)
            ).fetchall()
        return [self._job(r) for r in rows[:limit]], len(rows) > limit

    def claim_next(self, busy_models: set[str]) -> Job | None:
        """The oldest queued job whose model has a free worker, now marked running."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 256"
            ).fetchall()
            row = next((r for r in rows if r["model"] not in busy_models), None)
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?, "
                "progress = 0 WHERE id = ?", (time.time(), row["id"]),
            )
            return self._one("SELECT * FROM jobs WHERE id = ?", row["id"])

    def set_progress(self, job_id: str, progress: float) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'",
                             (round(progress, 1), job_id))

    def finish(self, job_id: str, status: JobStatus, ttl_s: float, *,
               result: dict[str, Any] | None = None, error: str | None = None) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, expires_at = ?, result = ?, "
                "error = ?, progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END "
                "WHERE id = ?",
                (status, now, now + ttl_s, json.dumps(result) if result else None, error,
                 status, job_id),
            )

    def requeue(self, job_id: str) -> None:
        """Back to the queue without spending an attempt (a clean shutdown stopped it)."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0), "
                "progress = 0 WHERE id = ? AND status = 'running'", (job_id,),
            )

    def request_cancel(self, job_id: str, ttl_s: float) -> Job:
        with self._lock:
            job = self._one("SELECT * FROM jobs WHERE id = ?", job_id)
            if job is None:
                raise NotFoundError(f"No generation job {job_id!r}", param="job_id")
            if job.status == "queued":
                now = time.time()
                self._db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?, expires_at = ? "
                    "WHERE id = ?", (now, now + ttl_s, job_id),
                )
            elif job.status == "running":
                self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._one("SELECT * FROM jobs WHERE id = ?", job_id) or job

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def recover(self, max_attempts: int, ttl_s: float) -> tuple[int, int]:
        """At start: jobs left running by a dead process go back to the queue, or fail with
        the reason once they have used their attempts. Returns (requeued, failed)."""
        now = time.time()
        with self._lock:
            failed = self._db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, expires_at = ?, error = "
                "'interrupted ' || attempts || ' time(s): the server stopped while it ran' "
                "WHERE status = 'running' AND attempts >= ?", (now, now + ttl_s, max_attempts),
            ).rowcount
            requeued = self._db.execute(
                "UPDATE jobs SET status = 'queued', progress = 0 WHERE status = 'running'"
            ).rowcount
        return requeued, failed

    def purge_expired(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (time.time(),),
            ).fetchall()
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(r["id"],) for r in rows])
        return [self._job(r) for r in rows]


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

    async def submit(self, task: Task, model: str, params: dict[str, Any],
                     idempotency_key: str | None = None) -> tuple[Job, bool]:
        entry = self.manager.registry.resolve(model, task)
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
                async with self.manager.lease(job.model, kind) as slot:
                    media = await run_in_fresh_thread(slot.adapter.run, job.params, progress,
                                                      cancel)
            artifact = await asyncio.to_thread(
                self.artifacts.put, media.data, media.media_type, media.suffix.lstrip("."), ttl
            )
            result = {"file_id": artifact.id, "url": f"/v1/generations/{job.id}/content",
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
