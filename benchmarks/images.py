"""Images: ember's `/v1/images/generations` against the same diffusers pipeline called directly,
in one run.

    python -m benchmarks.images [--quick] [--rounds N] [--out DIR] [--threads N] [--models DIR]
    ember bench images [--quick]

Seconds per image at 256x256, 4 steps, guidance 0 (no classifier-free guidance), float32:
one image per call (n=1) and four in one call (n=4), through HTTP (response_format b64_json,
so PNG encoding, base64 and JSON are inside the clock) and as a plain
`AutoPipelineForText2Image` call in this process with a prompt list and one seeded generator
per image, as the engine calls it. Through HTTP also four n=1 requests one after another and
four in flight at once, which the engine's batcher may run as one pipeline call (the report
says how many batches it ran, read from /metrics).

No diffusion weights are installed offline, so the pipeline is Stable-Diffusion-shaped with
random weights (a UNet of about 18 M parameters, a small CLIP text encoder, an SD-style VAE),
built once from configs into --models: the numbers measure serving overhead and batching on
realistic-ish compute, not image quality.

Baseline and HTTP runs alternate round by round, so slow phases of a noisy machine hit both
alike; the report gives medians and ember / baseline ratios. Prints a Markdown table to
stdout (progress goes to stderr) and writes it to OUT/images.md, with the raw numbers in
OUT/images.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from benchmarks import harness
from engine.core.image_codec import encode_image

MODEL_ID = "bench-sd-random"
PROMPT = "a watercolor painting of a lighthouse on a cliff at dawn, soft light"
SIZE = 256
STEPS = 4
GUIDANCE = 0.0
SEED = 1234
BATCH = 4  # n of the batched call, and requests in flight
MAX_WAIT_MS = 20  # as the packaged image presets

# The random pipeline's shape: bigger than the tests' toy one so compute is realistic for a
# small model. Changing it changes the cache folder's name, so it is rebuilt.
SD_SHAPE: dict[str, Any] = {"unet_channels": [64, 128, 256], **harness.PIPELINE_SHAPE}
VARIANTS = ("baseline_n1", "baseline_n4", "http_n1", "http_n4", "http_sequential",
            "http_concurrent")


# -- the random pipeline --------------------------------------------------------------------


def build_random_stable_diffusion(folder: Path, shape: dict[str, Any] = SD_SHAPE) -> Path:
    """A StableDiffusionPipeline with random weights; returns the pipeline folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    return harness.build_random_pipeline(
        folder, shape, SIZE, UNet2DConditionModel, "2D",
        lambda **parts: StableDiffusionPipeline(
            **parts, scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False))


def image_entry(source: Path) -> dict[str, Any]:
    return {
        "id": MODEL_ID, "task": "image", "adapter": "models.diffusion:DiffusionImages",
        "source": str(source), "dtype": "float32",
        "limits": {"max_batch_size": BATCH, "max_wait_ms": MAX_WAIT_MS},
        "options": {"default_size": [SIZE, SIZE], "max_side": 2 * SIZE, "default_steps": STEPS,
                    "max_steps": 50, "default_guidance": GUIDANCE},
    }


# -- results -------------------------------------------------------------------------------


@dataclass
class ImageRun:
    """One variant once: `images` made in `wall_s`. HTTP runs record the pipeline calls the
    engine ran for them (`batches`, from /metrics) and the bytes received; baseline runs the
    PNG encoding of their images, timed after the clock stopped."""

    wall_s: float
    images: int
    batches: int | None = None
    response_bytes: int = 0
    png_s: float | None = None

    @property
    def s_per_image(self) -> float:
        return self.wall_s / self.images


@dataclass
class ImagesReport(harness.PipelineReport):
    runs: dict[str, list[ImageRun]] = field(default_factory=dict)
    # max |pixel difference| (0-255) of the last round's HTTP images against the baseline's
    # images of the same seed
    pixel_diff: dict[str, int] = field(default_factory=dict)


# -- baseline ------------------------------------------------------------------------------


def seeds(count: int) -> list[int]:
    return [SEED + index for index in range(count)]


def baseline_call(pipeline: Any, count: int, keep: dict[int, np.ndarray]) -> ImageRun:
    """One pipeline call for `count` images, with the engine's arguments."""
    started = time.perf_counter()
    with torch.inference_mode():
        images = pipeline(
            prompt=[PROMPT] * count, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            width=SIZE, height=SIZE, output_type="pil",
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds(count)],
        ).images
    wall = time.perf_counter() - started
    encode_started = time.perf_counter()
    for image in images:
        encode_image(image, "png")
    png_s = time.perf_counter() - encode_started
    keep.update({seed: np.asarray(image) for seed, image in zip(seeds(count), images,
                                                              strict=True)})
    return ImageRun(wall, len(images), png_s=png_s)


# -- HTTP ----------------------------------------------------------------------------------


