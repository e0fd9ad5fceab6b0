"""What the benchmarks share: their flags, progress lines, the `ember serve` they measure,
interleaved rounds, the machine they ran on, CPU taken by other work, and report files; then
the measuring pieces more than one benchmark uses (a streamed chat request and its baseline,
load levels of streaming clients, random diffusion pipelines built from configs).

A benchmark module keeps only what it measures and how it reports it. Its shape:

    def measure(args, progress, scratch) -> Report:
        with harness.serve(progress, scratch / "server.log", args.threads, MODELS) as server:
            progress.step("loading the baseline models in-process")
            baseline = load()  # while the server loads: load time is not measured
            server.ready(progress)
            report = Report(harness.describe_machine(...), ...)
            report.runs = harness.interleave(progress, args.rounds, "task", show, {
                "baseline": lambda: call(baseline), "http": lambda: send(server.client)})
            return report

    def main(argv=None) -> int:
        args = harness.Arguments("name", __doc__, rounds=3).parse(argv)
        return harness.run(args, "name", step_count, measure, render, raw_numbers)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import httpx
import torch
import transformers
import yaml

from benchmarks.loadgen import Connection, HTTPError
from engine.contracts.base import LoadContext
from engine.core.devices import resolve_device, resolve_dtype
from engine.core.registry import Registry
from engine.core.settings import Settings
from engine.core.sources import resolve_source
from models.chat import TransformersChat

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
CHAT_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
READY_TIMEOUT_S = 180.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Where the random diffusion pipelines are built once (`--models`).
DEFAULT_MODELS = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                  / "ember" / "bench")
THREADS_HELP = "torch threads for the baseline and the server (default: all cores)"

T = TypeVar("T")
R = TypeVar("R")


# -- flags ---------------------------------------------------------------------------------


class Arguments:
    """A benchmark's flags: `--quick`, `--out` and `--threads` (default all cores), with
    `rounds` also `--rounds` (default `rounds`, 1 with --quick), and its own through `add`."""

    def __init__(self, name: str, doc: str | None, *, quick: str = "1 round (unless --rounds)",
                 rounds: int | None = None, threads: str | None = THREADS_HELP,
                 models: bool = False):
        self.rounds = rounds
        self.parser = argparse.ArgumentParser(
            prog=f"python -m benchmarks.{name}", description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add = self.parser.add_argument
        self.add("--quick", action="store_true", help=quick)
        if rounds is not None:
            self.add("--rounds", type=int, help=f"interleaved rounds (default {rounds})")
        self.add("--out", type=Path, default=DEFAULT_OUT, help="report folder")
        if models:
            self.add("--models", type=Path, default=DEFAULT_MODELS,
                     help=f"where the random pipeline is built once (default {DEFAULT_MODELS})")
        if threads is not None:
            self.add("--threads", type=int, default=os.cpu_count() or 1, help=threads)

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        args = self.parser.parse_args(argv)
        if self.rounds is not None:
            args.rounds = args.rounds or (1 if args.quick else self.rounds)
        return args


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

    @staticmethod
    def note(what: str) -> None:
        """An indented line under the last step: what it found."""
        print(f"        {what}", file=sys.stderr, flush=True)

    def run(self, what: str, fn: Callable[[], T], show: Callable[[T], str]) -> T:
        self.step(what + " ...")
        result = fn()
        self.note(show(result))
        return result


# -- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    port: int, threads: int, log_file: IO[bytes],
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


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Server:
    """A started `ember serve` and an httpx client on it."""

    process: subprocess.Popen[bytes]
    client: httpx.Client
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def ready(self, progress: Progress | None = None, what: str = "the server's /ready"
              ) -> float:
        """Seconds until it answers /ready (a progress step `waiting for WHAT` with one)."""
        if progress is None:
            return wait_until_ready(self.client, self.process, self.log)
        progress.step(f"waiting for {what}")
        ready_s = wait_until_ready(self.client, self.process, self.log)
        progress.note(f"ready after {ready_s:.1f} s")
        return ready_s


@contextlib.contextmanager
def serve(
    progress: Progress, log: Path, threads: int,
    preload: Sequence[str] = (CHAT_MODEL, EMBEDDING_MODEL), env: dict[str, str] | None = None,
    timeout: float = 300, name: str = "the server",
) -> Iterator[Server]:
    """`ember serve` started (a progress step), its output in `log`, an httpx client with
    `timeout` on it; stopped on leaving. Not waited for: load the baseline meanwhile, then
    `ready()`."""
    port = free_port()
    progress.step(f"starting {name} on port {port} (log: {log})")
    with log.open("wb") as log_file:
        process = start_server(port, threads, log_file, preload, env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as client:
                yield Server(process, client, port, log)
        finally:
            stop_server(process)


def write_registry(path: Path, entry: dict[str, Any]) -> Path:
    """A registry file of one entry, for EMBER_REGISTRY_FILE."""
    path.write_text(yaml.safe_dump({"models": [entry]}, sort_keys=False))
    return path


# -- rounds --------------------------------------------------------------------------------


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


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else float("nan")


def median_of(items: Iterable[T], value: Callable[[T], float]) -> float:
    return float(statistics.median(value(item) for item in items))


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank q-quantile (0 <= q <= 1); 0.0 of nothing."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


# -- the machine ---------------------------------------------------------------------------


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

    @property
    def stamp(self) -> str:
        """The start of a report's header line: when, which code, which CPU."""
        return f"{self.date} · ember {self.ember_commit} · {self.cpu}, {self.cores} cores"


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


