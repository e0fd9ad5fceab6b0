"""API keys from a keys file of salted hashes: scopes (models, routes, QuantCDN organisations),
per-key limits (requests and tokens per minute, concurrent streams) answered with 429 and
Retry-After in each dialect's envelope, every model route behind the key, CORS off unless set,
and the refusal to serve a non-loopback address open."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from engine.core.access import AccessPolicy, KeyFileError, hash_key
from engine.core.settings import Settings
from server.app import create_app
from server.serving import check_exposure, is_loopback
from tests.conftest import serve_in_process, uvicorn_thread

KEYS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (key, entry fields)
    "open": ("key-open-0123456789", {}),
    "chat-only": ("key-chat-0123456789", {"models": ["tiny-chat"]}),
    "embed-route": ("key-embed-0123456789", {"routes": ["/v1/embeddings"]}),
    "org-acme": ("key-acme-0123456789", {"organizations": ["acme"]}),
    "two-a-minute": ("key-rpm-0123456789", {"requests_per_minute": 2}),
    "few-tokens": ("key-tpm-0123456789", {"tokens_per_minute": 5}),
    "one-stream": ("key-stream-0123456789", {"max_concurrent_streams": 1}),
}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "temperature": 0}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    entries = [{"name": name, "hash": hash_key(key), **fields}
               for name, (key, fields) in KEYS.items()]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def test_the_keys_file_holds_no_key_and_a_bad_file_is_refused(
    keys_file: Path, tmp_path: Path
) -> None:
    text = keys_file.read_text()
    assert not any(key in text for key, _ in KEYS.values())
    policy = AccessPolicy([], keys_file)
    assert policy.authenticate(KEYS["open"][0]).name == "open"  # type: ignore[union-attr]
    assert policy.authenticate("key-open-012345678") is None  # one character short
    assert policy.authenticate(None) is None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"keys": [{"name": "x", "hash": "plain-key"}]}))
    with pytest.raises(KeyFileError, match="hash"):
        AccessPolicy([], bad)


async def test_scopes_limit_models_routes_and_organisations(
    make_settings: Callable[..., Settings], keys_file: Path
) -> None:
    async with serve_in_process(make_settings(api_keys_file=keys_file)) as served:
        http = served.http
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 401
        ok = await http.post("/v1/chat/completions", json=CHAT, headers=auth("chat-only"))
        assert ok.status_code == 200, ok.text
        refused = await http.post("/v1/embeddings", headers=auth("chat-only"),
                                  json={"model": "all-minilm-l6-v2", "input": "x"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["param"] == "model"
        assert refused.json()["error"]["code"] == "forbidden"
        # The same scope holds in seed 001's dialect, in its own envelope.
        infrai = await http.post("/v1/ai/embed", headers=auth("chat-only"),
                                 json={"model": "all-minilm-l6-v2", "input": "x"})
        assert infrai.status_code == 403 and infrai.json()["error"]["status"] == 403

        embed = await http.post("/v1/embeddings", headers=auth("embed-route"),
                                json={"model": "all-minilm-l6-v2", "input": "x"})
        assert embed.status_code == 200, embed.text
        other = await http.post("/v1/chat/completions", json=CHAT, headers=auth("embed-route"))
        assert other.status_code == 403 and "/v1/chat/completions" in other.text

        quant = "/api/v3/organizations/{}/ai/embeddings"
        body = {"input": "x", "modelId": "all-minilm-l6-v2"}
        mine = await http.post(quant.format("acme"), json=body, headers=auth("org-acme"))
        assert mine.status_code == 200, mine.text
        theirs = await http.post(quant.format("globex"), json=body, headers=auth("org-acme"))
        assert theirs.status_code == 403 and theirs.json()["error"] is True
        assert theirs.json()["param"] == "organisation"
        anyone = await http.post(quant.format("globex"), json=body, headers=auth("open"))
        assert anyone.status_code == 200


def assert_rate_limited(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert limit in response.text


async def test_per_key_limits_answer_429_with_retry_after_in_each_dialect(
    make_settings: Callable[..., Settings], keys_file: Path
) -> None:
    async with serve_in_process(make_settings(api_keys_file=keys_file)) as served:
        http = served.http
        for _ in range(2):
            assert (await http.get("/v1/models", headers=auth("two-a-minute"))).status_code == 200
        openai_style = await http.get("/v1/models", headers=auth("two-a-minute"))
        assert_rate_limited(openai_style, "requests_per_minute")
        assert openai_style.json()["error"]["code"] == "rate_limit_exceeded"
        infrai = await http.post("/v1/ai/chat", headers=auth("two-a-minute"),
                                 json={"prompt": "hi", "model": "tiny-chat"})
        assert_rate_limited(infrai, "requests_per_minute")
        assert infrai.json()["error"]["retryable"] is True
        quant = await http.post("/api/v3/organizations/acme/ai/embeddings",
                                headers=auth("two-a-minute"),
                                json={"input": "x", "modelId": "all-minilm-l6-v2"})
        assert_rate_limited(quant, "requests_per_minute")
        assert quant.json()["error"] is True
        # Other keys are not held back by this one's limit.
        assert (await http.get("/v1/models", headers=auth("open"))).status_code == 200

        # Tokens: the first reply spends more than 5 tokens (prompt + completion); the next
        # request within the minute is refused.
        first = await http.post("/v1/chat/completions", json=CHAT, headers=auth("few-tokens"))
        assert first.status_code == 200, first.text
        assert_rate_limited(
            await http.post("/v1/chat/completions", json=CHAT, headers=auth("few-tokens")),
            "tokens_per_minute")

        metrics = await http.get("/metrics", headers=auth("open"))
        assert 'ember_rate_limited_total{key="two-a-minute"' in metrics.text
        assert 'limit="tokens_per_minute"' in metrics.text


def test_concurrent_streams_per_key(
    make_settings: Callable[..., Settings], keys_file: Path
) -> None:
    """Over a real socket (the ASGI test transport would buffer the first stream whole). The
    first stream is too long to fit the socket buffers, so it is still running while the
    client does not read it."""
    app = create_app(make_settings(api_keys_file=keys_file))
    with uvicorn_thread(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        long_stream = {**CHAT, "stream": True, "max_tokens": 1500, "n": 8, "ignore_eos": True,
                       "temperature": 1}
        with http.stream("POST", "/v1/chat/completions", json=long_stream,
                         headers=auth("one-stream")) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            second = http.post("/v1/chat/completions", json={**CHAT, "stream": True},
                               headers=auth("one-stream"))
            assert_rate_limited(second, "max_concurrent_streams")
            other_key = http.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                  headers=auth("open"))
            assert other_key.status_code == 200
        # The slot is back once the first stream ended (its client left mid-stream).
        deadline = time.monotonic() + 10
        while True:
            again = http.post("/v1/chat/completions", json={**CHAT, "stream": True},
                              headers=auth("one-stream"))
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert again.status_code == 200, again.text


OPEN_PATHS = {"/health", "/ready"}


def _example_path(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "acme" if m[1] == "organisation" else "x1", path)


async def test_every_route_but_health_needs_a_key(
    make_settings: Callable[..., Settings], keys_file: Path
) -> None:
    """Each dialect's every route (as the app publishes them), asked without a key: 401 in
    its own envelope, before anything else is looked at."""
    async with serve_in_process(make_settings(api_keys_file=keys_file)) as served:
        operations = [(method.upper(), path)
                      for path, item in served.app.openapi()["paths"].items()
                      for method in item]
        assert len(operations) >= 40
        checked = 0
        for method, path in operations:
            response = await served.http.request(method, _example_path(path))
            if path in OPEN_PATHS:
                assert response.status_code in (200, 503), path
                continue
            assert response.status_code == 401, (method, path, response.text)
            body: dict[str, Any] = response.json()
            assert (body.get("error") is True or body["error"]["code"] == "invalid_api_key"
                    ), (path, body)
            checked += 1
        assert checked == len(operations) - len(OPEN_PATHS)


async def test_cors_is_off_unless_origins_are_set(make_settings: Callable[..., Settings]) -> None:
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    async with serve_in_process(make_settings()) as served:
        response = await served.http.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    async with serve_in_process(make_settings(cors_origins="http://example.test")) as served:
        response = await served.http.options("/v1/chat/completions", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://example.test"
        other = await served.http.options("/v1/chat/completions",
                                          headers={**preflight, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers


def test_a_network_address_needs_a_key_unless_open_access_is_chosen(
    make_settings: Callable[..., Settings],
) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")

    def policy(settings: Settings) -> AccessPolicy:
        return AccessPolicy(settings.accepted_keys(), settings.api_keys_file)

    exposed = make_settings(host="0.0.0.0")
    with pytest.raises(SystemExit, match=r"refusing to serve 0\.0\.0\.0 with no API key"):
        check_exposure(exposed, policy(exposed))
    for settings in (make_settings(host="0.0.0.0", api_key="k"),
                     make_settings(host="0.0.0.0", allow_open_access=True),
                     make_settings(host="127.0.0.1")):
        check_exposure(settings, policy(settings))
