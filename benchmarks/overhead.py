"""Server overhead: ember's HTTP API against the same models called directly, in one run.

    python -m benchmarks.overhead [--quick] [--out DIR] [--threads N]

Measures (1) batch-1 chat decode tok/s and TTFT streamed through `/v1/chat/completions`
against plain `model.generate` on the same de-quantized checkpoint, and (2) embeddings/s
through `/v1/embeddings` against `SentenceTransformer.encode` on the same texts. Baseline and
HTTP runs alternate round by round, so slow phases of a noisy machine hit both alike, and the
report gives medians. Decode tok/s is (N - 1) / (last token time - first token time) on both
sides, so prefill is left out of it; TTFT and total request time carry it.

Prints a Markdown table to stdout (progress goes to stderr) and writes it to
OUT/overhead.md, with the raw numbers in OUT/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers
from sentence_transformers import SentenceTransformer
from transformers.generation.streamers import BaseStreamer

from benchmarks import harness
from benchmarks.harness import CHAT_MODEL, CHAT_PROMPT, EMBEDDING_MODEL, ChatSample, Machine
from engine.core.registry import Registry
from engine.core.settings import load_settings
from models.chat import TransformersChat

EMBED_TEXTS = 256
EMBED_BATCH = 32


# -- results -------------------------------------------------------------------------------


@dataclass
class Roofline:
    bandwidth_bytes_s: float
    weight_bytes: int

    @property
    def tok_s(self) -> float:
        return self.bandwidth_bytes_s / self.weight_bytes


@dataclass
class Report:
    machine: Machine
    tokens: int
    rounds: int
    roofline: Roofline
    chat: dict[str, list[ChatSample]] = field(default_factory=dict)
    embeddings_per_s: dict[str, list[float]] = field(default_factory=dict)


# -- chat ----------------------------------------------------------------------------------


class TimingStreamer(BaseStreamer):
    """Timestamps each `put`: generate() puts the prompt first, then one call per token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def baseline_chat(adapter: TransformersChat, tokens: int) -> ChatSample:
    # Templating and tokenizing are inside the clock: the server does them per request too.
    started = time.perf_counter()
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    text = adapter.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    inputs = adapter.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    streamer = TimingStreamer()
    with torch.no_grad():
        adapter.model.generate(
            inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=tokens,
            min_new_tokens=tokens, do_sample=False, streamer=streamer,
        )
    finished = time.perf_counter()
    token_times = streamer.times[1:]  # the first put is the prompt
    if len(token_times) != tokens:
        raise RuntimeError(f"baseline generated {len(token_times)} tokens, expected {tokens}")
    return harness.chat_sample(started, token_times, finished, tokens)


# -- embeddings ----------------------------------------------------------------------------


def direct_embed(model: SentenceTransformer, texts: list[str]) -> float:
    started = time.perf_counter()
    model.encode(texts, batch_size=EMBED_BATCH, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - started)


def http_embed(client: httpx.Client, texts: list[str], per_request: int) -> float:
    started = time.perf_counter()
    for first in range(0, len(texts), per_request):
        chunk = texts[first:first + per_request]
        response = client.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": chunk})
        response.raise_for_status()
        if len(response.json()["data"]) != len(chunk):
            raise RuntimeError("the server returned the wrong number of embeddings")
    return len(texts) / (time.perf_counter() - started)


# -- report --------------------------------------------------------------------------------