class CpuWatch:
    """How much of the machine's CPU time processes other than this one and the servers used
    between `__init__` and `other_share` (Linux /proc; None elsewhere). A benchmark sharing its
    cores with other work measures that work too. `pids`: servers already running, whose CPU
    counts from now on; a server started later counts whole."""

    def __init__(self, pids: Sequence[int] = ()):
        self.started = time.perf_counter()
        self.busy = self._busy_s()
        self.own = self._own_s()
        self.servers = {pid: self.process_s(pid) for pid in pids}

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

    def other_share(self, *server_pids: int) -> float | None:
        """Call before the servers stop."""
        busy = self._busy_s()
        now = [self.process_s(pid) for pid in server_pids]
        before = [self.servers.get(pid, 0.0) for pid in server_pids]
        if busy is None or self.busy is None or None in now or None in before:
            return None
        servers = sum(n - b for n, b in zip(now, before, strict=True)
                      if n is not None and b is not None)
        other = (busy - self.busy) - (self._own_s() - self.own) - servers
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


# -- reports -------------------------------------------------------------------------------


def write_report(out: Path, name: str, table: str, raw: dict[str, Any]) -> None:
    """Print the Markdown table and keep it, with the raw numbers, as OUT/NAME.md/.json."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    print(f"wrote {out / f'{name}.md'} and {out / f'{name}.json'}", file=sys.stderr)


def run(args: argparse.Namespace, name: str, steps: Callable[[argparse.Namespace], int],
        measure: Callable[[argparse.Namespace, Progress, Path], R], render: Callable[[R], str],
        raw_numbers: Callable[[R], dict[str, Any]], *, quiet: bool = False,
        then: Callable[[R], object] | None = None) -> int:
    """A benchmark's run: `measure(args, progress, scratch)` with a Progress of `steps(args)`
    steps and a scratch folder removed afterwards (server logs, registry files, data
    folders), then the report written as OUT/NAME.md and OUT/NAME.json (`then(report)` after
    that). `quiet`: keep transformers' and diffusers' progress bars and warnings off stderr.
    The exit status."""
    if quiet:
        quiet_libraries()
    progress = Progress(steps(args))
    with tempfile.TemporaryDirectory(prefix=f"ember-bench-{name}-") as folder:
        report = measure(args, progress, Path(folder))
    write_report(args.out, name, render(report), raw_numbers(report))
    if then is not None:
        then(report)
    return 0


@dataclass
class RoundsReport:
    """What a report of interleaved rounds starts with; each benchmark adds its results."""

    machine: Machine
    runtimes: dict[str, str]  # library -> version, for the header
    rounds: int

    @property
    def runtimes_line(self) -> str:
        return ", ".join(f"{name} {version}" for name, version in self.runtimes.items())


@dataclass
class PipelineReport(RoundsReport):
    """A RoundsReport on a diffusion pipeline: its parameter counts, and the CPU time other
    processes used during the run, as a share of all cores' time."""

    parameters: dict[str, int]
    other_cpu: float | None = None

    @property
    def header(self) -> str:
        m = self.machine
        return (f"{m.stamp} · torch {m.torch}, {self.runtimes_line} · {m.threads} threads · "
                f"{m.dtype} on {m.device} · median of {self.rounds} interleaved rounds"
                f"{contention_note(self.other_cpu)}")

    @property
    def parameters_line(self) -> str:
        return ", ".join(f"{name} {count / 1e6:.1f} M" for name, count in self.parameters.items())


