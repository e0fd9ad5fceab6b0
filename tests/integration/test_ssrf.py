"""SSRF: every URL a caller can hand ember, tried with the addresses an attacker would use.

The URL inputs: OpenAI chat image parts (`image_url.url` and the Responses-style
`input_image`), seed 001 `/v1/ai/vision` images and `/v1/ai/asr` audio (QuantCDN takes images
as base64 bytes only; OpenAI's speech to text takes uploads). Each is sent loopback in every
spelling (dotted, short, decimal, hex, octal, IPv6, IPv4-mapped, `localhost`), private and
link-local addresses, the cloud metadata address, the unspecified address, credentials, other
schemes, a data: URI of the wrong type, and public-looking URLs that redirect to loopback. Each
must be a 400 in the dialect's envelope naming the field, whether the model named is installed,
missing from the disk, routed to a missing vision model, or unknown; and a real listener on
loopback (the port every URL names) must accept no connection at all.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.core.settings import Settings
from engine.media import fetch
from tests.conftest import Served, http_server_thread, serve_in_process

PUBLIC_HOST = "public.test"  # stands in for a public host: see `public_host`


class Sentinel:
    """A TCP listener on 127.0.0.1 (and on ::1, same port, where the host has IPv6) that
    counts every connection it accepts, and closes it at once."""

    def __init__(self) -> None:
        self.connections = 0
        v4 = socket.create_server(("127.0.0.1", 0))
        self.port: int = v4.getsockname()[1]
        self.sockets = [v4]
        # Without IPv6 loopback here, [::1] URLs would find nothing listening anyway.
        with contextlib.suppress(OSError):
            self.sockets.append(socket.create_server(("::1", self.port),
                                                     family=socket.AF_INET6))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self.sockets, [], [], 0.05)
            for listener in ready:
                connection, _ = listener.accept()
                self.connections += 1
                connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for listener in self.sockets:
            listener.close()


class Redirector:
    """An HTTP server on 127.0.0.1 that answers GET /to/<i> with a 302 to `targets[i]`, and
    records the paths asked for."""

    def __init__(self, targets: list[str]) -> None:
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.paths.append(self.path)
                index = int(self.path.rsplit("/", 1)[-1])
                self.send_response(302)
                self.send_header("Location", targets[index])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http_server_thread(Handler)
        self.port = self.httpd.server_address[1]


@pytest.fixture(scope="module")
def sentinel() -> Iterator[Sentinel]:
    listener = Sentinel()
    yield listener
    listener.close()
    assert listener.connections == 0


def redirect_targets(port: int) -> list[tuple[str, str]]:
    """(Location, words the refusal says) of each redirect the redirector answers."""
    return [
        (f"http://127.0.0.1:{port}/x", f"127.0.0.1:{port}"),
        (f"http://localhost:{port}/x", f"localhost:{port}"),
        (f"http://[::1]:{port}/x", f"[::1]:{port}"),
        (f"http://2130706433:{port}/x", f"2130706433:{port}"),
        # Unparsable Locations: httpx refuses them (a 400 here, never a 500).
        (f"http://0177.0.0.1:{port}/x", "location header"),
        (f"http://[::1:{port}/x", "location header"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("file:///etc/passwd", "'file' scheme"),
        (f"gopher://127.0.0.1:{port}/_x", "'gopher' scheme"),
    ]


@pytest.fixture(scope="module")
def redirector(sentinel: Sentinel) -> Iterator[Redirector]:
    server = Redirector([location for location, _ in redirect_targets(sentinel.port)])
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def public_host(monkeypatch: pytest.MonkeyPatch, redirector: Redirector) -> None:
    """`public.test:<redirector port>` passes the fetcher's address vetting as a public host
    would, and its connection goes to the local redirector; every other address (each
    redirect target included) is vetted as usual."""
    vetted = fetch.vetted_address

    async def vetted_or_public(url: httpx.URL, param: str, allow_private: bool,
                               kind: fetch.MediaKind = fetch.IMAGE) -> str:
        if url.host == PUBLIC_HOST and url.port == redirector.port:
            return "127.0.0.1"
        return await vetted(url, param, allow_private, kind)

    monkeypatch.setattr(fetch, "vetted_address", vetted_or_public)


@pytest.fixture(scope="module")
async def served_ssrf(make_settings: Callable[..., Settings],
                      tiny_chat_dir: Path) -> AsyncIterator[Served]:
    """The test registry (fetch_allow_private off, the default) plus a vision model that is
    not installed, and a chat model that hands its images to it."""
    settings = make_settings(fetch_timeout_s=5.0, models=[
        {"id": "absent-vision", "task": "vision", "adapter": "models.vision:VisionChat",
         "source": "package:no_such_package", "install_hint": "pip install absent-vision"},
        {"id": "tiny-chat-sees-absent", "task": "chat", "adapter": "models.chat:TransformersChat",
         "source": str(tiny_chat_dir), "dtype": "float32",
         "options": {"vision_model": "absent-vision"}},
        {"id": "absent-stt", "task": "stt", "adapter": "models.whisper:WhisperSpeechToText",
         "source": "package:no_such_package", "install_hint": "pip install absent-stt"},
    ])
    async with serve_in_process(settings) as value:
        yield value


def url_forms(port: int) -> list[tuple[str, str, str]]:
    """(name, URL, words the refusal says, '|' between alternatives) for every form refused
    without a connection."""
    return [
        ("loopback", f"http://127.0.0.1:{port}/x.png", "loopback"),
        ("loopback, short form", f"http://127.1:{port}/x.png", "loopback"),
        ("loopback, one decimal number", f"http://2130706433:{port}/x.png", "loopback"),
        ("loopback, hex", f"http://0x7f000001:{port}/x.png", "loopback"),
        # httpx refuses the octal form as an invalid IPv4 address; a resolver would read it
        # as 127.0.0.1.
        ("loopback, octal", f"http://0177.0.0.1:{port}/x.png", "loopback|not a valid URL"),
        ("loopback, IPv6", f"http://[::1]:{port}/x.png", "loopback"),
        ("loopback, IPv4-mapped IPv6", f"http://[::ffff:127.0.0.1]:{port}/x.png", "loopback"),
        ("localhost", f"http://localhost:{port}/x.png", "loopback"),
        ("unspecified", f"http://0.0.0.0:{port}/x.png", "unspecified"),
        ("unspecified, IPv6", f"http://[::]:{port}/x.png", "unspecified"),
        ("private 10/8", f"http://10.0.0.1:{port}/x.png", "private"),
        ("private 192.168/16", f"http://192.168.1.1:{port}/x.png", "private"),
        ("private 172.16/12", f"http://172.16.0.1:{port}/x.png", "private"),
        ("cloud metadata", "http://169.254.169.254/latest/meta-data/", "link-local"),
        ("cloud metadata, IPv6", "http://[fd00:ec2::254]/latest/meta-data/", "private"),
        ("link-local IPv6", f"http://[fe80::1]:{port}/x.png", "link-local"),
        ("credentials", f"http://user:secret@127.0.0.1:{port}/x.png", "credentials"),
        ("file", "file:///etc/passwd", "'file' scheme"),
        ("gopher", f"gopher://127.0.0.1:{port}/_GET%20/", "'gopher' scheme"),
        ("ftp", f"ftp://127.0.0.1:{port}/x.png", "'ftp' scheme"),
        ("data: of the wrong type", "data:text/plain;base64,aGVsbG8=", "type"),
    ]


@dataclass(frozen=True)
class UrlInput:
    """One field of one dialect that takes a URL, and how to send a request with it."""

    name: str
    path: str
    param: str
    envelope: str  # "openai" or "infrai"
    body: Callable[[str, str | None], dict[str, Any]]
    models: tuple[str | None, ...]


def _chat_part(url: str, model: str | None) -> dict[str, Any]:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}}]}]}


def _input_image(url: str, model: str | None) -> dict[str, Any]:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "input_image", "image_url": url}]}]}


def _vision(url: str, model: str | None) -> dict[str, Any]:
    return {"prompt": "What is this?", "images": [{"url": url}],
            **({"model": model} if model else {})}


def _asr(url: str, model: str | None) -> dict[str, Any]:
    return {"audio": {"url": url}, **({"model": model} if model else {})}


# Installed, not installed, routed to a vision model that is not installed, unknown.
VISION_MODELS = ("tiny-vision", "absent-vision", "tiny-chat-sees-absent", "no-such-model")
INPUTS = [
    UrlInput("OpenAI chat image_url.url", "/v1/chat/completions",
             "messages[0].content[1].image_url.url", "openai", _chat_part, VISION_MODELS),
    UrlInput("OpenAI chat input_image", "/v1/chat/completions",
             "messages[0].content[0].image_url", "openai", _input_image, VISION_MODELS),
    UrlInput("seed 001 vision images[].url", "/v1/ai/vision", "images[0].url", "infrai",
             _vision, (None, *VISION_MODELS)),
    UrlInput("seed 001 asr audio.url", "/v1/ai/asr", "audio.url", "infrai", _asr,
             (None, "no-such-model")),
]
CASES = [pytest.param(i, m, id=f"{i.name} / {m or 'default model'}")
         for i in INPUTS for m in i.models]


def refusal(response: httpx.Response, url_input: UrlInput) -> dict[str, Any]:
    """The error of a 400 in the input's dialect envelope, naming the input's field."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    if url_input.envelope == "openai":
        assert error["type"] == "invalid_request_error", error
    else:
        assert error["status"] == 400 and error["retryable"] is False, error
    assert error["param"] == url_input.param, error
    return error


