"""Throughput and latency under load: concurrency sweeps through the real HTTP API, against
baselines measured in the same run.

    python -m benchmarks.sweep [--quick] [--out DIR] [--concurrency 1,2,4,8,16,32]
    ember bench sweep [--quick]

Chat: at each concurrency C, C async clients (the lean benchmarks/loadgen.py) stream chat
completions back to back for `--seconds` (`ignore_eos`, lengths spread evenly over 0.5-1.5x
`--tokens`, so clients do not finish in lockstep and arrivals spread out as they would with
real users); tokens received inside the window count, so each level is a steady state.
Reported per level: aggregate output tok/s, TTFT p50, inter-token latency p50, request
latency p50/p99, errors. Baseline: plain `model.generate`, one request
after another, on the same checkpoint and dtype, measured before, between and after the
levels.
Embeddings: 64 concurrent single-text requests against offline `encode(batch_size=32)` and
one-by-one `encode` on the same texts, rounds interleaved.
Roofline: measured memory bandwidth ÷ weight bytes = the batch-1 decode ceiling.

Writes OUT/sweep.md (table), OUT/sweep.json (raw numbers) and PNG plots; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from benchmarks.harness import EMBEDDING_MODEL, TOPICS, Level, Machine, request_tokens
from benchmarks.loadgen import Connection
from engine.core.registry import Registry
from engine.core.settings import load_settings
from models.chat import TransformersChat


@dataclass
class SweepReport:
    machine: Machine
    tokens: int
    seconds_per_level: float
    levels: list[Level] = field(default_factory=list)
    # The 1-client level again, between and after the others: ratios to "1 client" use the
    # median of all its runs, so one slow spell of a noisy machine does not decide them.
    single_repeats: list[Level] = field(default_factory=list)
    baseline_tok_s: list[float] = field(default_factory=list)
    bandwidth_bytes_s: float = 0.0
    weight_bytes: int = 0
    embed_per_s: dict[str, list[float]] = field(default_factory=dict)


# -- chat ----------------------------------------------------------------------------------


def baseline_generate(adapter: TransformersChat, tokens: int, requests: int) -> float:
    """Plain `generate`, one request after another: output tok/s including prefill."""
    started = time.perf_counter()
    total = 0
    for r in range(requests):
        length = request_tokens(tokens, 0, r)
        total += length
        prompt = f"Tell me a story about {TOPICS[r % len(TOPICS)]} (#0.{r})."
        text = adapter.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        inputs = adapter.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            adapter.model.generate(
                inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=length,
                min_new_tokens=length, do_sample=True, temperature=0.7, top_k=0,
            )
    return total / (time.perf_counter() - started)


# -- embeddings ----------------------------------------------------------------------------


async def concurrent_single_embeds(port: int, texts: list[str], concurrency: int) -> float:
    queue = list(reversed(texts))

    async def worker() -> None:
        async with Connection("127.0.0.1", port) as conn:
            while queue:
                text = queue.pop()
                reply = await conn.post_json(
                    "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": text})
                if len(reply["data"]) != 1:
                    raise RuntimeError("wrong number of embeddings")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(texts) / (time.perf_counter() - started)


def timed_encode(model: Any, texts: list[str], batch_size: int) -> float:
    started = time.perf_counter()
    if batch_size == 1:
        for text in texts:
            model.encode([text], normalize_embeddings=True)
    else:
        model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - started)


# -- report --------------------------------------------------------------------------------


def single_client(report: SweepReport) -> tuple[float, float]:
    """(output tok/s, TTFT p50 s) of one client: medians over every run of that level."""
    runs = [level for level in report.levels if level.concurrency == 1] + report.single_repeats
    return (statistics.median(level.tok_s for level in runs),
            statistics.median(level.percentile("ttft_s", 0.5) for level in runs))


def level_row(level: Level, single_tok_s: float, baseline: float) -> str:
    return (f"| {level.concurrency} | {level.tok_s:.1f} | {level.tok_s / single_tok_s:.2f}x | "
            f"{level.tok_s / baseline:.2f}x | {level.percentile('ttft_s', 0.5) * 1000:.0f} | "
            f"{level.itl_p50_s * 1000:.0f} | {level.percentile('latency_s', 0.5):.2f} | "
            f"{level.percentile('latency_s', 0.99):.2f} | {level.errors} |")


def targets(report: SweepReport) -> list[tuple[str, float, float]]:
    """(what, measured ratio, goal) for each goal of the throughput issue."""
    by_c = {level.concurrency: level for level in report.levels}
    single_tok_s, single_ttft_s = single_client(report)
    baseline = statistics.median(report.baseline_tok_s)
    goals = [("chat 1 client vs plain generate (output tok/s)", single_tok_s / baseline, 0.9)]
    if 16 in by_c:
        goals.append(("chat 16 clients vs 1 client (aggregate tok/s)",
                      by_c[16].tok_s / single_tok_s, 6.0))
        goals.append(("chat TTFT p50 at 16 ÷ at 1 (lower is better; goal ≤ 3)",
                      by_c[16].percentile("ttft_s", 0.5) / single_ttft_s, 3.0))
    emb = {k: statistics.median(v) for k, v in report.embed_per_s.items()}
    goals.append(("embeddings 64 concurrent HTTP vs offline encode(batch 32)",
                  emb["http_64_concurrent"] / emb["offline_batch_32"], 0.8))
    return goals


def render(report: SweepReport) -> str:
    m = report.machine
    single = next(level for level in report.levels if level.concurrency == 1)
    single_tok_s, _ = single_client(report)
    repeats = ", ".join(f"{level.tok_s:.1f}" for level in report.single_repeats)
    baseline = statistics.median(report.baseline_tok_s)
    roofline = report.bandwidth_bytes_s / report.weight_bytes
    emb = {k: statistics.median(v) for k, v in report.embed_per_s.items()}
    lines = [
        "# ember throughput sweep", "",
        f"{m.stamp} · torch {m.torch} · "
        f"{m.threads} threads · {m.dtype} on {m.device} · {report.tokens} tokens per request on "
        f"average · {report.seconds_per_level:.0f} s per level", "",
        f"Baseline, plain `generate` one request after another: {baseline:.1f} tok/s "
        f"(median of {len(report.baseline_tok_s)}).", "",
        "| clients | output tok/s | vs 1 client | vs generate | TTFT p50 ms | ITL p50 ms | "
        "latency p50 s | latency p99 s | errors |",
        "|---|---|---|---|---|---|---|---|---|",
        *(level_row(level, single_tok_s, baseline) for level in report.levels), "",
        f"The 1-client level ran again between and after the others ({repeats} tok/s); "
        f"ratios to 1 client use the median, {single_tok_s:.1f} tok/s.", "",
        f"Roofline (batch-1 decode): {report.bandwidth_bytes_s / 1e9:.1f} GB/s ÷ "
        f"{report.weight_bytes / 2**20:.0f} MiB weights = {roofline:.1f} tok/s; ember at 1 "
        f"client decodes {single.decode_tok_s:.1f} tok/s = {single.decode_tok_s / roofline:.2f} "
        "of it.", "",
        "| embeddings | sentences/s | ratio to offline batch 32 |", "|---|---|---|",
        *(f"| {name} | {value:.1f} | {value / emb['offline_batch_32']:.2f}x |"
          for name, value in emb.items()), "",
        "| goal | measured | target | met |", "|---|---|---|---|",
    ]
    for what, value, goal in targets(report):
        met = value <= goal if "lower is better" in what else value >= goal
        lines.append(f"| {what} | {value:.2f} | {goal} | {'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(report: SweepReport, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [level.concurrency for level in report.levels]
    charts = [
        ("sweep_tok_s.png", "output tok/s", [level.tok_s for level in report.levels]),
        ("sweep_p99.png", "request latency p99 (s)",
         [level.percentile("latency_s", 0.99) for level in report.levels]),
        ("sweep_ttft.png", "TTFT p50 (ms)",
         [level.percentile("ttft_s", 0.5) * 1000 for level in report.levels]),
    ]
    paths = []
    for name, label, ys in charts:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.plot(xs, ys, marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        paths.append(out / name)
    return paths


# -- main ----------------------------------------------------------------------------------


def measure(args: argparse.Namespace, progress: harness.Progress, scratch: Path
            ) -> SweepReport:
    settings = load_settings(preload=[])
    registry = Registry.from_settings(settings)
    torch.set_num_threads(args.threads)
    progress.step("loading the baseline models in this process")
    adapter = harness.load_chat_baseline(settings, registry)
    embedder = harness.load_embedding_baseline(settings, registry)
    report = SweepReport(
        harness.describe_machine(args.threads, adapter.context.dtype, adapter.context.device),
        args.tokens, args.seconds)
    report.weight_bytes = adapter.memory_bytes()
    report.bandwidth_bytes_s = harness.memory_bandwidth()
    baseline_requests = 2 if args.quick else 3

    def run_baseline(when: str) -> None:
        report.baseline_tok_s.append(progress.run(
            f"baseline generate ({when})",
            partial(baseline_generate, adapter, args.tokens, baseline_requests),
            lambda tok_s: f"{tok_s:.1f} tok/s"))

    def run_level(concurrency: int) -> Level:
        return progress.run(
            f"chat at {concurrency} concurrent clients",
            partial(harness.run_level, port, concurrency, args.seconds, args.tokens),
            lambda level: f"{level.tok_s:.1f} tok/s, TTFT p50 "
                          f"{level.percentile('ttft_s', 0.5) * 1000:.0f} ms, errors {level.errors}")

    with harness.serve(progress, scratch / "server.log", args.threads,
                       name="ember serve") as server:
        server.ready()
        port = server.port
        run_baseline("before")
        middle = len(args.concurrency) // 2
        for index, concurrency in enumerate(args.concurrency):
            report.levels.append(run_level(concurrency))
            if index == middle:
                run_baseline("between levels")
                report.single_repeats.append(run_level(1))
        run_baseline("after")
        report.single_repeats.append(run_level(1))
        texts = harness.make_sentences(128 if args.quick else 256, seed=1)
        timed_encode(embedder, texts[:32], 32)  # warm up
        for round_index in range(2 if args.quick else 3):
            progress.step(f"embeddings round {round_index + 1}")
            for name, run in (
                ("offline_batch_32", lambda: timed_encode(embedder, texts, 32)),
                ("offline_one_by_one", lambda: timed_encode(embedder, texts, 1)),
                ("http_64_concurrent",
                 lambda: asyncio.run(concurrent_single_embeds(port, texts, 64))),
            ):
                report.embed_per_s.setdefault(name, []).append(run())
    return report


def step_count(args: argparse.Namespace) -> int:
    return 7 + len(args.concurrency) + (2 if args.quick else 3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    flags = harness.Arguments("sweep", __doc__, quick="fewer levels, shorter ones",
                              threads=None)
    flags.add("--threads", type=int, default=torch.get_num_threads())
    flags.add("--concurrency", type=lambda s: [int(x) for x in s.split(",")])
    flags.add("--tokens", type=int)
    flags.add("--seconds", type=float, help="length of each concurrency level")
    args = flags.parse(argv)
    args.concurrency = args.concurrency or ([1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32])
    if 1 not in args.concurrency:
        args.concurrency = [1, *args.concurrency]
    args.tokens = args.tokens or (32 if args.quick else 64)
    args.seconds = args.seconds or (8.0 if args.quick else 25.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.run(args, "sweep", step_count, measure, render, asdict,
                       then=lambda report: show_plots(report, args.out))


def show_plots(report: SweepReport, out: Path) -> None:
    for path in plot(report, out):
        print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