def batches_run(client: httpx.Client) -> int:
    """Pipeline calls the engine has run for the model so far (its batcher's batch count)."""
    text = client.get("/metrics").text
    match = re.search(rf'^ember_batch_size_count\{{model="{re.escape(MODEL_ID)}"\}} (\S+)$',
                      text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def post_images(client: httpx.Client, n: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    body = {
        "model": MODEL_ID, "prompt": PROMPT, "n": n, "size": f"{SIZE}x{SIZE}",
        "response_format": "b64_json", "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE, "seed": seed,
    }
    response = client.post("/v1/images/generations", json=body)
    response.raise_for_status()
    data: list[dict[str, Any]] = response.json()["data"]
    if len(data) != n:
        raise RuntimeError(f"asked for {n} images, got {len(data)}")
    return data, len(response.content)


def decode_items(items: list[dict[str, Any]]) -> dict[int, np.ndarray]:
    return {int(item["seed"]): np.asarray(Image.open(io.BytesIO(
        base64.b64decode(item["b64_json"]))).convert("RGB")) for item in items}


def http_run(
    client: httpx.Client, requests: list[tuple[int, int]], keep: dict[int, np.ndarray],
    pool: ThreadPoolExecutor | None = None,
) -> ImageRun:
    """`requests` as (n, seed), one after another, or all in flight at once with a pool."""
    before = batches_run(client)
    started = time.perf_counter()
    if pool is None:
        answers = [post_images(client, n, seed) for n, seed in requests]
    else:
        answers = list(pool.map(lambda request: post_images(client, *request), requests))
    wall = time.perf_counter() - started
    batches = batches_run(client) - before
    items = [item for data, _ in answers for item in data]
    keep.update(decode_items(items))  # after the clock: the client's own work
    return ImageRun(wall, len(items), batches=batches,
                    response_bytes=sum(size for _, size in answers))


def show_run(run: ImageRun) -> str:
    batches = "" if run.batches is None else f", {run.batches} engine batch(es)"
    return f"{run.s_per_image:.3f} s/image ({run.images} in {run.wall_s:.2f} s{batches})"


# -- report --------------------------------------------------------------------------------


def summary(report: ImagesReport) -> dict[str, float]:
    """Medians over rounds (s/image, batches, bytes), ember / baseline ratios and the
    batched / one-at-a-time ratios (lower is better for all of them)."""
    numbers: dict[str, float] = {}
    for name, runs in report.runs.items():
        numbers[f"s_per_image_{name}"] = harness.median_of(runs, lambda r: r.s_per_image)
        if name.startswith("http"):
            numbers[f"batches_{name}"] = harness.median_of(runs, lambda r: r.batches or 0)
    s = numbers
    numbers.update({
        "ratio_n1": s["s_per_image_http_n1"] / s["s_per_image_baseline_n1"],
        "ratio_n4": s["s_per_image_http_n4"] / s["s_per_image_baseline_n4"],
        "ratio_sequential": s["s_per_image_http_sequential"] / s["s_per_image_baseline_n1"],
        "ratio_concurrent": s["s_per_image_http_concurrent"] / s["s_per_image_baseline_n4"],
        "batched_vs_single_baseline": s["s_per_image_baseline_n4"] / s["s_per_image_baseline_n1"],
        "batched_vs_sequential_http": (s["s_per_image_http_n4"]
                                       / s["s_per_image_http_sequential"]),
        "concurrent_vs_sequential_http": (s["s_per_image_http_concurrent"]
                                          / s["s_per_image_http_sequential"]),
        "png_s_per_image": harness.median_of(report.runs["baseline_n4"],
                                     lambda r: (r.png_s or 0.0) / r.images),
        "response_bytes_per_image": harness.median_of(report.runs["http_n4"],
                                              lambda r: r.response_bytes / r.images),
    })
    return numbers


def render(report: ImagesReport) -> str:
    s = summary(report)
    rows: list[tuple[str, float, float, float]] = [
        ("s/image, n=1", s["s_per_image_baseline_n1"], s["s_per_image_http_n1"], s["ratio_n1"]),
        (f"s/image, n={BATCH} in one call", s["s_per_image_baseline_n4"],
         s["s_per_image_http_n4"], s["ratio_n4"]),
        (f"s/image, {BATCH} n=1 requests one after another (vs baseline n=1)",
         s["s_per_image_baseline_n1"], s["s_per_image_http_sequential"],
         s["ratio_sequential"]),
        (f"s/image, {BATCH} n=1 requests in flight at once (vs baseline n={BATCH})",
         s["s_per_image_baseline_n4"], s["s_per_image_http_concurrent"],
         s["ratio_concurrent"]),
    ]
    total_m = sum(report.parameters.values()) / 1e6
    diffs = ", ".join(f"{name} {diff}" for name, diff in report.pixel_diff.items())
    lines = [
        "# ember images",
        "",
        report.header,
        "",
        "| metric | baseline | ember HTTP | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {b:.3f} | {h:.3f} | {ratio:.2f} |" for name, b, h, ratio in rows),
        "",
        f"| batching: s/image of {BATCH} images, against {BATCH} n=1 calls one after another "
        "| baseline | ember HTTP |",
        "|---|---:|---:|",
        f"| n={BATCH} in one call | {s['batched_vs_single_baseline']:.2f} "
        f"| {s['batched_vs_sequential_http']:.2f} |",
        f"| {BATCH} n=1 requests in flight at once | | "
        f"{s['concurrent_vs_sequential_http']:.2f} |",
        "",
        f"{SIZE}x{SIZE}, {STEPS} steps, guidance {GUIDANCE:g} (no CFG), one seeded generator "
        f"per image. The weights are random (a Stable-Diffusion-shaped pipeline built from "
        f"configs: {report.parameters_line}; {total_m:.1f} M parameters in all), so these "
        "numbers measure serving overhead and batching, not image quality. Baseline: the same "
        "folder loaded in-process with `AutoPipelineForText2Image.from_pretrained` (float32, "
        "as the registry entry) and called with a prompt list. ember HTTP: "
        "`/v1/images/generations` with response_format b64_json, so PNG encoding, base64 and "
        "JSON are inside its clock "
        f"(max_batch_size {BATCH}, max_wait_ms {MAX_WAIT_MS}). Ratio = ember HTTP / "
        "baseline; lower is better in every row.",
        "",
        f"Pipeline calls the engine ran (median per round): n={BATCH} in one request "
        f"{s['batches_http_n4']:g}, {BATCH} n=1 one after another "
        f"{s['batches_http_sequential']:g}, {BATCH} n=1 in flight "
        f"{s['batches_http_concurrent']:g}. PNG encoding takes "
        f"{1000 * s['png_s_per_image']:.0f} ms per image (timed in the baseline process, "
        "outside its clock); a b64_json response carries "
        f"{s['response_bytes_per_image'] / 1024:.0f} KiB per image.",
        "",
        f"Max pixel difference (0-255) of ember's images from the baseline's with the same "
        f"seed (last round): {diffs}. The n=1 requests are compared with the baseline's "
        f"n={BATCH} call, so a difference there can be batch size changing the arithmetic.",
    ]
    return "\n".join(lines) + "\n"


def raw_numbers(report: ImagesReport) -> dict[str, Any]:
    return harness.raw(report, medians=summary(report), settings={
        "size": SIZE, "steps": STEPS, "guidance": GUIDANCE, "seed": SEED, "prompt": PROMPT,
        "batch": BATCH, "max_wait_ms": MAX_WAIT_MS, "shape": SD_SHAPE})


# -- main ----------------------------------------------------------------------------------


def pixel_diff(reference: dict[int, np.ndarray], images: dict[int, np.ndarray]) -> int:
    """The largest |difference| of any pixel channel from the reference image of its seed."""
    return max(int(np.abs(image.astype(np.int16) - reference[seed].astype(np.int16)).max())
               for seed, image in images.items())


def measure(args: argparse.Namespace, progress: harness.Progress, scratch: Path
            ) -> ImagesReport:
    torch.set_num_threads(args.threads)
    watch = harness.CpuWatch()
    with harness.serve_pipeline(progress, args, scratch, "sd-random", SD_SHAPE,
                                build_random_stable_diffusion, image_entry,
                                "AutoPipelineForText2Image", timeout=600) as (server, pipeline), \
            ThreadPoolExecutor(BATCH) as pool:
        client = server.client
        report = ImagesReport(
            harness.describe_machine(args.threads, torch.float32, "cpu"),
            {"diffusers": metadata.version("diffusers")}, args.rounds,
            harness.parameter_counts(pipeline),
        )
        kept: dict[str, dict[int, np.ndarray]] = {name: {} for name in VARIANTS}
        singles = [(1, seed) for seed in seeds(BATCH)]
        report.runs = harness.interleave(progress, args.rounds, "images", show_run, {
            "baseline_n1": lambda: baseline_call(pipeline, 1, kept["baseline_n1"]),
            "baseline_n4": lambda: baseline_call(pipeline, BATCH, kept["baseline_n4"]),
            "http_n1": lambda: http_run(client, [(1, SEED)], kept["http_n1"]),
            "http_n4": lambda: http_run(client, [(BATCH, SEED)], kept["http_n4"]),
            "http_sequential": lambda: http_run(client, singles, kept["http_sequential"]),
            "http_concurrent": lambda: http_run(client, singles, kept["http_concurrent"],
                                                pool),
        })
        batched = kept["baseline_n4"]
        report.pixel_diff = {
            "n=1": pixel_diff(kept["baseline_n1"], kept["http_n1"]),
            f"n={BATCH}": pixel_diff(batched, kept["http_n4"]),
            f"{BATCH} n=1 one after another": pixel_diff(batched, kept["http_sequential"]),
            f"{BATCH} n=1 in flight": pixel_diff(batched, kept["http_concurrent"]),
        }
        report.other_cpu = watch.other_share(server.pid)
        return report


def step_count(args: argparse.Namespace) -> int:
    setup = 4  # build, start server, load baseline, wait for ready
    return setup + (args.rounds + 1) * len(VARIANTS)  # warm-up + rounds


def main(argv: list[str] | None = None) -> int:
    args = harness.Arguments("images", __doc__, rounds=5, models=True).parse(argv)
    return harness.run(args, "images", step_count, measure, render, raw_numbers, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
