"""The images and jobs reports' arithmetic and tables, on synthetic timings (no models)."""

from __future__ import annotations

import json

import pytest

from benchmarks.harness import Machine
from benchmarks.images import ImageRun, ImagesReport
from benchmarks.images import raw_numbers as image_raw_numbers
from benchmarks.images import render as render_images
from benchmarks.images import summary as image_summary
from benchmarks.jobs import BareRun, JobRun, JobsReport, job_events, last_step_percent
from benchmarks.jobs import raw_numbers as job_raw_numbers
from benchmarks.jobs import render as render_jobs
from benchmarks.jobs import summary as job_summary

MACHINE = Machine("cpu", 2, 2, "t", "tf", "3.11", "abc", "float32", "cpu", "today")


# -- images --------------------------------------------------------------------------------


def images_report() -> ImagesReport:
    report = ImagesReport(MACHINE, {"diffusers": "0.42"}, rounds=3,
                          parameters={"unet": 18_000_000, "vae": 1_000_000})
    report.runs = {
        # Medians: 0.6 s for one image (the slow outlier is ignored), 0.55 s/image for four.
        "baseline_n1": [ImageRun(0.6, 1, png_s=0.01), ImageRun(0.5, 1, png_s=0.01),
                        ImageRun(3.0, 1, png_s=0.01)],
        "baseline_n4": [ImageRun(2.0, 4, png_s=0.04), ImageRun(2.2, 4, png_s=0.04),
                        ImageRun(2.4, 4, png_s=0.04)],
        "http_n1": [ImageRun(0.66, 1, batches=1, response_bytes=200 * 1024)] * 3,
        "http_n4": [ImageRun(2.4, 4, batches=1, response_bytes=800 * 1024)] * 3,
        "http_sequential": [ImageRun(2.8, 4, batches=4, response_bytes=800 * 1024)] * 3,
        "http_concurrent": [ImageRun(2.4, 4, batches=1, response_bytes=800 * 1024),
                            ImageRun(2.4, 4, batches=2, response_bytes=800 * 1024),
                            ImageRun(2.4, 4, batches=1, response_bytes=800 * 1024)],
    }
    report.pixel_diff = {"n=1": 0, "n=4": 0, "4 n=1 one after another": 1,
                         "4 n=1 in flight": 0}
    return report


def test_image_medians_and_ratios() -> None:
    numbers = image_summary(images_report())
    assert numbers["s_per_image_baseline_n1"] == pytest.approx(0.6)
    assert numbers["s_per_image_baseline_n4"] == pytest.approx(0.55)
    assert numbers["ratio_n1"] == pytest.approx(1.1)
    assert numbers["ratio_n4"] == pytest.approx(0.6 / 0.55)
    assert numbers["ratio_sequential"] == pytest.approx(0.7 / 0.6)
    assert numbers["ratio_concurrent"] == pytest.approx(0.6 / 0.55)
    assert numbers["batched_vs_single_baseline"] == pytest.approx(0.55 / 0.6)
    assert numbers["batched_vs_sequential_http"] == pytest.approx(0.6 / 0.7)
    assert numbers["concurrent_vs_sequential_http"] == pytest.approx(0.6 / 0.7)
    assert numbers["batches_http_concurrent"] == 1
    assert numbers["batches_http_sequential"] == 4
    assert numbers["png_s_per_image"] == pytest.approx(0.01)
    assert numbers["response_bytes_per_image"] == 200 * 1024


def test_image_table() -> None:
    text = render_images(images_report())
    assert "| s/image, n=1 | 0.600 | 0.660 | 1.10 |" in text
    assert "| s/image, n=4 in one call | 0.550 | 0.600 | 1.09 |" in text
    assert ("| s/image, 4 n=1 requests one after another (vs baseline n=1) | 0.600 | 0.700 "
            "| 1.17 |") in text
    assert "| s/image, 4 n=1 requests in flight at once (vs baseline n=4) | 0.550 | 0.600 |" \
        in text
    assert "| n=4 in one call | 0.92 | 0.86 |" in text
    assert "| 4 n=1 requests in flight at once | | 0.86 |" in text
    assert "median of 3 interleaved rounds" in text
    assert "weights are random" in text
    assert "19.0 M parameters in all" in text
    assert "4 n=1 one after another 4, 4 n=1 in flight 1." in text
    assert "PNG encoding takes 10 ms per image" in text
    assert "200 KiB per image" in text
    assert "n=1 0, n=4 0, 4 n=1 one after another 1, 4 n=1 in flight 0." in text
    assert "\u00d7" not in text


def test_image_raw_numbers_are_json() -> None:
    data = json.loads(json.dumps(image_raw_numbers(images_report())))
    assert data["medians"]["s_per_image_http_n4"] == pytest.approx(0.6)
    assert len(data["runs"]["baseline_n1"]) == 3
    assert data["settings"]["steps"] == 4


# -- jobs ----------------------------------------------------------------------------------


def bare(first: float, total: float) -> BareRun:
    # 8 steps of 0.8 s; the tail (0.8 s) is decode 0.75 + encode 0.05.
    return BareRun(first_step_s=first, last_step_s=first + 7 * 0.8, total_s=total,
                   decode_s=0.75, encode_s=0.05)


def job(first: float, last: float | None, done: float | None, completed: float,
        polls: int = 700, server_cpu_s: float = 15.0) -> JobRun:
    return JobRun(accepted_s=0.01, first_step_s=first, last_step_s=last, done_s=done,
                  completed_s=completed, polls=polls, poll_median_s=0.002, poll_max_s=0.02,
                  server_cpu_s=server_cpu_s,
                  timeline=[(0.012, "queued", 0), (first, "running", 11),
                            (completed, "completed", 100)])


