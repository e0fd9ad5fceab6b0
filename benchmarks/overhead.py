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
import contextlib
import datetime as dt
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch
import transformers
from sentence_transformers import SentenceTransformer
from transformers.generation.streamers import BaseStreamer

from engine.contracts.base import LoadContext
from engine.core.devices import resolve_device, resolve_dtype
from engine.core.registry import Registry
from engine.core.settings import Settings, load_settings
from engine.core.sources import resolve_source
from models.chat import TransformersChat

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
CHAT_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
EMBED_TEXTS = 256
EMBED_BATCH = 32
READY_TIMEOUT_S = 180.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


# -- results -------------------------------------------------------------------------------


@dataclass
class ChatSample:
    ttft_s: float
    decode_tok_s: float
    total_s: float
    tokens: int


@dataclass
class Roofline:
    bandwidth_bytes_s: float
    weight_bytes: int

    @property
    def tok_s(self) -> float:
        return self.bandwidth_bytes_s / self.weight_bytes


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    torch: str
    transformers: str
    python: str
    ember_commit: str
    dtype: str
    device: str
    date: str


@dataclass
class Report:
    machine: Machine
    tokens: int
    rounds: int
    roofline: Roofline
    chat: dict[str, list[ChatSample]] = field(default_factory=dict)
    embeddings_per_s: dict[str, list[float]] = field(default_factory=dict)


# -- progress ------------------------------------------------------------------------------


class Progress:
    """`[i/n] what` lines on stderr, so a long run shows where it is without mixing into the
    table on stdout."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {what}", file=sys.stderr, flush=True)

    def run(self, what: str, fn: Callable[[], T], show: Callable[[T], str]) -> T:
        self.step(what + " ...")
        result = fn()
        print(f"        {show(result)}", file=sys.stderr, flush=True)
        return result


# -- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    port: int, threads: int, log_file: Any,
    preload: Sequence[str] = (CHAT_MODEL, EMBEDDING_MODEL), env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`ember serve` in a subprocess loading `preload` at start; `env` is added to this
    process's environment (e.g. EMBER_REGISTRY_FILE, EMBER_DATA_DIR)."""
    command = [
        sys.executable, "-m", "ember.cli", "serve", "--port", str(port),
        "--preload", ",".join(preload),
    ]
    environment = {**os.environ, "EMBER_TORCH_THREADS": str(threads), **(env or {})}
    return subprocess.Popen(command, env=environment, stdout=log_file, stderr=subprocess.STDOUT)


def wait_until_ready(client: httpx.Client, server: subprocess.Popen[bytes], log: Path) -> float:
    """Seconds until /ready answers 200; fails early, with the server's log, if it exits."""
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.TransportError):
            if client.get("/ready", timeout=5).status_code == 200:
                return time.perf_counter() - started
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f}s:\n{log_tail(log)}")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def write_report(out: Path, name: str, table: str, raw: dict[str, Any]) -> None:
    """Print the Markdown table and keep it, with the raw numbers, as OUT/NAME.md/.json."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"wrote {out / f'{name}.md'} and {out / f'{name}.json'}", file=sys.stderr)


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# -- chat ----------------------------------------------------------------------------------


def chat_sample(
    started: float, token_times: list[float], finished: float, tokens: int
) -> ChatSample:
    if len(token_times) < 2:
        raise RuntimeError(f"need at least 2 timed tokens, got {len(token_times)}")
    return ChatSample(
        ttft_s=token_times[0] - started,
        decode_tok_s=(tokens - 1) / (token_times[-1] - token_times[0]),
        total_s=finished - started,
        tokens=tokens,
    )


class TimingStreamer(BaseStreamer):
    """Timestamps each `put`: generate() puts the prompt first, then one call per token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_chat_baseline(settings: Settings, registry: Registry) -> TransformersChat:
    """The adapter's own load, so the baseline runs the same de-quantized checkpoint in the
    same dtype as the server; only its decode loop is bypassed."""
    device = resolve_device(settings.device)
    context = LoadContext(
        device=device, dtype=resolve_dtype(settings.dtype, device),
        models_dir=settings.models_dir,
    )
    adapter = TransformersChat(registry.resolve(CHAT_MODEL), context)
    adapter.load()
    return adapter


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
    return chat_sample(started, token_times, finished, tokens)


