"""The job queue's storage: jobs in SQLite (WAL) under the data dir, so nothing accepted is lost
across restarts. Only the runner (engine/jobs/runner.py) writes it."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.core.digest import digest as canonical_digest
from engine.core.errors import ConflictError, InvalidRequestError, NotFoundError

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")

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


