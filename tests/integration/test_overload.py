"""A bounded overload run on loopback against `ember serve` (a real process, so that its own
memory is what is measured) serving the packaged MiniLM with `max_queue_per_model` = QUEUE.

5,000 single-input embedding requests from closed-loop clients that never back off:
- at the limit (QUEUE clients: at most QUEUE inputs can wait) every request is a 200;
- beyond it (4 x QUEUE clients) every answer is a 200 or a 429 with Retry-After and
  `queue_full`, nothing else, and some are 429s;
- p50/p99 latency of each phase is printed;
- the server's RSS after the rest of the run is within RSS_GROWTH_MB of its RSS after a
  warm-up round that had both kinds of load (allocator high-water marks are reached there),
  and no model holds an active or queued request afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.process import ember_serve

pytestmark = pytest.mark.e2e
MODEL = "all-minilm-l6-v2"
QUEUE = 32
BEYOND = 4 * QUEUE
RSS_GROWTH_MB = 50
# (clients, requests): warm-up, then the measured rest; 5,000 requests in all.
WARM_UP = [(QUEUE, 300), (BEYOND, 300)]
REST = [(QUEUE, 1000), (BEYOND, 1200), (QUEUE, 1000), (BEYOND, 1200)]


@dataclass
class Phase:
    clients: int
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, of the 200s
    bad_429s: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def summary(self) -> str:
        return (f"{self.clients:3d} clients: {dict(self.statuses)} in {self.seconds:.1f} s "
                f"({sum(self.statuses.values()) / self.seconds:.0f} req/s), 200s p50 "
                f"{self.percentile(0.5):.0f} ms, p99 {self.percentile(0.99):.0f} ms")


class Connection:
    """One keep-alive HTTP/1.1 connection, written by hand: httpx spends as much CPU per
    request as the server does, and on 2 cores the client would measure itself. A connection
    the server closes without saying so fails the request (it must never)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                          + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
        content = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection") == "close":
            await self.close()
        return status, headers, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
        self.reader = self.writer = None


async def run_phase(port: int, clients: int, requests: int,
                    numbers: itertools.count[int]) -> Phase:
    """`requests` requests from `clients` clients on a connection each, each sending its next
    one as soon as it has an answer (a 429 included)."""
    phase = Phase(clients)
    left = iter(range(requests))

    async def client() -> None:
        connection = Connection(port)
        try:
            for _ in left:
                body = {"model": MODEL, "input": f"request {next(numbers)}"}
                started = time.perf_counter()
                status, headers, content = await connection.post("/v1/embeddings", body)
                phase.statuses[status] += 1
                if status == 200:
                    phase.latencies.append(time.perf_counter() - started)
                    assert len(json.loads(content)["data"][0]["embedding"]) == 384
                elif status == 429 and not (
                    int(headers.get("retry-after", "0")) >= 1
                    and json.loads(content)["error"]["code"] == "queue_full"
                ):
                    phase.bad_429s.append(f"{headers} {content!r}")
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    phase.seconds = time.perf_counter() - started
    return phase


async def test_overload_is_only_429s_and_memory_stays_flat(tmp_path: Path) -> None:
    env = {"EMBER_DATA_DIR": str(tmp_path / "data"), "EMBER_MODELS_DIR": str(tmp_path / "models"),
           "EMBER_PRELOAD": MODEL, "EMBER_TORCH_THREADS": "1",
           "EMBER_MAX_QUEUE_PER_MODEL": str(QUEUE), "EMBER_LOG_LEVEL": "warning"}
    numbers = itertools.count()
    with ember_serve(tmp_path / "ember.log", env) as (base, process):
        port = int(base.rsplit(":", 1)[1])
        server = psutil.Process(process.pid)
        phases = [await run_phase(port, c, n, numbers) for c, n in WARM_UP]
        rss_warm = server.memory_info().rss
        for clients, requests in REST:
            phases.append(await run_phase(port, clients, requests, numbers))
        rss_end = server.memory_info().rss
        status = httpx.get(f"{base}/v1/models/{MODEL}").json()
        assert process.poll() is None

    for phase in phases:
        print(phase.summary())
    grown_mb = (rss_end - rss_warm) / 2**20
    print(f"server RSS {rss_warm / 2**20:.0f} MB after the warm-up ({sum(n for _, n in WARM_UP)} "
          f"requests), {rss_end / 2**20:.0f} MB after {sum(n for _, n in REST)} more: "
          f"{grown_mb:+.1f} MB")
    assert sum(sum(p.statuses.values()) for p in phases) == 5000
    for phase in phases:
        if phase.clients <= QUEUE:  # at the limit nothing fails
            assert set(phase.statuses) == {200}, phase.summary()
        else:  # beyond it only 429s, each with Retry-After
            assert set(phase.statuses) <= {200, 429}, phase.summary()
            assert not phase.bad_429s, phase.bad_429s[:3]
    beyond = [p for p in phases if p.clients > QUEUE]
    assert all(p.statuses[200] > 0 for p in beyond), "overloaded, nothing was served"
    assert sum(p.statuses[429] for p in beyond) > 0, "never past the queue limit"
    assert status["active_requests"] == 0 and status["queued_requests"] == 0, status
    assert grown_mb < RSS_GROWTH_MB, f"server RSS grew {grown_mb:.1f} MB"
