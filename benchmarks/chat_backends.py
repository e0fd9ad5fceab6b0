"""Chat backends: ember on llama.cpp against raw llama-cpp-python and against ember on
transformers, on the same GGUF file, in one run.

    python -m benchmarks.chat_backends [--quick] [--out DIR] [--threads N]
    ember bench chat_backends [--quick]

Three sides, interleaved round by round (raw, ember llama.cpp, ember transformers, raw, ...),
one at a time, so no two of them ever compute at once and slow spells of a shared machine hit
all three alike:

1. raw llama.cpp: `llama_cpp.Llama(model_path=GGUF, n_ctx=2048, n_threads=T,
   n_threads_batch=T)` in this process, `Llama.generate` greedy over the prompt rendered by
   the GGUF's own chat template, each token detokenized as it comes;
2. ember on llama.cpp: a `ember serve` process whose config forces `backend: llama.cpp` for
   the registry entry, a chat completion streamed over HTTP;
3. ember on transformers: a second `ember serve` process forcing `backend: transformers` for
   the same entry (the GGUF de-quantized into the model cache).

Each request is batch 1, greedy (temperature 0), `ignore_eos`, 128 tokens. Decode tok/s is
(N - 1) / (last token time - first token time) on every side (token yields, or SSE chunk
arrivals), so prefill is left out of it; TTFT and request time carry it. Both servers run
with `llama_threads` = `torch_threads` = T, the raw side with T threads. One greedy reply of
ember llama.cpp is then checked against raw llama.cpp's (prompt tokens and text).

Then raw llama.cpp's own decode steps of 1 and of 16 tokens (`Llama.eval`), interleaved: how
much a 16-sequence step gains over a 1-sequence one on this build and CPU, the ceiling of the
next part. Last, on the llama.cpp server alone: 1 and 16 streaming clients
(benchmarks/harness.py's run_level: back-to-back requests, lengths spread over 0.5-1.5x the
mean, 48-144 tokens), alternating 1, 16, 1, 16 for a fixed window per level (30 s) after a
warm-up (15 s) over which the clients start one by one and which does not count: the window
measures 16 clients in steady state, where a new prompt joins 15 decoding streams, not 16
first prompts landing in the same instant; aggregate output tok/s and TTFT p50.

Goals (medians over rounds): ember llama.cpp ÷ raw llama.cpp decode tok/s ≥ 0.9; ember
llama.cpp ÷ ember transformers ≥ 2.5; 16 clients ÷ 1 client aggregate tok/s ≥ 6; TTFT p50
at 16 ÷ at 1 ≤ 3.

Prints a Markdown table to stdout (progress goes to stderr) and writes it to
OUT/chat_backends.md, with the raw numbers in OUT/chat_backends.json (OUT/chat_backends_tN.*
when --threads N is not every core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks import harness
from benchmarks.harness import (
    CHAT_MODEL,
    CHAT_PROMPT,
    ChatSample,
    Level,
    Machine,
    median_chat,
    ratio,
)
from engine.core.backends import choose_backend, gguf_path
from engine.core.devices import resolve_device, resolve_dtype
from engine.core.registry import Registry
from engine.core.settings import load_settings

RAW, EMBER_LLAMA, EMBER_TRANSFORMERS = "raw llama.cpp", "ember llama.cpp", "ember transformers"
SIDES = (RAW, EMBER_LLAMA, EMBER_TRANSFORMERS)
BACKEND_OF = {EMBER_LLAMA: "llama.cpp", EMBER_TRANSFORMERS: "transformers"}
TOKENS = 128
N_CTX = 2048
LOAD_CLIENTS = 16
LOAD_MEAN_TOKENS = 96  # sweep's lengths: 0.5-1.5x the mean, so 48-144 tokens
# Clients start one by one over this before a level's window opens (about one request's
# length at 16 clients), so the window sees steady arrivals.
LOAD_WARMUP_S = 15.0
EVAL_STEPS = 16
LEVEL_PAUSE_S = 1.0  # lets the server finish cancelling a level's cut-off streams


# -- results -------------------------------------------------------------------------------


@dataclass
class ChatBackendsReport:
    machine: Machine
    llama_cpp: str
    gguf: str
    tokens: int
    rounds: int
    seconds_per_level: float
    warmup_s: float = 0.0
    served: dict[str, dict[str, Any]] = field(default_factory=dict)  # side -> /v1/models
    chat: dict[str, list[ChatSample]] = field(default_factory=dict)
    levels: list[Level] = field(default_factory=list)  # in the order they ran
    other_cpu_share: float | None = None
    same_output: SameOutput | None = None
    # Raw llama.cpp's own tok/s with LOAD_CLIENTS tokens per decode step against 1: the most
    # LOAD_CLIENTS streams can gain over one on this build and CPU, whoever schedules them.
    eval_tok_s: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    prompt_tokens: int
    text: str


@dataclass(frozen=True)
class SameOutput:
    """ember llama.cpp's greedy completion against raw llama.cpp's, same request."""

    raw_prompt_tokens: int
    ember_prompt_tokens: int
    first_difference: int | None  # a character index; None: the same text
    chars: int


@dataclass(frozen=True)
class Goal:
    what: str
    measured: float
    baseline: float
    goal: float
    unit: str
    fmt: str = ".1f"
    lower_is_better: bool = False

    @property
    def ratio(self) -> float:
        return ratio(self.measured, self.baseline)

    @property
    def met(self) -> bool:
        return self.ratio <= self.goal if self.lower_is_better else self.ratio >= self.goal

    def row(self) -> str:
        sign = "≤" if self.lower_is_better else "≥"
        return (f"| {self.what} | {self.measured:{self.fmt}} {self.unit} | "
                f"{self.baseline:{self.fmt}} {self.unit} | {self.ratio:.2f} | "
                f"{sign} {self.goal:g} | {'pass' if self.met else '**FAIL**'} |")


# -- pure report parts ---------------------------------------------------------------------


def round_ratios(chat: dict[str, list[ChatSample]], side: str, baseline: str) -> list[float]:
    """Decode tok/s of `side` ÷ `baseline`, round by round (they ran next to each other)."""
    return [ratio(a.decode_tok_s, b.decode_tok_s)
            for a, b in zip(chat[side], chat[baseline], strict=True)]


def level_medians(levels: list[Level], clients: int) -> tuple[float, float]:
    """(aggregate output tok/s, TTFT p50 s) at `clients`: medians over every run of it."""
    runs = [level for level in levels if level.concurrency == clients]
    if not runs:
        raise ValueError(f"no level with {clients} clients")
    return (statistics.median(level.tok_s for level in runs),
            statistics.median(level.percentile("ttft_s", 0.5) for level in runs))


def goals(report: ChatBackendsReport) -> list[Goal]:
    n = report.tokens
    decode = {side: median_chat(samples, "decode_tok_s") for side, samples in report.chat.items()}
    rows = [
        Goal(f"decode, batch 1, {n} tokens: ember llama.cpp ÷ raw llama.cpp",
             decode[EMBER_LLAMA], decode[RAW], 0.9, "tok/s"),
        Goal(f"decode, batch 1, {n} tokens: ember llama.cpp ÷ ember transformers",
             decode[EMBER_LLAMA], decode[EMBER_TRANSFORMERS], 2.5, "tok/s"),
    ]
    if report.levels:
        one_tok_s, one_ttft_s = level_medians(report.levels, 1)
        many_tok_s, many_ttft_s = level_medians(report.levels, LOAD_CLIENTS)
        rows += [
            Goal(f"ember llama.cpp aggregate output: {LOAD_CLIENTS} clients ÷ 1 client",
                 many_tok_s, one_tok_s, 6.0, "tok/s"),
            Goal(f"ember llama.cpp TTFT p50: {LOAD_CLIENTS} clients ÷ 1 client",
                 1000 * many_ttft_s, 1000 * one_ttft_s, 3.0, "ms", ".0f", lower_is_better=True),
        ]
    return rows


def side_row(side: str, samples: list[ChatSample], served: dict[str, Any] | None) -> str:
    runs = ", ".join(f"{s.decode_tok_s:.1f}" for s in samples)
    how = f"{served.get('backend')}, {served.get('dtype')}" if served else "in-process"
    return (f"| {side} ({how}) | {median_chat(samples, 'decode_tok_s'):.1f} | "
            f"{1000 * median_chat(samples, 'ttft_s'):.0f} | "
            f"{1000 * median_chat(samples, 'total_s'):.0f} | {runs} |")


def level_row(index: int, level: Level) -> str:
    return (f"| {index} | {level.concurrency} | {level.tok_s:.1f} | "
            f"{1000 * level.percentile('ttft_s', 0.5):.0f} | {1000 * level.itl_p50_s:.0f} | "
            f"{level.percentile('latency_s', 0.5):.2f} | {len(level.timings)} | "
            f"{level.errors} |")


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


def render(report: ChatBackendsReport) -> str:
    m = report.machine
    lines = [
        "# ember chat backends: llama.cpp vs raw llama-cpp-python vs transformers", "",
        f"{m.stamp} · llama-cpp-python {report.llama_cpp} · torch {m.torch}, transformers "
        f"{m.transformers} · {m.threads} threads on every side · `{report.gguf}` · median of "
        f"{report.rounds} interleaved rounds{harness.contention_note(report.other_cpu_share)}",
        "",
        "| metric | measured | baseline | ratio | goal | met |",
        "|---|---:|---:|---:|---:|---|",
        *(goal.row() for goal in goals(report)), "",
        "Per-round ratios (each round ran the sides back to back): ember llama.cpp ÷ "
        + ", ÷ ".join(f"{side} {spread(round_ratios(report.chat, EMBER_LLAMA, side))}"
                      for side in report.chat if side != EMBER_LLAMA) + ".",
        "",
        f"Batch 1, greedy, `ignore_eos`, {report.tokens} tokens, the same prompt on every "
        "side (medians; decode tok/s of each round in the last column):", "",
        "| side | decode tok/s | TTFT ms | request ms | rounds, decode tok/s |",
        "|---|---:|---:|---:|---|",
        *(side_row(side, samples, report.served.get(side))
          for side, samples in report.chat.items()), "",
        f"Raw llama.cpp: `Llama(model_path, n_ctx={N_CTX}, n_threads={m.threads}, "
        f"n_threads_batch={m.threads})` (flash attention off, its default); "
        "`Llama.generate(temp=0)` in the benchmark process after "
        "`reset()` (a full prefill, as ember does), templating and tokenizing inside the "
        "clock, each token detokenized. ember: `POST /v1/chat/completions` streamed, timed at "
        "each SSE chunk.",
        "", same_output_line(report.same_output),
    ]
    if report.levels:
        lines += [
            "", f"Load on ember llama.cpp, {report.seconds_per_level:.0f} s per level after a "
            f"{report.warmup_s:.0f} s warm-up (clients starting one by one; not counted), clients "
            f"streaming back to back, {LOAD_MEAN_TOKENS // 2}-{LOAD_MEAN_TOKENS * 3 // 2} "
            "tokens per request (temperature 0.7, seeded, `ignore_eos`), levels in the order "
            "they ran; ratios use the median over the runs of each level:", "",
            "| run | clients | output tok/s | TTFT p50 ms | ITL p50 ms | latency p50 s | "
            "requests | errors |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(level_row(i + 1, level) for i, level in enumerate(report.levels)), "",
            batching_line(report.eval_tok_s),
        ]
    return "\n".join(lines) + "\n"


def batching_ceiling(eval_tok_s: dict[str, list[float]]) -> tuple[float, float] | None:
    """(tok/s at 1 token per step, at LOAD_CLIENTS tokens), medians; None if not measured."""
    one, many = eval_tok_s.get("1 tokens"), eval_tok_s.get(f"{LOAD_CLIENTS} tokens")
    if not one or not many:
        return None
    return statistics.median(one), statistics.median(many)


def batching_line(eval_tok_s: dict[str, list[float]]) -> str:
    ceiling = batching_ceiling(eval_tok_s)
    if ceiling is None:
        return "llama.cpp's own batching was not measured."
    one, many = ceiling
    return (f"llama.cpp itself (raw `Llama.eval`, {EVAL_STEPS} steps): {many:.1f} tok/s with "
            f"{LOAD_CLIENTS} tokens per decode step against {one:.1f} tok/s with 1, "
            f"{ratio(many, one):.2f}x: the most {LOAD_CLIENTS} streams can gain over one on this "
            "build and CPU, before any prefill, whoever schedules them.")


def level_numbers(level: Level) -> dict[str, Any]:
    return {"clients": level.concurrency, "seconds": level.wall_s, "tok_s": level.tok_s,
            "ttft_p50_s": level.percentile("ttft_s", 0.5), "itl_p50_s": level.itl_p50_s,
            "latency_p50_s": level.percentile("latency_s", 0.5),
            "latency_p99_s": level.percentile("latency_s", 0.99),
            "requests": len(level.timings), "errors": level.errors}


def raw_numbers(report: ChatBackendsReport) -> dict[str, Any]:
    data = asdict(report)
    data["levels"] = [level_numbers(level) for level in report.levels]  # not every gap
    data["medians"] = {side: {attr: median_chat(samples, attr)
                              for attr in ("decode_tok_s", "ttft_s", "total_s")}
                       for side, samples in report.chat.items()}
    data["goals"] = [{"what": g.what, "measured": g.measured, "baseline": g.baseline,
                      "ratio": g.ratio, "goal": g.goal, "lower_is_better": g.lower_is_better,
                      "met": g.met} for g in goals(report)]
    ceiling = batching_ceiling(report.eval_tok_s)
    data["llama_cpp_batching_ceiling"] = ratio(ceiling[1], ceiling[0]) if ceiling else None
    return data


def compare_outputs(raw: Completion, ember: Completion) -> SameOutput:
    first = next((i for i, (a, b) in enumerate(zip(raw.text, ember.text, strict=False))
                  if a != b), None)
    if first is None and len(raw.text) != len(ember.text):
        first = min(len(raw.text), len(ember.text))
    return SameOutput(raw.prompt_tokens, ember.prompt_tokens, first, len(raw.text))


def same_output_line(same: SameOutput | None) -> str:
    if same is None:
        return "Outputs not compared."
    raw, ember = same.raw_prompt_tokens, same.ember_prompt_tokens
    prompts = (f"the same {raw}-token prompt" if raw == ember
               else f"**different prompts: {raw} tokens raw, {ember} ember**")
    text = ("the same greedy text" if same.first_difference is None
            else f"texts that differ from character {same.first_difference} of {same.chars}")
    return f"ember llama.cpp and raw llama.cpp got {prompts} and wrote {text}."


def level_order(repeats: int) -> list[int]:
    """1 client, then 16, alternating, each `repeats` times."""
    return [1, LOAD_CLIENTS] * repeats


def report_name(threads: int, all_cores: int) -> str:
    return "chat_backends" if threads == all_cores else f"chat_backends_t{threads}"


# -- raw llama.cpp -------------------------------------------------------------------------


class RawLlama:
    """llama-cpp-python's high-level `Llama` on the GGUF, nothing of ember's in the loop."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

        def token_text(token: int) -> str:
            return self.llm.detokenize([token], special=True).decode() if token >= 0 else ""

        self.last = Completion(0, "")
        self.formatter = Jinja2ChatFormatter(
            template=self.llm.metadata["tokenizer.chat_template"],
            eos_token=token_text(self.llm.token_eos()),
            bos_token=token_text(self.llm.token_bos()))

    def eval_tok_s(self, batch: int, steps: int = EVAL_STEPS) -> float:
        """Tokens/s of `steps` llama_decode calls of `batch` tokens each: a decode step's
        matmuls for `batch` sequences (one sequence here; attention differs, but over a few
        hundred positions it is a small part of a 135M model's step)."""
        text = (CHAT_PROMPT + " ") * (batch * steps // 8 + 1)  # >= 8 tokens per copy
        ids = self.llm.tokenize(text.encode(), add_bos=False)[:batch * steps]
        self.llm.reset()
        started = time.perf_counter()
        for step in range(steps):
            self.llm.eval(ids[step * batch:(step + 1) * batch])
        return batch * steps / (time.perf_counter() - started)

    def chat(self, tokens: int) -> ChatSample:
        started = time.perf_counter()
        prompt = self.formatter(messages=[{"role": "user", "content": CHAT_PROMPT}]).prompt
        ids = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
        self.llm.reset()  # no prefix reuse from the last round: ember prefills in full too
        token_times: list[float] = []
        pieces: list[bytes] = []
        for token in self.llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            pieces.append(self.llm.detokenize([token]))
            token_times.append(time.perf_counter())
            if len(token_times) == tokens:
                break
        finished = time.perf_counter()
        self.last = Completion(len(ids), b"".join(pieces).decode("utf-8", errors="replace"))
        return harness.chat_sample(started, token_times, finished, tokens)


# -- the servers ---------------------------------------------------------------------------


def server_config(scratch: Path, backend: str, threads: int) -> dict[str, str]:
    """Environment for one `ember serve`: a config file forcing `backend` for the chat entry,
    the thread counts, and a data folder of its own (the model cache is shared)."""
    config = scratch / f"{backend}.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"id": CHAT_MODEL, "backend": backend}],
        "llama_threads": threads, "torch_threads": threads,
    }))
    return {"EMBER_CONFIG": str(config), "EMBER_LLAMA_THREADS": str(threads),
            "EMBER_DATA_DIR": str(scratch / f"data-{backend}")}


