"""Video and music jobs through the HTTP API on tiny random pipelines: submit → 202, poll,
download, cancel, list, idempotency and bad input. (Restart survival runs a real process:
tests/e2e/test_jobs_restart.py.)"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import av
import pytest

from engine.core.audio_codec import decode_audio
from tests.conftest import Served

FINISHED = ("completed", "failed", "cancelled")


async def wait_for(served: Served, job_id: str, statuses: tuple[str, ...] = FINISHED,
                   timeout: float = 120, condition: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = (await served.http.get(f"/v1/generations/{job_id}")).json()
        if job["status"] in statuses and (condition is None or condition(job)):
            return dict(job)
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


async def submit(served: Served, kind: str, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await served.http.post(f"/v1/{kind}/generations", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return dict(response.json())


async def test_video_job_runs_and_the_mp4_has_the_frames_and_fps_asked_for(
    served: Served,
) -> None:
    job = await submit(served, "video", {
        "model": "text-to-video", "prompt": "a boat on a lake", "duration": 1, "fps": 8,
        "resolution": "64x48", "seed": 3,
    })
    assert job["status"] == "queued" and job["progress"] == 0 and job["job_id"].startswith("gen_")
    done = await wait_for(served, job["job_id"])
    assert done["status"] == "completed", done
    assert done["progress"] == 100
    result = done["result"]
    assert result["url"].endswith(f"/v1/generations/{job['job_id']}/content")
    content = await served.http.get(f"/v1/generations/{job['job_id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(content.content), mode="r") as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.average_rate == 8
    assert len(frames) == result["frames"] == 9  # 1 s at 8 fps, on the model's 4k+1 rule
    assert (frames[0].width, frames[0].height) == (64, 48)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
async def test_music_job_audio_has_the_duration_asked_for(served: Served, fmt: str) -> None:
    job = await submit(served, "music", {
        "model": "musicgen", "prompt": "calm piano", "duration": 0.6, "response_format": fmt,
    })
    done = await wait_for(served, job["job_id"])
    assert done["status"] == "completed", done
    content = await served.http.get(done["result"]["url"])
    audio = decode_audio(content.content, sample_rate=16_000, max_seconds=10)
    assert len(audio) / 16_000 == pytest.approx(0.6, abs=0.1)


async def test_cancel_mid_run_stops_within_a_step(served: Served) -> None:
    job = await submit(served, "video", {
        "prompt": "a long scene", "duration": 1, "fps": 8, "num_inference_steps": 60,
    })
    running = await wait_for(served, job["job_id"], ("running",),
                             condition=lambda j: j["progress"] > 0)
    cancelled = (await served.http.post(f"/v1/generations/{job['job_id']}/cancel")).json()
    assert cancelled["job_id"] == job["job_id"]
    # The answer waits for the cancel to take effect: it says so (it once said processing).
    assert cancelled["status"] == "cancelled", cancelled
    done = await wait_for(served, job["job_id"], timeout=30)
    assert done["status"] == "cancelled", done
    assert running["progress"] <= done["progress"] < 100
    conflict = await served.http.get(f"/v1/generations/{job['job_id']}/content")
    assert conflict.status_code == 409


async def test_queued_job_cancelled_by_delete_never_runs(served: Served) -> None:
    blocker = await submit(served, "video", {"prompt": "first", "num_inference_steps": 30})
    queued = await submit(served, "music", {"prompt": "second"})
    deleted = await served.http.delete(f"/v1/generations/{queued['job_id']}")
    assert deleted.json()["status"] == "cancelled"
    await wait_for(served, blocker["job_id"])
    final = (await served.http.get(f"/v1/generations/{queued['job_id']}")).json()
    assert final["status"] == "cancelled" and final["started_at"] is None


async def test_the_same_idempotency_key_returns_the_same_job(served: Served) -> None:
    body = {"prompt": "jazz", "duration": 0.3}
    first = await submit(served, "music", body, headers={"Idempotency-Key": "abc-123"})
    again = await served.http.post("/v1/music/generations", json=body,
                                    headers={"Idempotency-Key": "abc-123"})
    assert again.status_code == 200 and again.json()["job_id"] == first["job_id"]
    other = await served.http.post("/v1/music/generations", json={"prompt": "rock"},
                                   headers={"Idempotency-Key": "abc-123"})
    assert other.status_code == 409
    await wait_for(served, first["job_id"])


async def test_list_filters_by_status_and_pages(served: Served) -> None:
    ids = [(await submit(served, "music", {"prompt": f"tune {i}", "duration": 0.2}))["job_id"]
           for i in range(3)]
    for job_id in ids:
        await wait_for(served, job_id)
    page = (await served.http.get("/v1/generations", params={"limit": 2})).json()
    assert page["object"] == "list" and len(page["data"]) == 2 and page["has_more"]
    assert [j["job_id"] for j in page["data"]] == [ids[2], ids[1]]
    rest = (await served.http.get("/v1/generations",
                                  params={"limit": 1, "after": page["last_id"]})).json()
    assert rest["data"][0]["job_id"] == ids[0]
    completed = (await served.http.get("/v1/generations",
                                       params={"status": "completed", "limit": 100})).json()
    assert all(j["status"] == "completed" for j in completed["data"])


BAD_JOBS = [
    ("video", {"prompt": "x", "duration": -1}, "duration"),
    ("video", {"prompt": "x", "duration": 60}, "duration"),
    ("video", {"prompt": "x", "resolution": "huge"}, "resolution"),
    ("video", {"prompt": "x", "resolution": "4000x4000"}, "resolution"),
    ("video", {"prompt": "x", "fps": 1000}, "fps"),
    ("video", {"prompt": "   "}, "prompt"),
    ("music", {"prompt": "x", "duration": 0}, "duration"),
    ("music", {"prompt": "x", "response_format": "ogg"}, "response_format"),
    ("music", {"model": "tiny-video", "prompt": "x"}, "model"),
]


@pytest.mark.parametrize(("kind", "body", "param"), BAD_JOBS)
async def test_bad_job_requests_get_400_and_no_job(
    served: Served, kind: str, body: dict[str, Any], param: str
) -> None:
    response = await served.http.post(f"/v1/{kind}/generations", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_unknown_jobs_and_models(served: Served) -> None:
    for path in ("/v1/generations/gen_nope", "/v1/generations/gen_nope/content"):
        assert (await served.http.get(path)).status_code == 404
    assert (await served.http.post("/v1/generations/gen_nope/cancel")).status_code == 404
    bad_status = await served.http.get("/v1/generations", params={"status": "done"})
    assert bad_status.status_code == 400
    missing = await served.http.post("/v1/video/generations",
                                      json={"model": "ltx-video", "prompt": "x"})
    assert missing.status_code == 503 and "ember pull ltx-video" in missing.text
