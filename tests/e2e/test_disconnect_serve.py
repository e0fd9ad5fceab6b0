"""A client that gives up on a long non-streamed chat stops its decoding, on `ember serve` as
a real process (uvicorn, a real socket): within 2 s the model has no active request and the
decode-step counter in /metrics stops.

Its own server, with only the packaged default chat model loaded (seconds to start, where
test_serve's module-scoped server loads every default model)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.process import ember_serve

pytestmark = pytest.mark.e2e
CHAT = "smollm2-135m-instruct"
# The scheduler observes `ember_batch_size` once per decode step: its count is the steps.
DECODE_STEPS = re.compile(
    r'^ember_batch_size_count\{model="' + re.escape(CHAT) + r'"\} (\S+)$', re.MULTILINE
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log_path = tmp_path_factory.mktemp("disconnect-serve") / "ember.log"
    # One compute thread: a request is dropped between scheduler steps, and on a shared,
    # oversubscribed machine a step on several spinning threads was seen taking 3-5 s (one
    # thread: ~40 ms), which would measure the machine's load rather than the cancellation.
    env = {"EMBER_DATA_DIR": str(log_path.parent / "data"), "EMBER_PRELOAD": CHAT,
           "EMBER_LLAMA_THREADS": "1", "EMBER_TORCH_THREADS": "1"}
    with ember_serve(log_path, env) as (base, _):
        yield base, log_path


def decode_steps(base: str) -> float:
    found = DECODE_STEPS.search(httpx.get(f"{base}/metrics", timeout=5).text)
    return float(found.group(1)) if found else 0.0


def active_requests(base: str) -> int:
    models = httpx.get(f"{base}/v1/models", timeout=5).json()["data"]
    return int(next(m for m in models if m["id"] == CHAT)["active_requests"])


def test_a_client_that_gives_up_stops_the_decoding(served: tuple[str, Path]) -> None:
    base, log_path = served
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    warm = httpx.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": 2},
                      timeout=120)  # the first request's one-off costs are paid here
    assert warm.status_code == 200
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=1)
    gave_up = time.monotonic()
    # Not finished (2000 tokens take minutes here): only a cancelled request is gone this soon.
    while active_requests(base) != 0:
        assert time.monotonic() - gave_up < 2, "the request is still active 2 s after"
        time.sleep(0.05)
    stopped = decode_steps(base)
    time.sleep(1.0)
    assert decode_steps(base) == stopped, "decode steps went on after the client left"
    assert "client disconnected; cancelled" in log_path.read_text()
    # The server goes on serving.
    reply = httpx.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": 3},
                       timeout=120)
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == 3
