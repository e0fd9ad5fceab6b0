"""Structured output: what a JSON-schema constraint costs in decode speed, and how long its
grammars take to compile, on the default chat model.

    python -m benchmarks.structured [--quick] [--out DIR]
    ember bench structured [--quick]

One `ember serve` (the packaged SmolLM2 on its default backend, llama.cpp where built).
Load levels alternate free and constrained requests at 1 and at 16 streaming clients
(benchmarks/harness.py's run_level: back-to-back requests of 48-144 tokens, `ignore_eos`,
temperature 0.7, seeded; the 16-client levels after a warm-up in which the clients start one
by one): free 1, constrained 1, free 16, constrained 16, repeated. Constrained requests carry
`response_format` json_schema for an object with one long string (`minLength` past any
`max_tokens` here), so every reply runs its full length under the mask, as a free one does.

Goals: decode tok/s constrained ÷ free ≥ 0.85 at 1 and at 16 clients (overhead ≤ 15%):
per-stream decode rate (the median over requests of (tokens - 1) / time between the first and
last token) at 1 client, aggregate output tok/s at 16.

Then grammar compile times in this process, on the same model's vocabulary: each of the
integration tests' schemas, json_object and two tool-call grammars, compiled cold (a fresh
cache) 30 times; p50 and p99, and the cached lookup.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.harness import CHAT_MODEL, Level, Machine
from engine.core.devices import resolve_device, resolve_dtype
from engine.core.settings import load_settings

# The integration tests' schemas (tests/integration/test_structured.py), whose compile times
# this reports: nested objects, enums, arrays with min/max items, required fields, bounds.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        }, "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
SCORES = {
    "type": "object",
    "properties": {
        # Bounded integers: a number's digits are unbounded, and a real 135M model will write
        # 1.000000... until max_tokens.
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 99},
                   "minItems": 2, "maxItems": 4},
        "passed": {"type": "boolean"},
    },
    "required": ["scores", "passed"],
    "additionalProperties": False,
}
TAGS = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"key": {"enum": ["a", "b", "c"]},
                           "weight": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["key", "weight"], "additionalProperties": False}},
        "note": {"type": ["string", "null"], "maxLength": 8},
    },
    "required": ["tags", "note"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "scores": SCORES, "tags": TAGS}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        }, "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                       "required": ["zone"], "additionalProperties": False},
    },
}
TOOLS: list[Any] = [WEATHER, TIME]

MEAN_TOKENS = 96
CLIENTS = (1, 16)
LONG_STRING = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}},
               "required": ["story"], "additionalProperties": False}
CONSTRAINED = {"response_format": {"type": "json_schema",
                                   "json_schema": {"name": "story", "schema": LONG_STRING}}}
COMPILES = 30


@dataclass
class StructuredReport:
    machine: Machine
    served: dict[str, Any]
    seconds_per_level: float
    warmup_s: float
    levels: dict[str, list[Level]] = field(default_factory=dict)  # "free 1" -> runs
    compile_ms: dict[str, dict[str, float]] = field(default_factory=dict)


def level_key(constrained: bool, clients: int) -> str:
    return f"{'constrained' if constrained else 'free'} {clients}"


def rate(level: Level) -> float:
    """1 client: the stream's decode rate; more: the aggregate output rate."""
    return level.decode_tok_s if level.concurrency == 1 else level.tok_s


def median_rate(runs: list[Level]) -> float:
    return statistics.median(rate(level) for level in runs)


def measure_compiles(path: Path) -> dict[str, dict[str, float]]:
    """Cold and cached compile times of the test grammars on this GGUF's vocabulary."""
    import llama_cpp
    from llguidance.llamacpp import lltokenizer_from_vocab

    from engine.contracts.chat import ResponseFormat, ToolSpec
    from engine.contracts.chat_templates import HERMES
    from engine.generation.structured import (
        GrammarCompiler,
        response_format_grammar,
        tool_call_grammar,
    )

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    try:
        tokenizer = lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(model))
        tools = tuple(ToolSpec(t["function"]["name"], "", t["function"]["parameters"])
                      for t in TOOLS)
        grammars = {name: response_format_grammar(ResponseFormat("json_schema", schema))
                    for name, schema in SCHEMAS.items()}
        grammars["json_object"] = response_format_grammar(ResponseFormat("json_object"))
        grammars["tools, required"] = tool_call_grammar(tools, "required", True, HERMES)
        grammars["tools, auto"] = tool_call_grammar(tools, "auto", True, HERMES)
        out: dict[str, dict[str, float]] = {}
        for name, grammar in grammars.items():
            cold = []
            for _ in range(COMPILES):
                compiler = GrammarCompiler(lambda: tokenizer)
                started = time.perf_counter()
                compiler.compile(grammar, "bench")
                cold.append(1000 * (time.perf_counter() - started))
            cold.sort()
            started = time.perf_counter()
            for _ in range(100):
                compiler.compile(grammar, "bench")
            cached = 1000 * (time.perf_counter() - started) / 100
            out[name] = {"p50": statistics.median(cold), "p99": cold[-1], "cached": cached}
        return out
    finally:
        llama_cpp.llama_model_free(model)