def render(report: Report) -> str:
    m, n = report.machine, report.tokens
    base, http = report.chat["baseline"], report.chat["http"]
    emb = report.embeddings_per_s
    median_chat = harness.median_chat
    rows: list[tuple[str, float, float, str]] = [
        (f"chat decode tok/s (batch 1, {n} tokens)",
         median_chat(base, "decode_tok_s"), median_chat(http, "decode_tok_s"), ".1f"),
        ("chat TTFT ms", 1000 * median_chat(base, "ttft_s"),
         1000 * median_chat(http, "ttft_s"), ".0f"),
        (f"chat request total ms ({n} tokens)", 1000 * median_chat(base, "total_s"),
         1000 * median_chat(http, "total_s"), ".0f"),
        (f"embeddings/s ({EMBED_BATCH} per request)",
         statistics.median(emb["direct"]), statistics.median(emb["http_32"]), ".1f"),
        (f"embeddings/s ({EMBED_TEXTS} per request)",
         statistics.median(emb["direct"]), statistics.median(emb["http_256"]), ".1f"),
    ]
    roof = report.roofline
    lines = [
        "# ember server overhead",
        "",
        f"{m.stamp} · torch {m.torch}, transformers {m.transformers} · {m.threads} threads · "
        f"{m.dtype} on {m.device} · median of {report.rounds} interleaved rounds",
        "",
        "| metric | baseline | ember HTTP | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {b:{fmt}} | {h:{fmt}} | {h / b:.2f} |" for name, b, h, fmt in rows),
        "",
        "Baseline: `model.generate` / `SentenceTransformer.encode` "
        f"(batch_size {EMBED_BATCH}) in-process. Ratio = ember HTTP ÷ baseline "
        "(higher is better for rates, lower for times).",
        "",
        f"Batch-1 decode roofline: {roof.bandwidth_bytes_s / 1e9:.1f} GB/s copy bandwidth ÷ "
        f"{roof.weight_bytes / 1e6:.1f} MB of weights = {roof.tok_s:.1f} tok/s; the baseline "
        f"reaches {median_chat(base, 'decode_tok_s') / roof.tok_s:.2f} of it, ember HTTP "
        f"{median_chat(http, 'decode_tok_s') / roof.tok_s:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def raw_numbers(report: Report) -> dict[str, Any]:
    data = harness.raw(report, medians={
        "chat": {
            name: {attr: harness.median_chat(samples, attr)
                   for attr in ("decode_tok_s", "ttft_s", "total_s")}
            for name, samples in report.chat.items()
        },
        "embeddings_per_s": {k: statistics.median(v) for k, v in report.embeddings_per_s.items()},
    })
    data["roofline"]["tok_s"] = report.roofline.tok_s
    return data


# -- main ----------------------------------------------------------------------------------


def tokens_and_rounds(quick: bool) -> tuple[int, int]:
    return (32, 2) if quick else (128, 5)


def measure(args: argparse.Namespace, progress: harness.Progress, scratch: Path) -> Report:
    tokens, rounds = tokens_and_rounds(args.quick)
    settings = load_settings(preload=[])
    registry = Registry.from_settings(settings)
    torch.set_num_threads(args.threads)
    # Server overhead over the same library: the chat model stays on transformers here
    # (`ember bench chat_backends` compares llama.cpp against it).
    with harness.serve(progress, scratch / "server.log", args.threads, env={
            "EMBER_MODELS": json.dumps([{"id": CHAT_MODEL, "backend": "transformers"}])},
    ) as server:
        client = server.client
        # Load the baselines while the server loads: load time is not measured.
        progress.step("loading the baseline models in-process")
        chat = harness.load_chat_baseline(settings, registry)
        embedder = harness.load_embedding_baseline(settings, registry)
        server.ready(progress)

        bandwidth = progress.run("memory bandwidth", harness.memory_bandwidth,
                                 lambda b: f"{b / 1e9:.1f} GB/s")
        report = Report(
            machine=harness.describe_machine(args.threads, chat.context.dtype,
                                             chat.context.device),
            tokens=tokens, rounds=rounds, roofline=Roofline(bandwidth, chat.memory_bytes()),
        )
        report.chat = harness.interleave(progress, rounds, "chat", harness.show_chat, {
            "baseline": lambda: baseline_chat(chat, tokens),
            "http": lambda: harness.http_chat(client, tokens),
        })
        texts = harness.make_sentences(EMBED_TEXTS)
        report.embeddings_per_s = harness.interleave(
            progress, rounds, "embeddings", lambda r: f"{r:.1f} sentences/s", {
                "direct": lambda: direct_embed(embedder, texts),
                "http_32": lambda: http_embed(client, texts, EMBED_BATCH),
                "http_256": lambda: http_embed(client, texts, EMBED_TEXTS),
            })
        return report


def step_count(args: argparse.Namespace) -> int:
    setup = 4  # start server, load baselines, wait for ready, bandwidth
    rounds = tokens_and_rounds(args.quick)[1]
    return setup + (rounds + 1) * (2 + 3)  # chat: 2 variants, embeddings: 3


def main(argv: list[str] | None = None) -> int:
    args = harness.Arguments("overhead", __doc__, quick="32 tokens, 2 rounds").parse(argv)
    transformers.utils.logging.disable_progress_bar()  # keep stderr to our progress lines
    return harness.run(args, "overhead", step_count, measure, render, raw_numbers)


if __name__ == "__main__":
    sys.exit(main())
