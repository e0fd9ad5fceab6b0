"""Jobs: what ember's persistent job queue adds around a video generation, against the same
pipeline called directly, in one run.

    python -m benchmarks.jobs [--quick] [--rounds N] [--out DIR] [--threads N] [--models DIR]
    ember bench jobs [--quick]

A text-to-video job (`POST /v1/video/generations`: 16 frames at 128x128, 8 fps, 8 steps,
guidance 7.5, float32) is submitted and `GET /v1/generations/{id}` polled every 10 ms. From
what the polls see: time from submit to the first step (the first progress above 0), per step,
from the last step (the last step's progress value) to `completed`, and submit to `completed`
in all. The baseline is the bare pipeline call in this process with the adapter's arguments and
a step callback, plus the same mp4 encode (`models.video.encode_mp4`): call to first step end,
per step, last step end to the mp4 bytes (VAE decode + encode), and the whole. The same job is
also run polled every 200 ms, to show what the fast polling itself costs a small machine (the
server's CPU time per job, read from /proc, and the step and total times).

No video weights are installed offline, so the pipeline is zeroscope-shaped
(`TextToVideoSDPipeline`) with random weights, built once from configs into --models: the
numbers measure the job machinery, not video quality.

Baseline and job runs alternate round by round, so slow phases of a noisy machine hit both
alike; the report gives medians. Prints a Markdown table to stdout (progress goes to stderr)
and writes it to OUT/jobs.md, with the raw numbers in OUT/jobs.json.
"""

from __future__ import annotations

import argparse
import inspect
import io
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import torch

from benchmarks import harness
from engine.jobs.runner import PROGRESS_WRITE_S
from models.video import encode_mp4

MODEL_ID = "bench-video-random"
PROMPT = "a paper boat drifting down a rainy street, cinematic"
SIDE = 128
FPS = 8
DURATION_S = 2.0
FRAMES = 16  # DURATION_S x FPS, frame rule "any"
STEPS = 8
GUIDANCE = 7.5  # classifier-free guidance on, as text-to-video models run
SEED = 4321
POLL_S = 0.010
SLOW_POLL_S = 0.200  # a second job run, to see what fast polling costs
JOB_TIMEOUT_S = 600.0

# The random pipeline's shape (16x16 latents x 16 frames); changing it rebuilds the cache.
VIDEO_SHAPE: dict[str, Any] = {"unet_channels": [64, 128, 128], **harness.PIPELINE_SHAPE}


# -- the random pipeline --------------------------------------------------------------------


