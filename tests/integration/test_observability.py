"""Request ids in log lines and error bodies, one access line per request (a client that left
included), JSON logs, a 500 that keeps the keep-alive connection, a model failing inside a
batch failing only that batch, and the histograms /metrics adds."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from engine.core.logs import JsonFormatter, RequestIdFilter
from engine.core.settings import Settings
from server.app import create_app
from tests.conftest import Served, serve_in_process, uvicorn_thread

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture
def request_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO)
    return caplog


async def test_every_log_line_of_a_request_carries_its_id(
    served: Served, request_logs: pytest.LogCaptureFixture
) -> None:
    response = await served.http.post("/v1/chat/completions", headers={"x-request-id": "trace-7"},
                                      json={**CHAT, "temperature": 9})
    assert response.status_code == 400
    assert response.json()["error"]["request_id"] == "trace-7"
    mine = [r for r in request_logs.records if getattr(r, "request_id", None) == "trace-7"]
    assert {r.name for r in mine} >= {"ember.http", "ember.access"}
    access = next(r for r in mine if r.name == "ember.access")
    assert '"POST /v1/chat/completions" 400' in access.getMessage()


def test_json_log_lines() -> None:
    record = logging.LogRecord("ember.http", logging.WARNING, __file__, 1, "bad %s", ("x",), None)
    record.request_id = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["logger"] == "ember.http"
    assert line["message"] == "bad x" and line["request_id"] == "abc"
    assert line["time"].endswith("Z") and "T" in line["time"]


def raw_requests(base: str, *requests: bytes) -> list[bytes]:
    """Sends the requests one after another on one TCP connection; the raw responses."""
    host, port = base.removeprefix("http://").split(":")
    replies = []
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        reader = sock.makefile("rb")
        for request in requests:
            sock.sendall(request)
            status = reader.readline()
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = reader.read(int(headers.get("content-length", 0)))
            replies.append(status + body)
    return replies


def test_a_500_keeps_the_connection_and_names_the_request(
    make_settings: Callable[..., Settings], request_logs: pytest.LogCaptureFixture
) -> None:
    """A bug in a route (here one raising on purpose) answers 500 in the envelope, and the
    client's next request on the same keep-alive connection is served."""
    app = create_app(make_settings())

    @app.get("/v1/broken-on-purpose")
    async def broken() -> Any:
        raise RuntimeError("a bug")

    with uvicorn_thread(app) as base:
        first, second = raw_requests(
            base,
            b"GET /v1/broken-on-purpose HTTP/1.1\r\nHost: x\r\nx-request-id: boom-1\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        )
    assert first.startswith(b"HTTP/1.1 500")
    error = json.loads(first.split(b"\r\n", 1)[1])["error"]
    assert error["message"] == "Internal error: RuntimeError" and error["request_id"] == "boom-1"
    assert second.startswith(b"HTTP/1.1 200") and b'"ok"' in second
    logged = [r for r in request_logs.records if getattr(r, "request_id", "") == "boom-1"]
    assert any(r.exc_info for r in logged)  # the traceback, under the request's id


def test_a_client_that_leaves_still_gets_an_access_line(
    make_settings: Callable[..., Settings], request_logs: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings())
    body = json.dumps({**CHAT, "max_tokens": 1500, "n": 8, "ignore_eos": True}).encode()
    with uvicorn_thread(app) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"x-request-id: gone-1\r\ncontent-type: application/json\r\n"
                         b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = [r.getMessage() for r in request_logs.records
                     if r.name == "ember.access" and getattr(r, "request_id", "") == "gone-1"]
            if lines:
                break
            time.sleep(0.1)
    assert lines and '"POST /v1/chat/completions" 499' in lines[0], lines


async def test_a_model_failing_inside_a_batch_fails_that_batch_only(
    make_settings: Callable[..., Settings], request_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One decode step raising (a fault injected into the loaded model) fails the requests in
    that step with a 500 naming the model; the server keeps serving the next ones."""
    async with serve_in_process(make_settings()) as served:
        await served.http.post("/v1/models/load", json={"model": "tiny-chat"})
        slot = next(s for s in served.app.state.engine.manager._slots.values()
                    if s.entry.id == "tiny-chat")
        backend = slot.adapter
        real_execute = backend.execute
        calls = {"n": 0}

        def fails_once(plan: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected fault")
            return real_execute(plan)

        monkeypatch.setattr(backend, "execute", fails_once)
        failed = await served.http.post("/v1/chat/completions", json=CHAT,
                                        headers={"x-request-id": "fault-1"})
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert "tiny-chat" in error["message"] and "injected fault" in error["message"]
        assert error["request_id"] == "fault-1"
        ok = await served.http.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200, ok.text
        logged = [r for r in request_logs.records
                  if r.exc_info and "fault-1" in r.getMessage()]
        assert logged, "the step failure is logged with the ids of the requests it failed"


async def test_metrics_show_time_to_first_token_inter_token_times_and_kv_use(
    served: Served,
) -> None:
    ok = await served.http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5,
                                                               "ignore_eos": True})
    assert ok.status_code == 200
    text = (await served.http.get("/metrics")).text

    def sample(name: str) -> float:
        line = next(line for line in text.splitlines()
                    if line.startswith(name) and 'model="tiny-chat"' in line)
        return float(line.rsplit(" ", 1)[1])

    assert sample("ember_time_to_first_token_seconds_count") >= 1
    assert sample("ember_inter_token_seconds_count") >= 4
    assert 0 <= sample("ember_kv_cache_used_ratio") <= 1


async def test_a_stuck_step_ends_its_requests_with_504_and_the_model_recovers(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decode step that hangs (injected: it waits on an event) ends the requests it holds,
    and those that arrive meanwhile, with 504 past step_timeout_s; once the step returns the
    model serves again."""
    async with serve_in_process(make_settings(step_timeout_s=0.5)) as served:
        await served.http.post("/v1/models/load", json={"model": "tiny-chat"})
        backend = served.app.state.engine.manager.slot("tiny-chat").adapter
        real_execute = backend.execute
        release = threading.Event()

        def hangs(plan: Any) -> Any:
            release.wait(30)
            return real_execute(plan)

        monkeypatch.setattr(backend, "execute", hangs)
        async def chat(after_s: float) -> httpx.Response:
            await asyncio.sleep(after_s)
            return await served.http.post("/v1/chat/completions", json=CHAT)

        started = time.monotonic()
        stuck, arrived_later = await asyncio.gather(chat(0), chat(0.2))
        assert time.monotonic() - started < 10
        for response in (stuck, arrived_later):
            assert response.status_code == 504, response.text
            assert "step_timeout_s" in response.json()["error"]["message"]
        monkeypatch.setattr(backend, "execute", real_execute)
        release.set()
        deadline = time.monotonic() + 10
        while served.app.state.engine.manager.compute.stuck(0.5) is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        ok = await served.http.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200, ok.text
        scheduler = served.app.state.engine.manager.slot("tiny-chat").runner
        assert scheduler.pending == 0 and scheduler.active_sequences == 0