def jobs_report() -> JobsReport:
    report = JobsReport(MACHINE, {"diffusers": "0.42", "av": "14"}, rounds=3,
                        parameters={"unet": 14_000_000})
    # Bare medians: first step 0.9 s, step 0.8 s, tail 0.8 s, total 7.3 s.
    report.bare = [bare(0.9, 7.3), bare(0.8, 7.2), bare(1.0, 9.0)]
    report.jobs = [
        job(1.0, 6.6, 7.4, 7.45),  # step 0.8 s, tail 0.85 s
        job(1.1, None, None, 7.7),  # the last step was not written: left out of those rows
        job(0.96, 6.56, 7.36, 7.46),  # step 0.8 s, tail 0.9 s
    ]
    # Polled every 200 ms: 35 polls and 14.0 s of server CPU, against 700 and 15.0 s.
    report.slow_jobs = [job(0.9, 6.3, None, 7.3, polls=35, server_cpu_s=14.0)] * 3
    return report


def test_job_events() -> None:
    assert last_step_percent() == 88
    timeline = [(0.01, "queued", 0), (0.9, "running", 11), (1.5, "running", 22),
                (6.5, "running", 88), (7.2, "running", 100), (7.25, "completed", 100)]
    assert job_events(timeline) == {"first_step_s": 0.9, "last_step_s": 6.5, "done_s": 7.2,
                                    "completed_s": 7.25}
    # The throttle skipped the last step, and progress 100 went by between two polls.
    skipped = [(0.01, "queued", 0), (0.9, "running", 11), (6.0, "running", 77),
               (7.25, "completed", 100)]
    assert job_events(skipped) == {"first_step_s": 0.9, "last_step_s": None, "done_s": None,
                                   "completed_s": 7.25}


def test_job_medians_and_overheads() -> None:
    numbers = job_summary(jobs_report())
    assert numbers["bare_first_step_s"] == pytest.approx(0.9)
    assert numbers["bare_step_s"] == pytest.approx(0.8)
    assert numbers["bare_tail_s"] == pytest.approx(0.8)
    assert numbers["job_first_step_s"] == pytest.approx(1.0)
    assert numbers["job_step_s"] == pytest.approx(0.8)
    assert numbers["job_tail_s"] == pytest.approx(0.875)
    assert numbers["job_total_s"] == pytest.approx(7.46)
    assert numbers["overhead_first_step_s"] == pytest.approx(0.1)
    assert numbers["overhead_tail_s"] == pytest.approx(0.075)
    assert numbers["overhead_total_s"] == pytest.approx(0.16)
    assert numbers["total_ratio"] == pytest.approx(7.46 / 7.3)
    assert numbers["job_last_step_to_done_s"] == pytest.approx(0.8)
    assert numbers["job_done_to_completed_s"] == pytest.approx(0.075)
    assert numbers["last_step_seen"] == 2
    assert numbers["first_step_seen"] == 3
    assert numbers["slow_step_s"] == pytest.approx(0.77142857)
    assert numbers["slow_total_ratio"] == pytest.approx(1.0)
    assert numbers["fast_total_ratio"] == pytest.approx(7.46 / 7.3)
    assert numbers["cpu_per_poll_s"] == pytest.approx(1.0 / 665)


def test_job_table() -> None:
    text = render_jobs(jobs_report())
    assert "| submit to first step | 900 | 1000 | +100 |" in text
    assert "| one step (steps 2-8, mean) | 800 | 800 | +0 |" in text
    assert "| last step to completed (bare: to the mp4 bytes) | 800 | 875 | +75 |" in text
    assert "| total (job: submit to completed) | 7300 | 7460 | +160 |" in text
    assert "Total job time / bare call time: 1.022." in text
    assert "was seen in 2 of 3 jobs, the first step in 3 of 3" in text
    assert "every 0.5 s" in text
    assert "queued 0% at 12, running 11% at 960, completed 100% at 7460" in text
    assert "| every 10 ms | 700 | 15.0 | 800 | 7460 | 1.022 |" in text
    assert "| every 200 ms | 35 | 14.0 | 771 | 7300 | 1.000 |" in text
    assert "Each poll cost the server about 1.5 ms of CPU" in text
    assert "\u00d7" not in text


def test_job_table_when_no_last_step_was_seen() -> None:
    report = jobs_report()
    report.jobs = [job(1.0, None, None, 7.5)]
    text = render_jobs(report)
    assert "| last step to completed (bare: to the mp4 bytes) | 800 | n/a | n/a |" in text
    assert "| one step (steps 2-8, mean) | 800 | n/a | n/a |" in text


def test_job_raw_numbers_are_json() -> None:
    data = json.loads(json.dumps(job_raw_numbers(jobs_report())))
    assert data["medians"]["job_tail_s"] == pytest.approx(0.875)
    assert data["jobs"][1]["last_step_s"] is None
    assert data["settings"]["progress_write_s"] == 0.5


def test_header_says_when_other_work_shared_the_machine() -> None:
    report = images_report()
    assert "other processes" not in render_images(report)  # not measured (no /proc)
    report.other_cpu = 0.02
    assert "rounds · other processes used 2% of the CPU meanwhile\n" in render_images(report)
    jobs = jobs_report()
    jobs.other_cpu = 0.3
    assert "used 30% of the CPU meanwhile (**the machine was shared: the numbers are " \
        "unreliable**)" in render_jobs(jobs)