def build_random_text_to_video(folder: Path, shape: dict[str, Any] = VIDEO_SHAPE) -> Path:
    """A TextToVideoSDPipeline (zeroscope's) with random weights; returns the pipeline
    folder."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    return harness.build_random_pipeline(
        folder, shape, SIDE, UNet3DConditionModel, "3D",
        lambda **parts: TextToVideoSDPipeline(
            **parts, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False)))


def video_entry(source: Path) -> dict[str, Any]:
    return {
        "id": MODEL_ID, "task": "video", "adapter": "models.video:TextToVideo",
        "source": str(source), "dtype": "float32",
        "options": {"default_size": [SIDE, SIDE], "size_multiple": 8, "max_side": 2 * SIDE,
                    "min_side": 32, "default_fps": FPS, "max_fps": 24,
                    "default_duration": DURATION_S, "max_duration": 4.0, "frame_rule": "any",
                    "max_frames": 32, "default_steps": STEPS, "max_steps": 50,
                    "default_guidance": GUIDANCE},
    }


# -- results -------------------------------------------------------------------------------


@dataclass
class BareRun:
    """Seconds from the start of the pipeline call: first and last step ends, and the mp4
    bytes ready (`total_s`); `decode_s` (pipeline return after the last step) and `encode_s`
    split the tail."""

    first_step_s: float
    last_step_s: float
    total_s: float
    decode_s: float
    encode_s: float

    @property
    def step_s(self) -> float:
        return (self.last_step_s - self.first_step_s) / (STEPS - 1)

    @property
    def tail_s(self) -> float:
        return self.total_s - self.last_step_s


@dataclass
class JobRun:
    """Seconds from just before the submit: the 202 (`accepted_s`), and when a poll's reply
    first showed the first step, the last step, progress 100 while still running, and
    `completed`. None where no poll saw that state (the progress throttle can skip a step).
    `timeline` holds every change seen as (s, status, progress); `poll_max_at_s` says when the
    slowest poll was sent, to place a stall."""

    accepted_s: float
    first_step_s: float | None
    last_step_s: float | None
    done_s: float | None
    completed_s: float
    polls: int
    poll_median_s: float
    poll_max_s: float
    poll_max_at_s: float = 0.0  # when the slowest poll was sent
    poll_s: float = POLL_S
    server_cpu_s: float | None = None  # the server's CPU time from submit to completed
    timeline: list[tuple[float, str, int]] = field(default_factory=list)
    frames: int = 0

    @property
    def step_s(self) -> float | None:
        if self.first_step_s is None or self.last_step_s is None:
            return None
        return (self.last_step_s - self.first_step_s) / (STEPS - 1)

    @property
    def tail_s(self) -> float | None:
        return None if self.last_step_s is None else self.completed_s - self.last_step_s


@dataclass
class JobsReport(harness.PipelineReport):
    bare: list[BareRun] = field(default_factory=list)
    jobs: list[JobRun] = field(default_factory=list)  # polled every POLL_S
    slow_jobs: list[JobRun] = field(default_factory=list)  # polled every SLOW_POLL_S


# -- baseline ------------------------------------------------------------------------------


def bare_call(pipeline: Any) -> BareRun:
    """The pipeline with the arguments `TextToVideo.run` passes (its step callback only
    records the time), then the same mp4 encode."""
    names = set(inspect.signature(pipeline.__call__).parameters)
    step_ends: list[float] = []
    arguments: dict[str, Any] = {
        "prompt": PROMPT, "negative_prompt": None, "num_frames": FRAMES, "width": SIDE,
        "height": SIDE, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
        "generator": torch.Generator("cpu").manual_seed(SEED), "output_type": "np",
    }
    if "callback_on_step_end" in names:
        def on_step_end(_pipe: Any, _step: int, _timestep: Any, tensors: Any) -> Any:
            step_ends.append(time.perf_counter())
            return tensors

        arguments["callback_on_step_end"] = on_step_end
    else:
        def on_step(_step: int, _timestep: Any, _latents: Any) -> None:
            step_ends.append(time.perf_counter())

        arguments.update(callback=on_step, callback_steps=1)
    started = time.perf_counter()
    with torch.inference_mode():
        video = pipeline(**arguments).frames[0]
    decoded = time.perf_counter()
    frames = np.asarray(video)
    encode_mp4(frames, FPS)
    finished = time.perf_counter()
    if len(step_ends) != STEPS or frames.shape[0] != FRAMES:
        raise RuntimeError(f"bare call: {len(step_ends)} steps, {frames.shape[0]} frames")
    return BareRun(step_ends[0] - started, step_ends[-1] - started, finished - started,
                   decoded - step_ends[-1], finished - decoded)


# -- the job -------------------------------------------------------------------------------


def last_step_percent() -> int:
    """The API's progress after the last step: the encode counts as one more step, and the
    API shows whole percents."""
    return int(100 * STEPS / (STEPS + 1))


def job_events(timeline: list[tuple[float, str, int]]) -> dict[str, float | None]:
    """When the polls first saw each state; None if none did."""
    def first(test: Any) -> float | None:
        return next((t for t, status, progress in timeline if test(status, progress)), None)

    last = last_step_percent()
    return {
        "first_step_s": first(lambda status, progress: 0 < progress < 100),
        "last_step_s": first(lambda status, progress: last <= progress < 100),
        "done_s": first(lambda status, progress: progress == 100 and status == "running"),
        "completed_s": first(lambda status, progress: status == "completed"),
    }


def count_frames(data: bytes) -> int:
    with av.open(io.BytesIO(data), mode="r") as container:
        return len(list(container.decode(video=0)))


def http_job(client: httpx.Client, poll_s: float, server_pid: int | None = None) -> JobRun:
    """Submit, poll every `poll_s` until the job finishes, then download and check the mp4."""
    body = {"model": MODEL_ID, "prompt": PROMPT, "duration": DURATION_S,
            "resolution": f"{SIDE}x{SIDE}", "fps": FPS, "seed": SEED,
            "num_inference_steps": STEPS, "guidance_scale": GUIDANCE}
    cpu_before = harness.CpuWatch.process_s(server_pid) if server_pid else None
    started = time.perf_counter()
    response = client.post("/v1/video/generations", json=body)
    accepted = time.perf_counter() - started
    response.raise_for_status()
    job_id = response.json()["job_id"]
    timeline: list[tuple[float, str, int]] = []
    round_trips: list[tuple[float, float]] = []  # (round trip, sent at)
    state: tuple[str, int] | None = None
    while True:
        sent = time.perf_counter()
        if sent - started > JOB_TIMEOUT_S:
            raise RuntimeError(f"job {job_id} not finished after {JOB_TIMEOUT_S:.0f} s")
        reply = client.get(f"/v1/generations/{job_id}")
        received = time.perf_counter()
        reply.raise_for_status()
        round_trips.append((received - sent, sent - started))
        job = reply.json()
        if (job["status"], job["progress"]) != state:
            state = (job["status"], job["progress"])
            timeline.append((received - started, *state))
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(max(0.0, sent + poll_s - time.perf_counter()))
    cpu_after = harness.CpuWatch.process_s(server_pid) if server_pid else None
    if job["status"] != "completed":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
    content = client.get(f"/v1/generations/{job_id}/content")
    content.raise_for_status()
    frames = count_frames(content.content)
    if frames != FRAMES:
        raise RuntimeError(f"job {job_id}: the mp4 has {frames} frames, expected {FRAMES}")
    events = job_events(timeline)
    completed = events["completed_s"]
    assert completed is not None
    slowest = max(round_trips)
    return JobRun(
        accepted_s=accepted, first_step_s=events["first_step_s"],
        last_step_s=events["last_step_s"], done_s=events["done_s"], completed_s=completed,
        polls=len(round_trips), poll_median_s=statistics.median(rt for rt, _ in round_trips),
        poll_max_s=slowest[0], poll_max_at_s=slowest[1], poll_s=poll_s,
        server_cpu_s=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
        timeline=timeline, frames=frames,
    )


def show_bare(run: BareRun) -> str:
    return (f"first step {run.first_step_s * 1000:.0f} ms, step {run.step_s * 1000:.0f} ms, "
            f"last step to mp4 {run.tail_s * 1000:.0f} ms, total {run.total_s:.2f} s")


def show_job(run: JobRun) -> str:
    def ms(value: float | None) -> str:
        return "not seen" if value is None else f"{value * 1000:.0f} ms"

    return (f"first step {ms(run.first_step_s)}, step {ms(run.step_s)}, last step to "
            f"completed {ms(run.tail_s)}, total {run.completed_s:.2f} s ({run.polls} polls)")


# -- report --------------------------------------------------------------------------------


def median_seen(values: list[float | None]) -> float | None:
    seen = [value for value in values if value is not None]
    return statistics.median(seen) if seen else None


def summary(report: JobsReport) -> dict[str, float | None]:
    """Medians over rounds (job values over the runs whose polls saw them), and ember - bare
    differences; the total also as a ratio."""
    bare, jobs = report.bare, report.jobs
    numbers: dict[str, float | None] = {
        "bare_first_step_s": statistics.median(r.first_step_s for r in bare),
        "bare_step_s": statistics.median(r.step_s for r in bare),
        "bare_tail_s": statistics.median(r.tail_s for r in bare),
        "bare_total_s": statistics.median(r.total_s for r in bare),
        "bare_decode_s": statistics.median(r.decode_s for r in bare),
        "bare_encode_s": statistics.median(r.encode_s for r in bare),
        "job_first_step_s": median_seen([r.first_step_s for r in jobs]),
        "job_step_s": median_seen([r.step_s for r in jobs]),
        "job_tail_s": median_seen([r.tail_s for r in jobs]),
        "job_total_s": statistics.median(r.completed_s for r in jobs),
        "job_accepted_s": statistics.median(r.accepted_s for r in jobs),
        "job_last_step_to_done_s": median_seen(
            [None if r.done_s is None or r.last_step_s is None else r.done_s - r.last_step_s
             for r in jobs]),
        "job_done_to_completed_s": median_seen(
            [None if r.done_s is None else r.completed_s - r.done_s for r in jobs]),
        "poll_median_s": statistics.median(r.poll_median_s for r in jobs),
        "poll_max_s": max(r.poll_max_s for r in jobs),
        "first_step_seen": sum(r.first_step_s is not None for r in jobs),
        "last_step_seen": sum(r.last_step_s is not None for r in jobs),
        "done_seen": sum(r.done_s is not None for r in jobs),
    }
    for name in ("first_step", "step", "tail", "total"):
        job, base = numbers[f"job_{name}_s"], numbers[f"bare_{name}_s"]
        numbers[f"overhead_{name}_s"] = None if job is None or base is None else job - base
    total, base_total = numbers["job_total_s"], numbers["bare_total_s"]
    assert total is not None and base_total is not None
    numbers["total_ratio"] = total / base_total
    numbers.update(polling_summary(report.jobs, report.slow_jobs, base_total))
    return numbers


def polling_summary(fast: list[JobRun], slow: list[JobRun], bare_total_s: float
                    ) -> dict[str, float | None]:
    """The same job polled often and seldom: what the polling itself costs."""
    if not slow:
        return {}
    numbers: dict[str, float | None] = {}
    for name, jobs in (("fast", fast), ("slow", slow)):
        numbers[f"{name}_polls"] = statistics.median(r.polls for r in jobs)
        numbers[f"{name}_server_cpu_s"] = median_seen([r.server_cpu_s for r in jobs])
        numbers[f"{name}_step_s"] = median_seen([r.step_s for r in jobs])
        numbers[f"{name}_total_s"] = statistics.median(r.completed_s for r in jobs)
        numbers[f"{name}_total_ratio"] = statistics.median(r.completed_s for r in jobs) \
            / bare_total_s
    cpu_fast, cpu_slow = numbers["fast_server_cpu_s"], numbers["slow_server_cpu_s"]
    extra_polls = (numbers["fast_polls"] or 0) - (numbers["slow_polls"] or 0)
    numbers["cpu_per_poll_s"] = None if cpu_fast is None or cpu_slow is None \
        or extra_polls <= 0 else (cpu_fast - cpu_slow) / extra_polls
    return numbers


def ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    rounded = round(value * 1000) + 0  # + 0: never "-0"
    return f"{rounded:+d}" if signed else f"{rounded:d}"


def in_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{ms(value)} ms"


def render(report: JobsReport) -> str:
    s = summary(report)
    n = len(report.jobs)
    rows = [
        ("submit to first step", "first_step"),
        (f"one step (steps 2-{STEPS}, mean)", "step"),
        ("last step to completed (bare: to the mp4 bytes)", "tail"),
        ("total (job: submit to completed)", "total"),
    ]
    last = report.jobs[-1]
    timeline = ", ".join(f"{status} {progress}% at {t * 1000:.0f}"
                         for t, status, progress in last.timeline)
    lines = [
        "# ember jobs",
        "",
        report.header,
        "",
        "| ms | bare pipeline | ember job | ember - bare |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {ms(s[f'bare_{key}_s'])} | {ms(s[f'job_{key}_s'])} | "
          f"{ms(s[f'overhead_{key}_s'], signed=True)} |" for name, key in rows),
        "",
        f"Total job time / bare call time: {s['total_ratio']:.3f}. The submit itself (202) "
        f"took {in_ms(s['job_accepted_s'])}.",
        "",
        f"Text to video, {FRAMES} frames at {SIDE}x{SIDE}, {FPS} fps, {STEPS} steps, guidance "
        f"{GUIDANCE:g}. The weights are random (a zeroscope-shaped TextToVideoSDPipeline built "
        f"from configs: {report.parameters_line}), so the numbers measure the job machinery, "
        "not video quality. "
        "Bare pipeline: the same folder loaded in-process with "
        "`DiffusionPipeline.from_pretrained` (float32, as the registry entry), called with the "
        "adapter's arguments and a step callback, then `models.video.encode_mp4`; its times "
        "are from the start of that call. ember job: `POST /v1/video/generations`, then `GET "
        f"/v1/generations/{{id}}` every {POLL_S * 1000:.0f} ms; its times are when a poll's "
        "reply first showed the state, from just before the submit.",
        "",
        f"Tail split (bare): VAE decode {in_ms(s['bare_decode_s'])}, mp4 encode "
        f"{in_ms(s['bare_encode_s'])}. Job: last step to progress 100 (decode + encode) "
        f"{in_ms(s['job_last_step_to_done_s'])}, progress 100 to completed (file store and "
        f"database) {in_ms(s['job_done_to_completed_s'])}; progress 100 was seen while still "
        f"running in {s['done_seen']:g} of {n} jobs.",
        "",
        f"What the job numbers can resolve: a poll's round trip took "
        f"{in_ms(s['poll_median_s'])} (median; max {in_ms(s['poll_max_s'])}), so a state is "
        "seen up to one poll "
        f"interval plus one round trip after it happened. Progress reaches the database at most "
        f"every {PROGRESS_WRITE_S:g} s (`engine.jobs.PROGRESS_WRITE_S`), unless it moved 5 "
        "points or more since the last write (the first step, and every step of a short "
        "run, always land), and the API shows whole percents: the last step "
        f"({last_step_percent()}%) was seen in {s['last_step_seen']:g} of {n} jobs, the "
        f"first step in {s['first_step_seen']:g} of {n}. Rows with a step or the last step "
        "use the jobs where it was seen. The job's own created/started/finished times are "
        "whole seconds, so the client's clock is the only one used.",
        "",
        *polling_lines(s),
        f"Last job's progress as polled (ms from submit): {timeline}.",
    ]
    return "\n".join(lines) + "\n"


def polling_lines(s: dict[str, float | None]) -> list[str]:
    """What polling every 10 ms costs: the same job polled every 200 ms beside it."""
    if "slow_polls" not in s:
        return []

    def cpu(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    rows = [(f"every {poll * 1000:.0f} ms", name) for poll, name in ((POLL_S, "fast"),
                                                                   (SLOW_POLL_S, "slow"))]
    per_poll = s["cpu_per_poll_s"]
    return [
        "| job polled | polls | server CPU s | one step ms | total ms | total / bare |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {label} | {s[f'{name}_polls']:g} | {cpu(s[f'{name}_server_cpu_s'])} | "
          f"{ms(s[f'{name}_step_s'])} | {ms(s[f'{name}_total_s'])} | "
          f"{s[f'{name}_total_ratio']:.3f} |" for label, name in rows),
        "",
        "Each poll cost the server about "
        f"{'n/a' if per_poll is None else f'{per_poll * 1000:.1f} ms'} of CPU (the CPU "
        "difference over the poll difference), which a small machine takes from "
        f"the job's compute. The job polled every {SLOW_POLL_S * 1000:.0f} ms shows the job "
        f"machinery with little of that; its step and total are good to about one poll "
        f"({SLOW_POLL_S * 1000:.0f} ms).",
        "",
    ]


def raw_numbers(report: JobsReport) -> dict[str, Any]:
    return harness.raw(report, medians=summary(report), settings={
        "frames": FRAMES, "side": SIDE, "fps": FPS, "steps": STEPS, "guidance": GUIDANCE,
        "seed": SEED, "prompt": PROMPT, "poll_s": POLL_S, "slow_poll_s": SLOW_POLL_S,
        "progress_write_s": PROGRESS_WRITE_S, "shape": VIDEO_SHAPE})


# -- main ----------------------------------------------------------------------------------


def measure(args: argparse.Namespace, progress: harness.Progress, scratch: Path
            ) -> JobsReport:
    torch.set_num_threads(args.threads)
    watch = harness.CpuWatch()
    with harness.serve_pipeline(progress, args, scratch, "video-random", VIDEO_SHAPE,
                                build_random_text_to_video, video_entry, "DiffusionPipeline",
                                timeout=120) as (server, pipeline):
        report = JobsReport(harness.describe_machine(args.threads, torch.float32, "cpu"),
                            {"diffusers": metadata.version("diffusers"),
                             "av": metadata.version("av")},
                            args.rounds, harness.parameter_counts(pipeline))
        runs: dict[str, list[Any]] = harness.interleave(
            progress, args.rounds, "video", lambda run: (
                show_bare(run) if isinstance(run, BareRun) else show_job(run)), {
                "bare": lambda: bare_call(pipeline),
                "job": lambda: http_job(server.client, POLL_S, server.pid),
                "job_slow_poll": lambda: http_job(server.client, SLOW_POLL_S, server.pid),
            })
        report.bare, report.jobs = runs["bare"], runs["job"]
        report.slow_jobs = runs["job_slow_poll"]
        report.other_cpu = watch.other_share(server.pid)
        return report


def step_count(args: argparse.Namespace) -> int:
    setup = 4  # build, start server, load baseline, wait for ready
    return setup + (args.rounds + 1) * 3  # warm-up + rounds; bare, job, job polled seldom


def main(argv: list[str] | None = None) -> int:
    args = harness.Arguments("jobs", __doc__, rounds=5, models=True).parse(argv)
    return harness.run(args, "jobs", step_count, measure, render, raw_numbers, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
