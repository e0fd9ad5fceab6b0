"""Jobs survive a crash: `ember serve` (a real process) is killed with SIGKILL while a video
job runs and 100 music jobs wait; started again on the same data dir, it runs every one."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.process import ember_serve

pytestmark = pytest.mark.e2e
QUEUED_JOBS = 100


def job_server_env(registry: Path, data_dir: Path) -> dict[str, str]:
    return {"EMBER_REGISTRY_FILE": str(registry), "EMBER_DATA_DIR": str(data_dir),
            "EMBER_MODELS_DIR": str(data_dir / "models"), "EMBER_PRELOAD": "",
            "EMBER_TORCH_THREADS": "1"}


def test_jobs_run_after_the_server_is_killed_mid_job(
    test_registry: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "ember.log"
    env = job_server_env(test_registry, tmp_path / "data")
    with ember_serve(log_path, env, wait_for="/health") as (base, process):
        running = httpx.post(f"{base}/v1/video/generations", json={
            "prompt": "a long scene", "num_inference_steps": 60, "seed": 1,
        }).json()["job_id"]
        queued = [
            httpx.post(f"{base}/v1/music/generations",
                       json={"prompt": f"tune {i}", "duration": 0.2}).json()["job_id"]
            for i in range(QUEUED_JOBS)
        ]
        deadline = time.monotonic() + 60
        while True:
            job = httpx.get(f"{base}/v1/generations/{running}").json()
            if job["status"] == "running" and job["progress"] > 0:
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    with ember_serve(log_path, env, wait_for="/health") as (base, _):
        assert "1 queued again" in log_path.read_text()
        deadline = time.monotonic() + 240
        for job_id in [running, *queued]:
            while True:
                job = httpx.get(f"{base}/v1/generations/{job_id}").json()
                if job["status"] in ("completed", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
            assert job["status"] == "completed", job
        video = httpx.get(f"{base}/v1/generations/{running}").json()
        assert video["attempts"] == 2  # the killed run, then the one that finished
        content = httpx.get(f"{base}/v1/generations/{running}/content")
        assert content.status_code == 200 and content.content[4:8] == b"ftyp"