def raw(report: Any, **extra: Any) -> dict[str, Any]:
    """A report dataclass as a JSON-ready dict, with `extra` keys (medians, settings) after
    its fields."""
    return {**asdict(report), **extra}


# -- chat, batch 1 -------------------------------------------------------------------------


@dataclass
class ChatSample:
    ttft_s: float
    decode_tok_s: float
    total_s: float
    tokens: int


def chat_sample(
    started: float, token_times: list[float], finished: float, tokens: int
) -> ChatSample:
    """Decode tok/s is (N - 1) / (last token time - first token time), so prefill is left
    out of it; TTFT and total carry it."""
    if len(token_times) < 2:
        raise RuntimeError(f"need at least 2 timed tokens, got {len(token_times)}")
    return ChatSample(
        ttft_s=token_times[0] - started,
        decode_tok_s=(tokens - 1) / (token_times[-1] - token_times[0]),
        total_s=finished - started,
        tokens=tokens,
    )


def median_chat(samples: list[ChatSample], attribute: str) -> float:
    return statistics.median(getattr(sample, attribute) for sample in samples)


def show_chat(sample: ChatSample) -> str:
    return (f"{sample.decode_tok_s:.1f} tok/s, TTFT {sample.ttft_s * 1000:.0f} ms, "
            f"total {sample.total_s:.2f} s")


def http_chat(client: httpx.Client, tokens: int) -> ChatSample:
    """CHAT_PROMPT streamed through /v1/chat/completions, greedy, exactly `tokens` tokens,
    timed at each SSE chunk."""
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
    from sentence_transformers import SentenceTransformer

    device = resolve_device(settings.device)
    return SentenceTransformer(
        resolve_source(registry.resolve(EMBEDDING_MODEL)), device=device,
        model_kwargs={"dtype": resolve_dtype(settings.dtype, device)}, local_files_only=True,
    ).eval()


