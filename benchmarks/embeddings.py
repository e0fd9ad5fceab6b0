"""Embeddings under concurrent load: ember's /v1/embeddings against the offline library call,
in one run, on the same texts.

    python -m benchmarks.embeddings [--quick] [--out DIR] [--threads N] [--rounds N]
                                    [--infinity-python PATH]

Each round runs, in turn: `SentenceTransformer.encode(batch_size=32)` in fp32 in this
process (the baseline); then 64 concurrent clients each sending one text per request to one
ember server that serves the packaged MiniLM three times, as its registry's default entry
(the backend `auto` picks), as an fp32 torch entry, and as an int8 ONNX entry admitted at a
lower cosine bar (to show what int8 would give); then, with --infinity-python (the python of
a venv with `infinity-emb[torch]`, which pins older transformers than ember's), the same load
against `infinity_emb v2` on the same checkpoint. The server is idle while the baseline runs.
Reported: texts/s medians, their ratios to the baseline, and the lowest cosine of each
server's vectors against the baseline's on all texts.

Prints a Markdown table to stdout (progress goes to stderr) and writes it to
OUT/embeddings.md, with the raw numbers in OUT/embeddings.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

from benchmarks import harness
from benchmarks.harness import EMBEDDING_MODEL
from benchmarks.loadgen import Connection
from engine.core.registry import Registry
from engine.core.settings import load_settings
from engine.core.sources import resolve_source

FP32_MODEL = f"{EMBEDDING_MODEL}-fp32"
# int8 ONNX admitted at a lower bar than the default's 0.99, to show what it would give.
INT8_MODEL = f"{EMBEDDING_MODEL}-int8"
INT8_MIN_COSINE = 0.95
CONCURRENCY = 64
BATCH = 32


@dataclass
class Report(harness.RoundsReport):
    texts: int
    concurrency: int
    backend: str  # what `auto` chose for the default entry, and why
    backend_note: str
    texts_per_s: dict[str, list[float]] = field(default_factory=dict)
    min_cosine: dict[str, float] = field(default_factory=dict)


def offline(model: SentenceTransformer, texts: list[str]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=BATCH, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - started), vectors


async def _concurrent(port: int, path: str, model: str, texts: list[str],
                      concurrency: int) -> tuple[float, np.ndarray]:
    """`concurrency` clients (the lean benchmarks/loadgen.py, so the client costs little of
    the shared CPU), each posting one text per request until all are sent. Vectors come back
    base64-encoded, as the openai client asks for them."""
    vectors: list[Any] = [None] * len(texts)
    pending = iter(range(len(texts)))

    async def worker() -> None:
        async with Connection("127.0.0.1", port) as connection:
            for index in pending:
                body = await connection.post_json(path, {
                    "model": model, "input": texts[index], "encoding_format": "base64"})
                vectors[index] = np.frombuffer(
                    base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(texts) / (time.perf_counter() - started), np.stack(vectors)


def concurrent(port: int, path: str, model: str, texts: list[str],
               concurrency: int) -> tuple[float, np.ndarray]:
    return asyncio.run(_concurrent(port, path, model, texts, concurrency))


def min_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    return float(((vectors * reference).sum(axis=1) / norms).min())


# -- infinity-emb, the specialist peer -----------------------------------------------------


def start_infinity(python: str, source: str, port: int, threads: int,
                   log: Path) -> subprocess.Popen[bytes]:
    """`infinity_emb v2` from its own venv (the script beside `python`), torch engine on the
    CPU, serving the checkpoint folder under ember's model name."""
    command = [str(Path(python).with_name("infinity_emb")), "v2", "--model-id", source,
               "--served-model-name", EMBEDDING_MODEL, "--port", str(port), "--engine",
               "torch", "--device", "cpu", "--batch-size", str(BATCH),
               "--no-bettertransformer", "--log-level", "warning"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                   "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT)


def wait_for_infinity(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + harness.READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"infinity_emb exited: {harness.log_tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"infinity_emb did not become ready: {harness.log_tail(log)}")


# -- report --------------------------------------------------------------------------------


def render(report: Report) -> str:
    m, rates = report.machine, report.texts_per_s
    base = statistics.median(rates["offline_fp32"])
    names = {
        "offline_fp32": "offline `encode(batch_size=32)`, fp32 (baseline)",
        "ember_default": f"ember, default entry ({report.backend})",
        "ember_fp32": "ember, fp32 torch entry",
        "ember_int8": f"ember, onnx-int8 entry (min_cosine {INT8_MIN_COSINE})",
        "infinity": "infinity-emb (torch)",
    }
    rows = [f"| {names[name]} | {statistics.median(values):.1f} | "
            f"{statistics.median(values) / base:.2f} | "
            f"{report.min_cosine.get(name, 1.0):.4f} |"
            for name, values in rates.items()]
    lines = [
        "# ember embeddings under concurrent load",
        "",
        f"{m.stamp} · {report.runtimes_line} · {m.threads} threads · median of "
        f"{report.rounds} interleaved rounds · {report.texts} texts, {report.concurrency} "
        "concurrent single-text requests",
        "",
        "| variant | texts/s | ratio to baseline | min cosine vs baseline |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"The default entry's backend: {report.backend} ({report.backend_note}).",
    ]
    if "infinity" in rates:
        ember = statistics.median(rates["ember_default"])
        lines.append(f"ember default ÷ infinity-emb: "
                     f"{ember / statistics.median(rates['infinity']):.2f}.")
    return "\n".join(lines) + "\n"


def raw_numbers(report: Report) -> dict[str, Any]:
    return harness.raw(report, medians={k: statistics.median(v)
                                        for k, v in report.texts_per_s.items()})


# -- main ----------------------------------------------------------------------------------


def texts_and_rounds(args: argparse.Namespace) -> tuple[int, int]:
    return (256, args.rounds) if args.quick else (1024, args.rounds)


def measure(args: argparse.Namespace, progress: harness.Progress, scratch: Path) -> Report:
    count, rounds = texts_and_rounds(args)
    settings = load_settings(preload=[])
    registry = Registry.from_settings(settings)
    default = registry.resolve(EMBEDDING_MODEL)
    torch.set_num_threads(args.threads)
    base_entry = default.model_dump(mode="json", exclude={"aliases", "default"})
    fp32_entry = {**base_entry, "id": FP32_MODEL,
                  "options": {**default.options, "backend": "torch"}}
    int8_entry = {**base_entry, "id": INT8_MODEL, "options": {
        **default.options, "backend": "onnx-int8", "min_cosine": INT8_MIN_COSINE}}
    texts = harness.make_sentences(count)
    infinity = None
    with harness.serve(progress, scratch / "server.log", args.threads,
                       preload=(EMBEDDING_MODEL, FP32_MODEL, INT8_MODEL),
                       env={"EMBER_MODELS": json.dumps([fp32_entry, int8_entry]),
                            "EMBER_TORCH_THREADS": str(args.server_threads or args.threads)},
                       ) as server:
        progress.step("loading the baseline model in-process")
        model = harness.load_embedding_baseline(settings, registry)
        server.ready(progress)
        status = server.client.get(f"/v1/models/{EMBEDDING_MODEL}").json()
        progress.note(f"default entry on {status['backend']}: {status['backend_note']}")
        int8 = server.client.get(f"/v1/models/{INT8_MODEL}").json()
        progress.note(f"int8 entry on {int8['backend']}: {int8['backend_note']}")
        variants: dict[str, Any] = {
            "offline_fp32": lambda: offline(model, texts),
            "ember_default": lambda: concurrent(server.port, "/v1/embeddings", EMBEDDING_MODEL,
                                                texts, CONCURRENCY),
            "ember_fp32": lambda: concurrent(server.port, "/v1/embeddings", FP32_MODEL, texts,
                                             CONCURRENCY),
            "ember_int8": lambda: concurrent(server.port, "/v1/embeddings", INT8_MODEL, texts,
                                             CONCURRENCY),
        }
        if args.infinity_python:
            port = harness.free_port()
            progress.step(f"starting infinity_emb on port {port}")
            infinity = start_infinity(args.infinity_python, resolve_source(default), port,
                                      args.threads, scratch / "infinity.log")
            wait_for_infinity(port, infinity, scratch / "infinity.log")
            variants["infinity"] = lambda: concurrent(port, "/embeddings", EMBEDDING_MODEL,
                                                      texts, CONCURRENCY)
        try:
            results = harness.interleave(progress, rounds, "embeddings",
                                         lambda r: f"{r[0]:.1f} texts/s", variants)
        finally:
            if infinity is not None:
                infinity.terminate()
                infinity.wait(30)
    reference = results["offline_fp32"][-1][1]
    return Report(
        machine=harness.describe_machine(args.threads, torch.float32, "cpu"),
        runtimes={"sentence-transformers": sentence_transformers.__version__,
                  "onnxruntime": onnxruntime.__version__},
        rounds=rounds, texts=count, concurrency=CONCURRENCY, backend=status["backend"],
        backend_note=status["backend_note"],
        texts_per_s={name: [rate for rate, _ in runs] for name, runs in results.items()},
        min_cosine={name: min_cosine(runs[-1][1], reference) for name, runs in results.items()
                    if name != "offline_fp32"},
    )


def step_count(args: argparse.Namespace) -> int:
    variants = 5 if args.infinity_python else 4
    setup = 3 + (1 if args.infinity_python else 0)  # server, baseline, ready (+ infinity)
    return setup + (texts_and_rounds(args)[1] + 1) * variants


def main(argv: list[str] | None = None) -> int:
    arguments = harness.Arguments("embeddings", __doc__, rounds=5,
                                  quick="256 texts, 1 round (unless --rounds)")
    arguments.add("--server-threads", type=int, default=None,
                  help="intra-op threads of the served models (default: --threads)")
    arguments.add("--infinity-python", default=None,
                  help="python of a venv with infinity-emb[torch]: adds it to the rounds")
    return harness.run(arguments.parse(argv), "embeddings", step_count, measure, render,
                       raw_numbers, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
