"""The chat-backends report's medians, ratios and goals, on synthetic samples (no server)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.chat_backends import (
    EMBER_LLAMA,
    EMBER_TRANSFORMERS,
    LOAD_CLIENTS,
    RAW,
    ChatBackendsReport,
    Completion,
    Goal,
    batching_ceiling,
    batching_line,
    compare_outputs,
    goals,
    level_medians,
    level_order,
    raw_numbers,
    render,
    report_name,
    round_ratios,
    same_output_line,
)
from benchmarks.harness import ChatSample, Level, Machine, RequestTiming, ratio


def samples(*rates: float) -> list[ChatSample]:
    return [ChatSample(ttft_s=0.05, decode_tok_s=rate, total_s=128 / rate, tokens=128)
            for rate in rates]


def level(clients: int, tokens_each: int, ttft_s: float, wall_s: float = 2.0) -> Level:
    timings = [RequestTiming(ttft_s=ttft_s, latency_s=1.0, tokens=tokens_each,
                             gaps_s=[0.01] * (tokens_each - 1)) for _ in range(clients)]
    return Level(clients, wall_s, timings, errors=0)


def report(levels: list[Level] | None = None) -> ChatBackendsReport:
    machine = Machine("AMD EPYC", 2, 2, "2.13", "5.23", "3.11", "abc", "bfloat16", "cpu",
                      "2026-01-01")
    result = ChatBackendsReport(machine, "0.3.36", "model.gguf", tokens=128, rounds=3,
                                seconds_per_level=2.0)
    result.chat = {RAW: samples(100.0, 120.0, 110.0), EMBER_LLAMA: samples(95.0, 99.0, 90.0),
                   EMBER_TRANSFORMERS: samples(20.0, 25.0, 30.0)}
    result.served = {EMBER_LLAMA: {"backend": "llama.cpp", "dtype": "gguf"},
                     EMBER_TRANSFORMERS: {"backend": "transformers", "dtype": "bfloat16"}}
    # 1 client: 40 and 60 tok/s, TTFT 100/120 ms; 16 clients: 320 and 480 tok/s, TTFT 250/450.
    result.levels = levels if levels is not None else [
        level(1, 80, 0.10), level(LOAD_CLIENTS, 40, 0.25),
        level(1, 120, 0.12), level(LOAD_CLIENTS, 60, 0.45)]
    result.eval_tok_s = {"1 tokens": [20.0, 25.0, 30.0], f"{LOAD_CLIENTS} tokens": [50.0, 40.0]}
    return result


def by_name(report: ChatBackendsReport) -> dict[str, Goal]:
    return {goal.what.split(":")[-1].strip(): goal for goal in goals(report)}


def test_ratio_guards_a_zero_baseline() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))


def test_goals_use_medians_over_rounds() -> None:
    found = by_name(report())
    raw = found["ember llama.cpp ÷ raw llama.cpp"]
    assert (raw.measured, raw.baseline) == (95.0, 110.0)  # medians, not means
    assert raw.ratio == pytest.approx(95 / 110)
    assert not raw.met  # 0.86 < 0.9
    versus = found["ember llama.cpp ÷ ember transformers"]
    assert versus.ratio == pytest.approx(95 / 25) and versus.met


def test_load_goals_compare_medians_of_each_level() -> None:
    one_tok_s, one_ttft = level_medians(report().levels, 1)
    assert (one_tok_s, one_ttft) == (pytest.approx(50.0), pytest.approx(0.11))
    aggregate, ttft = goals(report())[2:]
    assert "aggregate output" in aggregate.what and "TTFT" in ttft.what
    assert aggregate.ratio == pytest.approx(400 / 50) and aggregate.met
    assert ttft.lower_is_better
    assert ttft.ratio == pytest.approx(0.35 / 0.11)  # 3.18: above 3, so failed
    assert not ttft.met


def test_lower_is_better_goal_passes_at_or_below() -> None:
    assert Goal("t", 300.0, 100.0, 3.0, "ms", lower_is_better=True).met
    assert not Goal("t", 301.0, 100.0, 3.0, "ms", lower_is_better=True).met
    assert Goal("r", 90.0, 100.0, 0.9, "tok/s").met


def test_round_ratios_pair_each_round() -> None:
    ratios = round_ratios(report().chat, EMBER_LLAMA, RAW)
    assert ratios == pytest.approx([0.95, 99 / 120, 90 / 110])
    with pytest.raises(ValueError):
        round_ratios({RAW: samples(1.0), EMBER_LLAMA: samples(1.0, 2.0)}, EMBER_LLAMA, RAW)


def test_level_medians_needs_the_level() -> None:
    with pytest.raises(ValueError, match="16 clients"):
        level_medians([level(1, 10, 0.1)], LOAD_CLIENTS)


def test_table_shows_each_number_baseline_ratio_and_goal() -> None:
    text = render(report())
    assert ("| decode, batch 1, 128 tokens: ember llama.cpp ÷ raw llama.cpp | 95.0 tok/s | "
            "110.0 tok/s | 0.86 | ≥ 0.9 | **FAIL** |") in text
    assert "| 3.80 | ≥ 2.5 | pass |" in text
    assert "| 400.0 tok/s | 50.0 tok/s | 8.00 | ≥ 6 | pass |" in text
    assert "| 350 ms | 110 ms | 3.18 | ≤ 3 | **FAIL** |" in text
    assert "AMD EPYC, 2 cores · llama-cpp-python 0.3.36" in text
    assert "| ember llama.cpp (llama.cpp, gguf) | 95.0 |" in text
    assert "| raw llama.cpp (in-process) | 110.0 |" in text
    assert "| 4 | 16 | 480.0 | 450 |" in text  # the 4th level, in run order


def test_report_without_load_levels() -> None:
    text = render(report(levels=[]))
    assert len(goals(report(levels=[]))) == 2
    assert "streaming clients" not in text and "Load on" not in text


def test_raw_numbers_are_json_and_compact() -> None:
    data = json.loads(json.dumps(raw_numbers(report())))
    assert data["medians"][RAW]["decode_tok_s"] == 110.0
    assert data["levels"][1] == pytest.approx({
        "clients": 16, "seconds": 2.0, "tok_s": 320.0, "ttft_p50_s": 0.25, "itl_p50_s": 0.01,
        "latency_p50_s": 1.0, "latency_p99_s": 1.0, "requests": 16, "errors": 0})
    assert [g["met"] for g in data["goals"]] == [False, True, True, False]


def test_level_order_alternates_and_report_name() -> None:
    assert level_order(2) == [1, LOAD_CLIENTS, 1, LOAD_CLIENTS]
    assert report_name(2, 2) == "chat_backends"
    assert report_name(1, 2) == "chat_backends_t1"


def test_outputs_compared_by_prompt_and_text() -> None:
    same = compare_outputs(Completion(40, "Once upon"), Completion(40, "Once upon"))
    assert same.first_difference is None
    assert same_output_line(same) == (
        "ember llama.cpp and raw llama.cpp got the same 40-token prompt and wrote the same "
        "greedy text.")
    differs = compare_outputs(Completion(40, "Once upon"), Completion(41, "Once apon"))
    assert differs.first_difference == 5
    line = same_output_line(differs)
    assert "**different prompts: 40 tokens raw, 41 ember**" in line
    assert "differ from character 5 of 9" in line
    assert compare_outputs(Completion(1, "ab"), Completion(1, "abc")).first_difference == 2
    assert same_output_line(None) == "Outputs not compared."
    report_ = report()
    report_.same_output = differs
    assert "differ from character 5 of 9" in render(report_)


def test_batching_ceiling_from_raw_decode_steps() -> None:
    assert batching_ceiling(report().eval_tok_s) == (25.0, 45.0)
    assert batching_ceiling({}) is None
    assert "45.0 tok/s with 16 tokens per decode step against 25.0 tok/s with 1, 1.80x" in (
        render(report()))
    assert raw_numbers(report())["llama_cpp_batching_ceiling"] == pytest.approx(1.8)
    assert batching_line({}) == "llama.cpp's own batching was not measured."