@pytest.mark.parametrize(("url_input", "model"), CASES)
async def test_every_url_form_is_refused_without_a_connection(
    served_ssrf: Served, sentinel: Sentinel, url_input: UrlInput, model: str | None,
) -> None:
    for name, url, words in url_forms(sentinel.port):
        response = await served_ssrf.http.post(url_input.path, json=url_input.body(url, model))
        error = refusal(response, url_input)
        assert any(w in error["message"] for w in words.split("|")), (name, error["message"])
    assert sentinel.connections == 0


REDIRECT_CASES = [pytest.param(i, i.models[0], id=i.name) for i in INPUTS]


@pytest.mark.parametrize(("url_input", "model"), REDIRECT_CASES)
async def test_a_redirect_to_loopback_is_refused_before_following_it(
    served_ssrf: Served, sentinel: Sentinel, redirector: Redirector, public_host: None,
    url_input: UrlInput, model: str | None,
) -> None:
    """The first hop is a (stand-in) public host, fetched; the hop it redirects to is vetted as
    any URL is, and refused: the listener it names gets nothing."""
    before = len(redirector.paths)
    targets = redirect_targets(sentinel.port)
    for index, (_, words) in enumerate(targets):
        url = f"http://{PUBLIC_HOST}:{redirector.port}/to/{index}"
        response = await served_ssrf.http.post(url_input.path, json=url_input.body(url, model))
        message = refusal(response, url_input)["message"]
        assert words in message, message
    assert redirector.paths[before:] == [f"/to/{i}" for i in range(len(targets))]
    assert sentinel.connections == 0