def show_level(level: Level) -> str:
    return f"{rate(level):.1f} tok/s, {len(level.timings)} requests, errors {level.errors}"


def render(report: StructuredReport) -> str:
    machine = report.machine
    lines = [
        "# ember structured output: decode speed under a JSON schema, grammar compile times",
        "",
        f"{machine.stamp} · {CHAT_MODEL} on {report.served.get('backend')} "
        f"({report.served.get('dtype')}) · "
        f"{report.seconds_per_level:.0f} s per level, 16-client levels after a "
        f"{report.warmup_s:.0f} s warm-up",
        "",
        "| metric | constrained | free | ratio | goal | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for clients in CLIENTS:
        free = median_rate(report.levels[level_key(False, clients)])
        bound = median_rate(report.levels[level_key(True, clients)])
        what = "decode tok/s, 1 client" if clients == 1 else f"aggregate tok/s, {clients} clients"
        ratio = bound / free if free else 0.0
        lines.append(f"| {what}: json_schema ÷ free | {bound:.1f} | {free:.1f} | {ratio:.2f} | "
                     f"≥ 0.85 | {'pass' if ratio >= 0.85 else '**FAIL**'} |")
    lines += ["", "Each level's runs (they alternated: free 1, constrained 1, free 16, "
              "constrained 16):", "",
              "| level | tok/s (decode at 1, aggregate at 16) | requests | errors |",
              "|---|---:|---:|---:|"]
    for key, runs in report.levels.items():
        for level in runs:
            lines.append(f"| {key} | {rate(level):.1f} | {len(level.timings)} | "
                         f"{level.errors} |")
    lines += ["", f"Grammar compile times on {CHAT_MODEL}'s vocabulary ({COMPILES} cold "
              "compiles each, fresh cache; cached: a copy of the compiled matcher):", "",
              "| grammar | p50 ms | p99 ms | cached ms |", "|---|---:|---:|---:|"]
    for name, times in report.compile_ms.items():
        lines.append(f"| {name} | {times['p50']:.2f} | {times['p99']:.2f} | "
                     f"{times['cached']:.3f} |")
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace, progress: harness.Progress, scratch: Path
            ) -> StructuredReport:
    from engine.core.registry import Registry
    from engine.core.sources import gguf_path

    settings = load_settings(preload=[])
    device = resolve_device(settings.device)
    with ExitStack() as stack:
        server = stack.enter_context(harness.serve(
            progress, scratch / "server.log", 1, preload=(CHAT_MODEL,),
            env={"EMBER_DATA_DIR": str(scratch)}, name="ember serve"))
        server.ready()
        status = server.client.get(f"/v1/models/{CHAT_MODEL}").raise_for_status().json()
        served = {k: status.get(k) for k in ("backend", "dtype", "device")}
        report = StructuredReport(
            harness.describe_machine(1, resolve_dtype(settings.dtype, device), device), served,
            args.seconds, args.warmup)
        for _ in range(args.repeats):
            for clients in CLIENTS:
                for constrained in (False, True):
                    key = level_key(constrained, clients)
                    warmup = args.warmup if clients > 1 else 0.0
                    level = progress.run(
                        f"{key} client(s), {args.seconds:.0f} s",
                        partial(harness.run_level, server.port, clients, args.seconds,
                                MEAN_TOKENS, warmup, CONSTRAINED if constrained else None),
                        show_level)
                    report.levels.setdefault(key, []).append(level)
                    time.sleep(1.0)
    entry = Registry.from_settings(settings).resolve(CHAT_MODEL)
    path = gguf_path(entry, settings.models_dir)
    if path is not None and path.is_file():
        progress.step("grammar compile times")
        report.compile_ms = measure_compiles(path)
    return report


def raw_numbers(report: StructuredReport) -> dict[str, Any]:
    return {"machine": asdict(report.machine), "served": report.served,
            "levels": {key: [{"tok_s": lv.tok_s, "decode_tok_s": lv.decode_tok_s,
                              "requests": len(lv.timings), "errors": lv.errors} for lv in runs]
                       for key, runs in report.levels.items()},
            "compile_ms": report.compile_ms}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    flags = harness.Arguments("structured", __doc__, quick="8 s levels, one repeat",
                              threads=None)
    flags.add("--seconds", type=float, help="length of each level (default 20)")
    flags.add("--warmup", type=float, help="16-client warm-up (default 10)")
    flags.add("--repeats", type=int, help="runs of the four levels (default 2)")
    args = flags.parse(argv)
    args.seconds = args.seconds or (8.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    args.repeats = args.repeats or (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.run(args, "structured", lambda args: 1 + 4 * args.repeats + 1, measure,
                       render, raw_numbers)


if __name__ == "__main__":
    sys.exit(main())