def served_as(client: httpx.Client, backend: str) -> dict[str, Any]:
    """The chat model's /v1/models entry; fails unless it runs on `backend`."""
    status = client.get(f"/v1/models/{CHAT_MODEL}").raise_for_status().json()
    if status.get("backend") != backend:
        raise RuntimeError(f"{CHAT_MODEL} is served on {status.get('backend')!r}, not "
                           f"{backend!r}: {status.get('backend_note') or status.get('error')}")
    return {key: status.get(key) for key in ("backend", "dtype", "device", "memory_bytes",
                                             "load_seconds")}


def ember_completion(client: httpx.Client, tokens: int) -> Completion:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": CHAT_PROMPT}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    reply = client.post("/v1/chat/completions", json=body).raise_for_status().json()
    return Completion(reply["usage"]["prompt_tokens"], reply["choices"][0]["message"]["content"])


# -- main ----------------------------------------------------------------------------------


def measure(args: argparse.Namespace, progress: harness.Progress, scratch: Path
            ) -> ChatBackendsReport:
    started = time.perf_counter()
    settings = load_settings(preload=[])
    entry = Registry.from_settings(settings).resolve(CHAT_MODEL)
    path = gguf_path(entry, settings.models_dir)
    if path is None or not path.is_file():
        raise RuntimeError(f"{CHAT_MODEL}: no GGUF file ({path}); {entry.install_hint}")
    progress.step(f"checking that llama.cpp can serve {path.name}")
    # Raises ModelLoadError with llama.cpp's own reason, before any server is started.
    choose_backend(entry.model_copy(update={"backend": "llama.cpp"}), "cpu",
                   settings.models_dir)
    device = resolve_device(settings.device)
    report = ChatBackendsReport(
        machine=harness.describe_machine(args.threads, resolve_dtype(settings.dtype, device),
                                         device),
        llama_cpp=metadata.version("llama_cpp_python"), gguf=path.name, tokens=TOKENS,
        rounds=args.rounds, seconds_per_level=args.seconds, warmup_s=args.warmup)

    with ExitStack() as stack:
        servers = {side: stack.enter_context(harness.serve(
            progress, scratch / f"server-{backend}.log", args.threads, preload=(CHAT_MODEL,),
            env=server_config(scratch, backend, args.threads), name=f"ember serve on {backend}"))
            for side, backend in BACKEND_OF.items()}
        progress.step(f"loading raw llama.cpp in this process ({args.threads} threads)")
        raw = RawLlama(path, args.threads)
        for side, backend in BACKEND_OF.items():
            servers[side].ready(progress, f"{side}'s /ready")
            report.served[side] = served_as(servers[side].client, backend)
            progress.note(f"served as {report.served[side]}")

        watch = harness.CpuWatch([server.pid for server in servers.values()])
        on_llama, on_transformers = (servers[EMBER_LLAMA].client,
                                     servers[EMBER_TRANSFORMERS].client)
        report.chat = harness.interleave(progress, args.rounds, "chat", harness.show_chat, {
            RAW: lambda: raw.chat(TOKENS),
            EMBER_LLAMA: lambda: harness.http_chat(on_llama, TOKENS),
            EMBER_TRANSFORMERS: lambda: harness.http_chat(on_transformers, TOKENS),
        })
        progress.step("comparing ember llama.cpp's greedy output with raw llama.cpp's")
        report.same_output = compare_outputs(raw.last, ember_completion(on_llama, TOKENS))
        progress.note(same_output_line(report.same_output))
        report.eval_tok_s = harness.interleave(
            progress, args.rounds, "raw llama.cpp decode steps", lambda r: f"{r:.1f} tok/s",
            {f"{batch} tokens": partial(raw.eval_tok_s, batch) for batch in (1, LOAD_CLIENTS)})
        port = servers[EMBER_LLAMA].port
        for clients_now in level_order(args.repeats):
            report.levels.append(progress.run(
                f"{EMBER_LLAMA} load: {clients_now} streaming clients for {args.seconds:.0f} s",
                partial(harness.run_level, port, clients_now, args.seconds, LOAD_MEAN_TOKENS,
                        args.warmup), show_level))
            time.sleep(LEVEL_PAUSE_S)
        report.other_cpu_share = watch.other_share(*(server.pid for server in servers.values()))
    print(f"measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return report


def show_level(level: Level) -> str:
    return (f"{level.tok_s:.1f} tok/s, TTFT p50 {level.percentile('ttft_s', 0.5) * 1000:.0f} "
            f"ms, {len(level.timings)} requests, errors {level.errors}")


def step_count(args: argparse.Namespace) -> int:
    setup = 6  # llama.cpp check, 2 server starts, raw load, 2 /ready waits
    return setup + (args.rounds + 1) * (len(SIDES) + 2) + 1 + 2 * args.repeats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    flags = harness.Arguments("chat_backends", __doc__,
                              quick="3 chat rounds (not 7), 6 s load levels (not 30 s)",
                              threads="threads for every side (default: all cores)")
    flags.add("--rounds", type=int, help="interleaved chat rounds")
    flags.add("--seconds", type=float, help="length of each load level")
    flags.add("--warmup", type=float,
              help="seconds over which a level's clients start, before its window")
    flags.add("--repeats", type=int, help="runs of each load level (1, 16, 1, 16, ...); 0: none")
    args = flags.parse(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.seconds is None:
        args.seconds = 6.0 if args.quick else 30.0
    if args.repeats is None:
        args.repeats = 2
    if args.warmup is None:
        args.warmup = 3.0 if args.quick else LOAD_WARMUP_S
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.run(args, report_name(args.threads, os.cpu_count() or 1),
                       step_count, measure, render, raw_numbers)


if __name__ == "__main__":
    sys.exit(main())
