"""The sweep report's arithmetic and goals, on synthetic timings."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import Level, Machine, RequestTiming
from benchmarks.sweep import SweepReport, plot, render, targets


def level(concurrency: int, wall_s: float, ttft_s: float) -> Level:
    timings = [RequestTiming(ttft_s=ttft_s, latency_s=wall_s, tokens=10, gaps_s=[0.1] * 9)
               for _ in range(concurrency)]
    return Level(concurrency, wall_s, timings, errors=0)


def report() -> SweepReport:
    machine = Machine("cpu", 2, 2, "t", "tf", "3.11", "abc", "bfloat16", "cpu", "today")
    result = SweepReport(machine, tokens=10, seconds_per_level=1.0)
    result.levels = [level(1, 1.0, 0.1), level(16, 2.0, 0.25)]
    result.baseline_tok_s = [9.0, 10.0, 11.0]
    result.bandwidth_bytes_s, result.weight_bytes = 10e9, 10**9
    result.embed_per_s = {"offline_batch_32": [100.0], "offline_one_by_one": [20.0],
                          "http_64_concurrent": [90.0]}
    return result


def test_goals_compare_like_with_like() -> None:
    goals = {what: (value, goal) for what, value, goal in targets(report())}
    assert goals["chat 1 client vs plain generate (output tok/s)"] == (1.0, 0.9)
    assert goals["chat 16 clients vs 1 client (aggregate tok/s)"] == (8.0, 6.0)
    ttft = next(v for k, v in goals.items() if k.startswith("chat TTFT"))
    assert abs(ttft[0] - 2.5) < 1e-9
    assert goals["embeddings 64 concurrent HTTP vs offline encode(batch 32)"] == (0.9, 0.8)


def test_table_and_plots(tmp_path: Path) -> None:
    text = render(report())
    assert "| 16 | 80.0 | 8.00x |" in text
    assert "= 10.0 tok/s" in text  # roofline: 10 GB/s over 1 GB of weights
    assert "NO" not in text
    paths = plot(report(), tmp_path)
    assert all(path.stat().st_size > 1000 for path in paths)
