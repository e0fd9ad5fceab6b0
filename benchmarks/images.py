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
import hashlib
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml
from PIL import Image

from benchmarks.overhead import (
    DEFAULT_OUT,
    Machine,
    Progress,
    describe_machine,
    free_port,
    interleave,
    start_server,
    stop_server,
    wait_until_ready,
    write_report,
)
from engine.core.image_codec import encode_image

MODEL_ID = "bench-sd-random"
PROMPT = "a watercolor painting of a lighthouse on a cliff at dawn, soft light"
SIZE = 256
STEPS = 4
GUIDANCE = 0.0
SEED = 1234
BATCH = 4  # n of the batched call, and requests in flight
MAX_WAIT_MS = 20  # as the packaged image presets
DEFAULT_MODELS = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                  / "ember" / "bench")

# The random pipeline's shape: bigger than the tests' toy one so compute is realistic for a
# small model. Changing it changes the cache folder's name, so it is rebuilt.
SD_SHAPE: dict[str, Any] = {
    "unet_channels": [64, 128, 256],
    "unet_layers": 2,
    "text_hidden": 64,
    "text_layers": 2,
    "vae_channels": [32, 64, 64, 64],
}
VARIANTS = ("baseline_n1", "baseline_n4", "http_n1", "http_n4", "http_sequential",
            "http_concurrent")


# -- the random pipeline --------------------------------------------------------------------