# -- load levels: C streaming clients ------------------------------------------------------


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
        return percentile((v for t in timings if (v := getattr(t, attribute)) == v), q)

    @property
    def itl_p50_s(self) -> float:
        gaps = [g for t in self.timings for g in t.gaps_s]
        return statistics.median(gaps) if gaps else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Per-stream decode rate (prefill excluded), median over requests."""
        rates = [(t.tokens - 1) / sum(t.gaps_s) for t in self.timings if sum(t.gaps_s) > 0]
        return statistics.median(rates) if rates else 0.0


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


async def level_async(port: int, concurrency: int, seconds: float, tokens: int,
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


def run_level(port: int, concurrency: int, seconds: float, tokens: int,
              warmup_s: float = 0.0, extra: dict[str, Any] | None = None) -> Level:
    """`level_async` on its own event loop."""
    return asyncio.run(level_async(port, concurrency, seconds, tokens, warmup_s, extra))


# -- random diffusion pipelines ------------------------------------------------------------
# No diffusion weights are installed offline: the image and video benchmarks build
# pipelines of the real shapes with random, seeded weights from configs, once.

# What the image and video pipelines' shapes share (each adds its "unet_channels"); a shape
# names its cache folder, so changing it rebuilds them.
PIPELINE_SHAPE: dict[str, Any] = {
    "unet_layers": 2,
    "text_hidden": 64,
    "text_layers": 2,
    "vae_channels": [32, 64, 64, 64],
}


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


def build_random_pipeline(folder: Path, shape: dict[str, Any], side: int, unet_class: Any,
                          blocks: str, assemble: Callable[..., Any]) -> Path:
    """A pipeline with random weights (seeded, so the same shape gives the same weights):
    a byte-level CLIP tokenizer and text encoder, an SD-style VAE and a `unet_class` UNet
    for `side`-pixel frames (`blocks` "2D" or "3D"), given to `assemble` as keyword
    arguments; saved with `save_pretrained` so it loads through `from_pretrained` as a real
    checkpoint does. Returns the pipeline folder."""
    tokenizer = write_byte_clip_tokenizer(folder / "clip-tokenizer")
    torch.manual_seed(0)
    text_encoder = random_clip_text_encoder(tokenizer, shape["text_hidden"], shape["text_layers"])
    vae = random_sd_vae(shape["vae_channels"])
    levels = len(shape["unet_channels"])
    unet = unet_class(
        sample_size=side // 8, in_channels=4, out_channels=4,
        layers_per_block=shape["unet_layers"], block_out_channels=tuple(shape["unet_channels"]),
        norm_num_groups=32, cross_attention_dim=shape["text_hidden"], attention_head_dim=8,
        down_block_types=(f"CrossAttnDownBlock{blocks}",) * (levels - 1)
        + (f"DownBlock{blocks}",),
        up_block_types=(f"UpBlock{blocks}",) + (f"CrossAttnUpBlock{blocks}",) * (levels - 1),
    )
    pipeline = assemble(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def cached_build(models_dir: Path, name: str, build: Callable[[Path], Any]) -> Path:
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


@contextlib.contextmanager
def serve_pipeline(
    progress: Progress, args: argparse.Namespace, scratch: Path, name: str,
    shape: dict[str, Any], build: Callable[[Path], Any], entry: Callable[[Path], dict[str, Any]],
    loader: str, timeout: float,
) -> Iterator[tuple[Server, Any]]:
    """The random pipeline `build` makes, built once into `args.models` (a step), served
    alone from a registry of its `entry` with a data folder of its own, and loaded in this
    process with `diffusers.<loader>` as the baseline while the server loads (steps: start,
    load, ready). Yields the ready server and the baseline pipeline."""
    source = progress.run(
        f"building the random pipeline (once) in {args.models}",
        lambda: cached_build(args.models, shape_tag(name, shape), build), str)
    served = entry(source)
    registry = write_registry(scratch / "models.yaml", served)
    with serve(progress, scratch / "server.log", args.threads, preload=[served["id"]],
               env={"EMBER_REGISTRY_FILE": str(registry),
                    "EMBER_DATA_DIR": str(scratch / "data")}, timeout=timeout) as server:
        # Load the baseline while the server loads: load time is not measured.
        progress.step("loading the baseline pipeline in-process")
        pipeline = load_pipeline(source, loader)
        server.ready(progress)
        yield server, pipeline


def load_pipeline(source: Path, loader: str) -> Any:
    """The pipeline as the adapter loads it: `diffusers.<loader>.from_pretrained`, float32
    on the CPU, no progress bar."""
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `torch_dtype`, as the adapter passes
        pipeline = getattr(diffusers, loader).from_pretrained(
            source, torch_dtype=torch.float32, local_files_only=True
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def parameter_counts(pipeline: Any) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in pipeline.components.items()
            if isinstance(module, torch.nn.Module)}


def quiet_libraries() -> None:
    """Keep stderr to the progress lines."""
    import diffusers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