@pytest.mark.parametrize(
    ("model", "status"),
    [("absent-vision", 503), ("tiny-chat-sees-absent", 503), ("no-such-model", 404)],
)
async def test_nothing_is_fetched_for_a_vision_model_that_is_not_there(
    served_ssrf: Served, redirector: Redirector, public_host: None, model: str, status: int,
) -> None:
    """A URL that passes vetting is fetched only once the model is known to be installed."""
    before = len(redirector.paths)
    for url_input in INPUTS[:3]:
        url = f"http://{PUBLIC_HOST}:{redirector.port}/to/0"
        response = await served_ssrf.http.post(url_input.path, json=url_input.body(url, model))
        assert response.status_code == status, response.text
    assert redirector.paths[before:] == []


async def test_nothing_is_fetched_for_a_speech_model_that_is_not_there(
    served_ssrf: Served, redirector: Redirector, public_host: None,
) -> None:
    before = len(redirector.paths)
    url = f"http://{PUBLIC_HOST}:{redirector.port}/to/0"
    response = await served_ssrf.http.post("/v1/ai/asr", json=_asr(url, "absent-stt"))
    assert response.status_code == 503 and "pip install absent-stt" in response.text
    assert redirector.paths[before:] == []


@pytest.mark.parametrize("model", VISION_MODELS)
async def test_a_bad_image_in_a_quantcdn_chat_is_400_whatever_the_model(
    served_ssrf: Served, model: str,
) -> None:
    body = {"modelId": model, "messages": [{"role": "user", "content": [
        {"image": {"format": "png", "source": {"bytes": "!!not-base64!!"}}},
        {"text": "What is this?"}]}]}
    response = await served_ssrf.http.post("/api/v3/organizations/acme/ai/chat", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error"] is True and "base64" in error["message"]
    assert error["param"] == "messages[0].content[0].image.source.bytes"


async def test_still_serving_after_every_refusal(served_ssrf: Served, sentinel: Sentinel) -> None:
    reply = await served_ssrf.openai.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.choices
    assert sentinel.connections == 0