def http_chat(client: httpx.Client, tokens: int) -> ChatSample:
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,  # ember extension: exactly max_tokens tokens
        "stream": True,
        "stream_options": {"include_usage": True},  # to check the token count
    }
    token_times: list[float] = []
    completion_tokens = None
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for frame in sse_frames(response.iter_lines()):
            if "error" in frame:
                raise RuntimeError(f"stream failed: {frame['error']}")
            if frame.get("usage"):
                completion_tokens = frame["usage"]["completion_tokens"]
            for choice in frame.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    token_times.append(time.perf_counter())
    finished = time.perf_counter()
    if completion_tokens != tokens:
        raise RuntimeError(f"server generated {completion_tokens} tokens, expected {tokens}")
    return chat_sample(started, token_times, finished, tokens)


def sse_frames(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def show_chat(sample: ChatSample) -> str:
    return (f"{sample.decode_tok_s:.1f} tok/s, TTFT {sample.ttft_s * 1000:.0f} ms, "
            f"total {sample.total_s:.2f} s")


# -- embeddings ----------------------------------------------------------------------------


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """Deterministic, varied English sentences of 8-30 words."""
    rng = random.Random(seed)
    subjects = ["the old fisherman", "a curious child", "our new neighbour", "the city council",
                "a tired nurse", "the research team", "my grandmother", "a stray dog",
                "the young engineer", "every student", "the night train", "a quiet librarian"]
    verbs = ["carefully repaired", "quickly forgot", "proudly presented", "slowly painted",
             "secretly admired", "loudly criticised", "patiently explained", "finally found",
             "happily shared", "nervously tested", "barely noticed", "gently returned"]
    objects = ["the broken bicycle", "a strange letter", "the annual budget", "an ancient map",
               "the garden fence", "a new recipe", "the missing keys", "a forgotten song",
               "the weather report", "a wooden boat", "the final exam", "a tiny robot"]
    tails = ["before the storm arrived", "near the harbour at dawn", "during the long winter",
             "while everyone else was asleep", "after a difficult week at work",
             "in front of the whole village", "despite the heavy rain",
             "on the first day of spring", "without telling anyone about it",
             "because nobody else would", "with a cup of strong coffee", "at the edge of town"]
    joins = ["and then", "but later", "so", "while", "because", "although"]

    def clause() -> list[str]:
        parts = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
        if rng.random() < 0.7:
            parts.append(rng.choice(tails))
        return " ".join(parts).split()

    sentences = []
    for _ in range(count):
        target = rng.randint(8, 30)
        words = clause()
        while len(words) < target:
            words += [*rng.choice(joins).split(), *clause()]
        words = words[:target]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def load_embedding_baseline(settings: Settings, registry: Registry) -> SentenceTransformer:
    device = resolve_device(settings.device)
    return SentenceTransformer(
        resolve_source(registry.resolve(EMBEDDING_MODEL)), device=device,
        model_kwargs={"dtype": resolve_dtype(settings.dtype, device)}, local_files_only=True,
    ).eval()


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


# -- roofline ------------------------------------------------------------------------------


def memory_bandwidth(mib: int = 256, repeats: int = 8) -> float:
    """Bytes/s of a big tensor copy (read + write), best of several: what batch-1 decode,
    which streams every weight once per token, can at best get."""
    source = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch pays page faults, not bandwidth
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / best


# -- report --------------------------------------------------------------------------------


def describe_machine(threads: int, dtype: torch.dtype, device: str) -> Machine:
    return Machine(
        cpu=cpu_model(), cores=os.cpu_count() or 0, threads=threads,
        torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), ember_commit=ember_commit(),
        dtype=str(dtype).removeprefix("torch."), device=device,
        date=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    )


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ember_commit() -> str:
    """HEAD, marked `+dirty` when the tree has changes, so a result names the code it measured."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()

    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_chat(samples: list[ChatSample], attribute: str) -> float:
    return statistics.median(getattr(sample, attribute) for sample in samples)


def render(report: Report) -> str:
    m, n = report.machine, report.tokens
    base, http = report.chat["baseline"], report.chat["http"]
    emb = report.embeddings_per_s
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
        f"{m.date} · ember {m.ember_commit} · {m.cpu}, {m.cores} cores · torch {m.torch}, "
        f"transformers {m.transformers} · {m.threads} threads · {m.dtype} on {m.device} · "
        f"median of {report.rounds} interleaved rounds",
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
    data = asdict(report)
    data["roofline"]["tok_s"] = report.roofline.tok_s
    data["medians"] = {
        "chat": {
            name: {attr: median_chat(samples, attr) for attr in ("decode_tok_s", "ttft_s",
                                                                   "total_s")}
            for name, samples in report.chat.items()
        },
        "embeddings_per_s": {k: statistics.median(v) for k, v in report.embeddings_per_s.items()},
    }
    return data


# -- main ----------------------------------------------------------------------------------


def tokens_and_rounds(quick: bool) -> tuple[int, int]:
    return (32, 2) if quick else (128, 5)


def measure(args: argparse.Namespace, progress: Progress, log: Path, log_file: Any) -> Report:
    tokens, rounds = tokens_and_rounds(args.quick)
    settings = load_settings(preload=[])
    registry = Registry.from_settings(settings)
    torch.set_num_threads(args.threads)
    port = free_port()
    progress.step(f"starting the server on port {port} (log: {log})")
    # Server overhead over the same library: the chat model stays on transformers here
    # (`ember bench chat_backends` compares llama.cpp against it).
    server = start_server(port, args.threads, log_file, env={
        "EMBER_MODELS": json.dumps([{"id": CHAT_MODEL, "backend": "transformers"}])})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            # Load the baselines while the server loads: load time is not measured.
            progress.step("loading the baseline models in-process")
            chat = load_chat_baseline(settings, registry)
            embedder = load_embedding_baseline(settings, registry)
            progress.step("waiting for the server's /ready")
            ready_s = wait_until_ready(client, server, log)
            print(f"        ready after {ready_s:.1f} s", file=sys.stderr, flush=True)

            bandwidth = progress.run("memory bandwidth", memory_bandwidth,
                                     lambda b: f"{b / 1e9:.1f} GB/s")
            report = Report(
                machine=describe_machine(args.threads, chat.context.dtype, chat.context.device),
                tokens=tokens, rounds=rounds,
                roofline=Roofline(bandwidth, chat.memory_bytes()),
            )
            report.chat = interleave(progress, rounds, "chat", show_chat, {
                "baseline": lambda: baseline_chat(chat, tokens),
                "http": lambda: http_chat(client, tokens),
            })
            texts = make_sentences(EMBED_TEXTS)
            report.embeddings_per_s = interleave(progress, rounds, "embeddings",
                                                 lambda r: f"{r:.1f} sentences/s", {
                "direct": lambda: direct_embed(embedder, texts),
                "http_32": lambda: http_embed(client, texts, EMBED_BATCH),
                "http_256": lambda: http_embed(client, texts, EMBED_TEXTS),
            })
            return report
    finally:
        stop_server(server)


def interleave(
    progress: Progress, rounds: int, task: str, show: Callable[[T], str],
    variants: dict[str, Callable[[], T]],
) -> dict[str, list[T]]:
    """One uncounted warm-up of each variant, then `rounds` rounds running each variant once
    in turn, so the machine's slow and fast spells are shared between them."""
    results: dict[str, list[T]] = {name: [] for name in variants}
    for round_index in range(-1, rounds):
        label = "warm-up" if round_index < 0 else f"round {round_index + 1}"
        for name, variant in variants.items():
            result = progress.run(f"{task} {label}: {name}", variant, show)
            if round_index >= 0:
                results[name].append(result)
    return results


def step_count(rounds: int) -> int:
    setup = 4  # start server, load baselines, wait for ready, bandwidth
    return setup + (rounds + 1) * (2 + 3)  # chat: 2 variants, embeddings: 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 tokens, 2 rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for the baseline and the server (default: all cores)")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # keep stderr to our progress lines

    progress = Progress(step_count(tokens_and_rounds(args.quick)[1]))
    with tempfile.NamedTemporaryFile("w+b", prefix="ember-bench-server-", suffix=".log",
                                     delete=False) as log_file:
        log = Path(log_file.name)
        report = measure(args, progress, log, log_file)
    log.unlink(missing_ok=True)

    write_report(args.out, "overhead", render(report), raw_numbers(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
