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
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.loadgen import Connection, HTTPError
from benchmarks.overhead import (
    CHAT_MODEL,
    DEFAULT_OUT,
    EMBEDDING_MODEL,
    Machine,
    Progress,
    describe_machine,
    free_port,
    load_chat_baseline,
    load_embedding_baseline,
    make_sentences,
    memory_bandwidth,
    start_server,
    stop_server,
    wait_until_ready,
)
from engine.core.registry import Registry
from engine.core.settings import load_settings
from models.chat import TransformersChat

TOPICS = ["a lighthouse", "the moon", "a bakery", "an old map", "a robot", "the ocean",
          "a mountain village", "a train station", "a library", "a garden"]


def request_tokens(tokens: int, client: int, request: int) -> int:
    """Output length of one request: spread over 0.5-1.5x the mean, the same in every run."""
    spread = (client * 7 + request * 3) % 11 / 10  # 0.0 .. 1.0
    return max(2, round(tokens * (0.5 + spread)))


@dataclass
class RequestTiming:
    ttft_s: float
    latency_s: float
    tokens: int  # received before the level's time ran out
    gaps_s: list[float]
    completed: bool = True


@dataclass
class Level:
    concurrency: int
    wall_s: float
    timings: list[RequestTiming]
    errors: int

    @property
    def tok_s(self) -> float:
        return sum(t.tokens for t in self.timings) / self.wall_s

    def percentile(self, attribute: str, q: float) -> float:
        """Over requests that finished (TTFT: over every request that got a first token)."""
        timings = self.timings if attribute == "ttft_s" else [
            t for t in self.timings if t.completed]
        # NaN: not measured (a TTFT that fell in the warm-up).
        values = sorted(v for t in timings if (v := getattr(t, attribute)) == v)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else 0.0

    @property
    def itl_p50_s(self) -> float:
        gaps = [g for t in self.timings for g in t.gaps_s]
        return statistics.median(gaps) if gaps else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Per-stream decode rate (prefill excluded), median over requests."""
        rates = [(t.tokens - 1) / sum(t.gaps_s) for t in self.timings if sum(t.gaps_s) > 0]
        return statistics.median(rates) if rates else 0.0


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


def chat_body(prompt: str, tokens: int, seed: int) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0.7, "seed": seed, "ignore_eos": True,
            "stream": True}


async def stream_one(
    conn: Connection, prompt: str, tokens: int, seed: int, deadline: float,
    measure_from: float = 0.0, extra: dict[str, Any] | None = None,
) -> RequestTiming:
    """One streamed request; stops reading at `deadline` (the caller then drops the
    connection, which cancels the rest on the server). Only tokens after `measure_from`
    count, and a TTFT only when the request started after it (else NaN)."""
    started = time.perf_counter()
    times: list[float] = []
    completed = True
    async for frame in conn.stream_events("/v1/chat/completions",
                                          {**chat_body(prompt, tokens, seed), **(extra or {})}):
        if "error" in frame:
            raise RuntimeError(frame["error"]["message"])
        now = time.perf_counter()
        if now > deadline:
            completed = False
            break
        if any(c.get("delta", {}).get("content") for c in frame.get("choices", [])):
            times.append(now)
    ttft = times[0] - started if times and started >= measure_from else float("nan")
    times = [t for t in times if t >= measure_from]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return RequestTiming(ttft, time.perf_counter() - started, len(times), gaps, completed)


LOAD_ERRORS = (HTTPError, RuntimeError, OSError, asyncio.IncompleteReadError)


async def run_level(port: int, concurrency: int, seconds: float, tokens: int,
                    warmup_s: float = 0.0, extra: dict[str, Any] | None = None) -> Level:
    """C clients issue requests back to back for `seconds`; tokens that arrive within the
    window count, so the rate is a steady state, not a ramp-down with fewer clients left.

    With `warmup_s`, the clients start one by one over that time first (client i after
    i * warmup_s / C) and nothing from it counts: the window then measures the steady
    state of C clients, not C first prompts arriving in the same instant. `extra`: fields
    added to every request body (a response_format, say)."""
    timings: list[RequestTiming] = []
    errors = 0
    started = time.perf_counter()
    measure_from = started + warmup_s
    deadline = measure_from + seconds

    async def client_loop(index: int) -> None:
        nonlocal errors
        await asyncio.sleep(index * warmup_s / concurrency)
        request = 0
        while time.perf_counter() < deadline:
            async with Connection("127.0.0.1", port) as conn:
                while time.perf_counter() < deadline:
                    topic = TOPICS[(index + request) % len(TOPICS)]
                    try:
                        timing = await stream_one(
                            conn, f"Tell me a story about {topic} (#{index}.{request}).",
                            request_tokens(tokens, index, request), index * 100 + request,
                            deadline, measure_from, extra)
                    except LOAD_ERRORS:
                        errors += 1
                        break  # the connection's state is unknown: open a new one
                    request += 1
                    if timing.tokens:
                        timings.append(timing)
                    if not timing.completed:
                        return

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    return Level(concurrency, seconds, timings, errors)


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
        f"{m.date} · ember {m.ember_commit} · {m.cpu}, {m.cores} cores · torch {m.torch} · "
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


def measure(args: argparse.Namespace, progress: Progress, log: Path, log_file: Any) -> SweepReport:
    settings = load_settings(preload=[])
    registry = Registry.from_settings(settings)
    torch.set_num_threads(args.threads)
    progress.step("loading the baseline models in this process")
    adapter = load_chat_baseline(settings, registry)
    embedder = load_embedding_baseline(settings, registry)
    report = SweepReport(
        describe_machine(args.threads, adapter.context.dtype, adapter.context.device),
        args.tokens, args.seconds)
    report.weight_bytes = adapter.memory_bytes()
    report.bandwidth_bytes_s = memory_bandwidth()
    baseline_requests = 2 if args.quick else 3

    def run_baseline(when: str) -> None:
        progress.step(f"baseline generate ({when})")
        report.baseline_tok_s.append(baseline_generate(adapter, args.tokens, baseline_requests))
        print(f"        {report.baseline_tok_s[-1]:.1f} tok/s", file=sys.stderr, flush=True)

    def run_level_and_show(concurrency: int) -> Level:
        progress.step(f"chat at {concurrency} concurrent clients")
        level = asyncio.run(run_level(port, concurrency, args.seconds, args.tokens))
        print(f"        {level.tok_s:.1f} tok/s, TTFT p50 "
              f"{level.percentile('ttft_s', 0.5) * 1000:.0f} ms, errors {level.errors}",
              file=sys.stderr, flush=True)
        return level

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_server(port, args.threads, log_file)
    try:
        with httpx.Client(base_url=base_url) as client:
            progress.step("starting ember serve")
            wait_until_ready(client, server, log)
        run_baseline("before")
        middle = len(args.concurrency) // 2
        for index, concurrency in enumerate(args.concurrency):
            report.levels.append(run_level_and_show(concurrency))
            if index == middle:
                run_baseline("between levels")
                report.single_repeats.append(run_level_and_show(1))
        run_baseline("after")
        report.single_repeats.append(run_level_and_show(1))
        texts = make_sentences(128 if args.quick else 256, seed=1)
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
    finally:
        stop_server(server)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer levels, shorter ones")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--seconds", type=float, help="length of each concurrency level")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or ([1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32])
    if 1 not in args.concurrency:
        args.concurrency = [1, *args.concurrency]
    args.tokens = args.tokens or (32 if args.quick else 64)
    args.seconds = args.seconds or (8.0 if args.quick else 25.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    progress = Progress(total=7 + len(args.concurrency) + (2 if args.quick else 3))
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "server.log"
        with log.open("w") as log_file:
            report = measure(args, progress, log, log_file)
    table = render(report)
    print(table)
    (args.out / "sweep.md").write_text(table)
    (args.out / "sweep.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    for path in plot(report, args.out):
        print(f"plot: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
