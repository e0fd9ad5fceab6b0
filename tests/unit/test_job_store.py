"""The SQLite job store: FIFO claims with per-model limits, idempotency, cancel, recovery
after a crash, pagination, expiry. A second `JobStore` on the same file plays the restarted
process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.core.errors import ConflictError, NotFoundError
from engine.jobs.store import JobStore


def test_jobs_are_claimed_first_in_first_out_skipping_busy_models(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    a1, _ = store.insert("video", "model-a", {"prompt": "1"}, None)
    a2, _ = store.insert("video", "model-a", {"prompt": "2"}, None)
    b1, _ = store.insert("music", "model-b", {"prompt": "3"}, None)
    first = store.claim_next(set())
    assert first is not None and first.id == a1.id and first.status == "running"
    assert first.attempts == 1
    second = store.claim_next({"model-a"})  # model-a has no free worker: b1 goes first
    assert second is not None and second.id == b1.id
    third = store.claim_next(set())
    assert third is not None and third.id == a2.id
    assert store.claim_next(set()) is None


def test_the_same_idempotency_key_returns_the_same_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    job, created = store.insert("music", "m", {"prompt": "jazz"}, "key-1")
    again, created_again = store.insert("music", "m", {"prompt": "jazz"}, "key-1")
    assert created and not created_again and again.id == job.id
    with pytest.raises(ConflictError):
        store.insert("music", "m", {"prompt": "rock"}, "key-1")


def test_cancel_a_queued_job_at_once_and_a_running_one_on_request(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    running, _ = store.insert("video", "m", {"prompt": "1"}, None)
    queued, _ = store.insert("video", "m", {"prompt": "2"}, None)
    store.claim_next(set())
    assert store.request_cancel(queued.id, ttl_s=60).status == "cancelled"
    assert store.request_cancel(running.id, ttl_s=60).status == "running"
    assert store.cancel_requested(running.id)
    with pytest.raises(NotFoundError):
        store.request_cancel("gen_nope", ttl_s=60)


def test_a_hundred_queued_jobs_and_an_interrupted_one_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    ids = [store.insert("music", "m", {"prompt": str(i)}, None)[0].id for i in range(101)]
    interrupted = store.claim_next(set())
    assert interrupted is not None
    store.set_progress(interrupted.id, 40)
    del store  # the process dies: no clean shutdown

    restarted = JobStore(path)
    assert restarted.recover(max_attempts=3, ttl_s=60) == (1, 0)
    again = restarted.get(interrupted.id)
    assert again is not None and again.status == "queued" and again.progress == 0
    claimed = [restarted.claim_next(set()) for _ in range(101)]
    assert [job.id for job in claimed if job] == ids  # all of them, in the order accepted


def test_a_job_interrupted_too_often_fails_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    job, _ = store.insert("video", "m", {"prompt": "x"}, None)
    for _ in range(3):
        store.claim_next(set())
        store.recover(max_attempts=3, ttl_s=60)
    failed = store.get(job.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error is not None and "interrupted 3 time(s)" in failed.error


def test_list_is_newest_first_filtered_and_paginated(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    ids = [store.insert("music", "m", {"prompt": str(i)}, None)[0].id for i in range(5)]
    store.request_cancel(ids[1], ttl_s=60)
    page, more = store.page(None, 2, None)
    assert [j.id for j in page] == [ids[4], ids[3]] and more
    page2, _ = store.page(None, 2, page[-1].id)
    assert [j.id for j in page2] == [ids[2], ids[1]]
    cancelled, more = store.page("cancelled", 10, None)
    assert [j.id for j in cancelled] == [ids[1]] and not more


def test_finished_jobs_expire(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    job, _ = store.insert("music", "m", {"prompt": "x"}, None)
    store.claim_next(set())
    store.finish(job.id, "completed", ttl_s=0.01, result={"file_id": "file-x"})
    time.sleep(0.05)
    assert [j.id for j in store.purge_expired()] == [job.id]
    assert store.get(job.id) is None