def shape_tag(name: str, shape: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def write_byte_clip_tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer whose vocabulary is every printable byte (plus CLIP's specials),
    written locally: no download."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(33, 127)] + [f"{chr(c)}</w>" for c in range(33, 127)]
    vocab = {s: i for i, s in enumerate([*symbols, "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def random_clip_text_encoder(tokenizer: Any, hidden: int, layers: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=hidden, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    ))


def random_sd_vae(channels: Sequence[int]) -> Any:
    """An SD-style AutoencoderKL (4 latent channels, scale factor 2 ** (blocks - 1) = 8)."""
    from diffusers import AutoencoderKL

    blocks = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(channels), layers_per_block=1, norm_num_groups=32,
    )


def build_random_stable_diffusion(folder: Path, shape: dict[str, Any] = SD_SHAPE) -> Path:
    """A StableDiffusionPipeline with random weights (seeded, so the same shape gives the same
    weights), saved with `save_pretrained` so it loads through `from_pretrained` as a real
    checkpoint does. Returns the pipeline folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = write_byte_clip_tokenizer(folder / "clip-tokenizer")
    torch.manual_seed(0)
    text_encoder = random_clip_text_encoder(tokenizer, shape["text_hidden"], shape["text_layers"])
    vae = random_sd_vae(shape["vae_channels"])
    levels = len(shape["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4,
        layers_per_block=shape["unet_layers"], block_out_channels=tuple(shape["unet_channels"]),
        norm_num_groups=32, cross_attention_dim=shape["text_hidden"], attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def cached_build(models_dir: Path, name: str, build: Any) -> Path:
    """`build(folder)` once into models_dir/name (built aside, then renamed into place, so an
    interrupted build is never taken for a finished one). Returns the pipeline folder."""
    folder = models_dir / name
    if not (folder / "pipeline" / "model_index.json").is_file():
        models_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
        try:
            build(scratch)
            shutil.rmtree(folder, ignore_errors=True)
            scratch.rename(folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder / "pipeline"


def write_registry(path: Path, entry: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"models": [entry]}, sort_keys=False))
    return path


def image_entry(source: Path) -> dict[str, Any]:
    return {
        "id": MODEL_ID, "task": "image", "adapter": "models.diffusion:DiffusionImages",
        "source": str(source), "dtype": "float32",
        "limits": {"max_batch_size": BATCH, "max_wait_ms": MAX_WAIT_MS},
        "options": {"default_size": [SIZE, SIZE], "max_side": 2 * SIZE, "default_steps": STEPS,
                    "max_steps": 50, "default_guidance": GUIDANCE},
    }


def load_pipeline(source: Path) -> Any:
    """The pipeline as the adapter loads it (same call, float32 on the CPU)."""
    from diffusers import AutoPipelineForText2Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `torch_dtype`, as the adapter passes
        pipeline = AutoPipelineForText2Image.from_pretrained(
            source, torch_dtype=torch.float32, local_files_only=True
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def parameter_counts(pipeline: Any) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in pipeline.components.items()
            if isinstance(module, torch.nn.Module)}


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
class ImagesReport:
    machine: Machine
    runtimes: dict[str, str]
    rounds: int
    parameters: dict[str, int]
    # the CPU time other processes used during the run, as a share of all cores' time
    other_cpu: float | None = None
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


def median_of(runs: list[ImageRun], value: Any) -> float:
    return float(statistics.median(value(run) for run in runs))


def summary(report: ImagesReport) -> dict[str, float]:
    """Medians over rounds (s/image, batches, bytes), ember / baseline ratios and the
    batched / one-at-a-time ratios (lower is better for all of them)."""
    numbers: dict[str, float] = {}
    for name, runs in report.runs.items():
        numbers[f"s_per_image_{name}"] = median_of(runs, lambda r: r.s_per_image)
        if name.startswith("http"):
            numbers[f"batches_{name}"] = median_of(runs, lambda r: r.batches or 0)
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
        "png_s_per_image": median_of(report.runs["baseline_n4"],
                                     lambda r: (r.png_s or 0.0) / r.images),
        "response_bytes_per_image": median_of(report.runs["http_n4"],
                                              lambda r: r.response_bytes / r.images),
    })
    return numbers


def render(report: ImagesReport) -> str:
    m, s = report.machine, summary(report)
    runtimes = ", ".join(f"{name} {version}" for name, version in report.runtimes.items())
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
    params = report.parameters
    total_m = sum(params.values()) / 1e6
    parts = ", ".join(f"{name} {count / 1e6:.1f} M" for name, count in params.items())
    diffs = ", ".join(f"{name} {diff}" for name, diff in report.pixel_diff.items())
    lines = [
        "# ember images",
        "",
        f"{m.date} · ember {m.ember_commit} · {m.cpu}, {m.cores} cores · torch {m.torch}, "
        f"{runtimes} · {m.threads} threads · {m.dtype} on {m.device} · median of "
        f"{report.rounds} interleaved rounds{contention_note(report.other_cpu)}",
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
        f"configs: {parts}; {total_m:.1f} M parameters in all), so these numbers measure "
        "serving overhead and batching, not image quality. Baseline: the same folder loaded "
        "in-process with `AutoPipelineForText2Image.from_pretrained` (float32, as the "
        "registry entry) and called with a prompt list. ember HTTP: `/v1/images/generations` "
        "with response_format b64_json, so PNG encoding, base64 and JSON are inside its clock "
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
    data = asdict(report)
    data["medians"] = summary(report)
    data["settings"] = {"size": SIZE, "steps": STEPS, "guidance": GUIDANCE, "seed": SEED,
                        "prompt": PROMPT, "batch": BATCH, "max_wait_ms": MAX_WAIT_MS,
                        "shape": SD_SHAPE}
    return data


# -- other work on the machine --------------------------------------------------------------


class CpuWatch:
    """How much of the machine's CPU time processes other than this one and the server used
    between `__init__` and `other_share` (Linux /proc; None elsewhere). A benchmark sharing its
    cores with other work measures that work too."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy = self._busy_s()
        self.own = self._own_s()

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        times = os.times()
        return times.user + times.system

    @staticmethod
    def process_s(pid: int) -> float | None:
        """User + system CPU seconds of a running process (all its threads)."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def other_share(self, server_pid: int) -> float | None:
        """Call before the server stops."""
        busy, server = self._busy_s(), self.process_s(server_pid)
        if busy is None or self.busy is None or server is None:
            return None
        other = (busy - self.busy) - (self._own_s() - self.own) - server
        capacity = (time.perf_counter() - self.started) * (os.cpu_count() or 1)
        return max(0.0, other / capacity)


def contention_note(share: float | None) -> str:
    """For the header: what other processes used while this ran, and a warning if much."""
    if share is None:
        return ""
    note = f" · other processes used {100 * share:.0f}% of the CPU meanwhile"
    if share >= 0.1:
        note += " (**the machine was shared: the numbers are unreliable**)"
    return note


# -- main ----------------------------------------------------------------------------------


def pixel_diff(reference: dict[int, np.ndarray], images: dict[int, np.ndarray]) -> int:
    """The largest |difference| of any pixel channel from the reference image of its seed."""
    return max(int(np.abs(image.astype(np.int16) - reference[seed].astype(np.int16)).max())
               for seed, image in images.items())


def measure(args: argparse.Namespace, progress: Progress, scratch: Path, log: Path,
            log_file: Any) -> ImagesReport:
    torch.set_num_threads(args.threads)
    watch = CpuWatch()
    source = progress.run(
        f"building the random pipeline (once) in {args.models}",
        lambda: cached_build(args.models, shape_tag("sd-random", SD_SHAPE),
                             build_random_stable_diffusion),
        str)
    registry = write_registry(scratch / "models.yaml", image_entry(source))
    port = free_port()
    progress.step(f"starting the server on port {port} (log: {log})")
    server = start_server(port, args.threads, log_file, preload=[MODEL_ID], env={
        "EMBER_REGISTRY_FILE": str(registry), "EMBER_DATA_DIR": str(scratch / "data")})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client, \
                ThreadPoolExecutor(BATCH) as pool:
            # Load the baseline while the server loads: load time is not measured.
            progress.step("loading the baseline pipeline in-process")
            pipeline = load_pipeline(source)
            progress.step("waiting for the server's /ready")
            ready_s = wait_until_ready(client, server, log)
            print(f"        ready after {ready_s:.1f} s", file=sys.stderr, flush=True)

            report = ImagesReport(
                describe_machine(args.threads, torch.float32, "cpu"),
                {"diffusers": metadata.version("diffusers")}, args.rounds,
                parameter_counts(pipeline),
            )
            kept: dict[str, dict[int, np.ndarray]] = {name: {} for name in VARIANTS}
            singles = [(1, seed) for seed in seeds(BATCH)]
            report.runs = interleave(progress, args.rounds, "images", show_run, {
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
    finally:
        stop_server(server)


def step_count(rounds: int) -> int:
    setup = 4  # build, start server, load baseline, wait for ready
    return setup + (rounds + 1) * len(VARIANTS)  # warm-up + rounds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round (unless --rounds)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                        help=f"where the random pipeline is built once (default {DEFAULT_MODELS})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for the baseline and the server (default: all cores)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    return args


def quiet_libraries() -> None:
    """Keep stderr to the progress lines."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    progress = Progress(step_count(args.rounds))
    with tempfile.TemporaryDirectory(prefix="ember-bench-images-") as folder:
        scratch = Path(folder)
        log = scratch / "server.log"
        with log.open("w") as log_file:
            report = measure(args, progress, scratch, log, log_file)

    write_report(args.out, "images", render(report), raw_numbers(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
