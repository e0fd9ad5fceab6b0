"""Vision chat through the real `openai` client: a tiny random LLaVA served by the chat
scheduler, image routing, and the guarded fetcher against a real local HTTP server."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import openai
import pytest
from PIL import Image

from engine.core.settings import Settings
from engine.generation.service import prompt_input
from tests.conftest import Served, http_server_thread, serve_in_process
from tests.vision_checks import generate_greedy, image_request

QUESTION = "What is in this picture?"
IMAGE_TOKENS = 16  # the tiny LLaVA: 32x32 pixels in 8x8 patches


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


RED, BLUE = data_uri(png((230, 20, 20))), data_uri(png((20, 20, 230)))


def image_message(url: str, text: str = QUESTION) -> list[Any]:
    return [{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
    ]}]


async def ask(served: Served, messages: list[Any], model: str = "tiny-vision",
              **extra: Any) -> Any:
    return await served.openai.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, **extra
    )


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    error: dict[str, Any] = body["error"]
    return error


# -- a real local HTTP server -------------------------------------------------------------------


class ImageServer:
    """Serves /x.png (a PNG), /page.html (text/html), /moved (302 to /x.png), /slow (answers
    after 3 s), anything else 404; records every request path it receives."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.png = png((20, 230, 20))
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.paths.append(self.path)
                if self.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", "/x.png")
                    self.end_headers()
                    return
                if self.path == "/slow":
                    time.sleep(3)
                body, kind = {
                    "/x.png": (owner.png, "image/png"), "/slow": (owner.png, "image/png"),
                    "/page.html": (b"<html>not an image</html>", "text/html; charset=utf-8"),
                }.get(self.path, (b"", ""))
                try:
                    self.send_response(200 if kind else 404)
                    self.send_header("Content-Type", kind or "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the fetcher gave up first (the timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http_server_thread(Handler)
        self.port = self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
async def served_private(make_settings: Callable[..., Settings]) -> AsyncIterator[Served]:
    """A server whose operator allows fetching from private addresses (the local server)."""
    settings = make_settings(fetch_allow_private=True, fetch_timeout_s=1.0, fetch_max_bytes=4096)
    async with serve_in_process(settings) as value:
        yield value


# -- vision chat ----------------------------------------------------------------------------


async def test_vision_chat_with_a_data_uri_counts_image_tokens(served: Served) -> None:
    seen = await ask(served, image_message(RED), extra_body={"ignore_eos": True})
    blind = await ask(served, [{"role": "user", "content": QUESTION}],
                      extra_body={"ignore_eos": True})
    assert seen.object == "chat.completion" and seen.model == "tiny-vision"
    assert seen.choices[0].finish_reason == "length"
    assert seen.usage is not None and blind.usage is not None
    assert seen.usage.completion_tokens == 8
    # The one `<image>` placeholder expands to the image's tokens.
    assert seen.usage.prompt_tokens == blind.usage.prompt_tokens + IMAGE_TOKENS
    # The model sees the picture: another image gives another answer.
    other = await ask(served, image_message(BLUE), extra_body={"ignore_eos": True})
    assert other.choices[0].message.content != seen.choices[0].message.content


async def test_streamed_vision_chat_equals_the_plain_reply(served: Served) -> None:
    plain = await ask(served, image_message(RED))
    stream = await ask(served, image_message(RED), stream=True,
                       stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert text == plain.choices[0].message.content
    assert usage is not None and plain.usage is not None
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage.completion_tokens == plain.usage.completion_tokens


async def test_replies_match_transformers_generate(served: Served) -> None:
    """The scheduler's multimodal prefill and shared decode give what plain `generate` gives
    on the same checkpoint, while image and text requests share the batch."""
    adapter = (await served.app.state.engine.manager.load("tiny-vision")).adapter
    expected = [
        generate_greedy(adapter, prompt_input(adapter, image_request(color, QUESTION)))
        for color in ((230, 20, 20), (20, 20, 230))
    ]
    replies = await asyncio.gather(
        ask(served, image_message(RED)), ask(served, [{"role": "user", "content": "Hi"}]),
        ask(served, image_message(BLUE)), ask(served, [{"role": "user", "content": "Hello"}]),
    )
    assert [replies[0].choices[0].message.content,
            replies[2].choices[0].message.content] == expected


async def test_n_choices_and_several_images(served: Served) -> None:
    two_images = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": RED}}, {"type": "text", "text": "and"},
        {"type": "input_image", "image_url": BLUE},
    ]}]
    reply = await ask(served, two_images, n=2, extra_body={"ignore_eos": True})
    one = await ask(served, image_message(RED, "and"), extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy
    assert reply.usage is not None and one.usage is not None
    assert reply.usage.completion_tokens == 16
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens + IMAGE_TOKENS


async def test_vision_model_serves_text_only_chat(served: Served) -> None:
    reply = await ask(served, [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": QUESTION}])
    assert reply.choices[0].finish_reason in ("stop", "length")


async def test_chat_model_hands_images_to_its_vision_model(served: Served) -> None:
    direct = await ask(served, image_message(RED))
    routed = await ask(served, image_message(RED), model="tiny-chat-sees")
    assert routed.model == "tiny-chat-sees"
    assert routed.choices[0].message.content == direct.choices[0].message.content
    assert routed.usage == direct.usage
    text_only = await ask(served, [{"role": "user", "content": QUESTION}],
                          model="tiny-chat-sees")
    tiny_chat = await ask(served, [{"role": "user", "content": QUESTION}], model="tiny-chat")
    assert text_only.choices[0].message.content == tiny_chat.choices[0].message.content


async def test_image_to_a_chat_only_model_is_400_naming_the_vision_models(
    served: Served,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(served, image_message(RED), model="tiny-chat")
    assert caught.value.param == "messages[0].content[1]"
    assert "cannot see images" in caught.value.message
    assert "tiny-vision" in caught.value.message


# -- bad images and refused URLs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (data_uri(b"hello", "text/plain"), "image/*"),
        ("data:image/png;base64,!!not-base64!!", "base64"),
        ("data:image/png;base64,AAAA", "decoded"),
        ("data:image/png;base64", "','"),
        ("file:///etc/passwd", "'file' scheme"),
        ("ftp://example.com/x.png", "'ftp' scheme"),
        ("gopher://example.com/x.png", "'gopher' scheme"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::ffff:169.254.169.254]/latest", "link-local"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://user:secret@example.com/x.png", "credentials"),
        ("   ", "non-empty"),
    ],
)
async def test_bad_image_urls_are_400_naming_the_field(
    served: Served, url: str, words: str
) -> None:
    body = {"model": "tiny-vision", "messages": image_message(url)}
    response = await served.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    part = "messages[0].content[1]"
    assert error["param"] in (part, f"{part}.image_url.url")
    assert words in error["message"]
    assert (await ask(served, image_message(RED))).choices  # still serving


async def test_loopback_urls_are_refused_without_a_request(
    served: Served, image_server: ImageServer
) -> None:
    before = len(image_server.paths)
    for url in (
        image_server.url("/x.png"), image_server.url("/x.png", "localhost"),
        image_server.url("/x.png", "[::1]"), image_server.url("/x.png", "[::ffff:127.0.0.1]"),
        image_server.url("/x.png", "2130706433"),  # 127.0.0.1 as one number
        image_server.url("/moved"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(served, image_message(url))
        assert caught.value.param == "messages[0].content[1].image_url.url"
        assert "loopback" in caught.value.message, caught.value.message
    with pytest.raises(openai.BadRequestError):  # a stream is refused before it starts
        await ask(served, image_message(image_server.url("/x.png")), stream=True)
    assert image_server.paths[before:] == []  # not one request reached it


async def test_missing_url_and_too_many_images_are_400(served: Served) -> None:
    body = {"model": "tiny-vision", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"detail": "high"}}]}]}
    response = await served.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == "messages[0].content[0].image_url.url"
    many = [{"type": "image_url", "image_url": {"url": RED}}] * 17
    body = {"model": "tiny-vision", "messages": [{"role": "user", "content": many}]}
    response = await served.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert "at most 16" in error_of(response)["message"]


# -- fetching, where the operator allows private addresses ----------------------------------


async def test_allowed_fetch_serves_a_png_and_follows_a_redirect(
    served_private: Served, image_server: ImageServer
) -> None:
    by_url = await ask(served_private, image_message(image_server.url("/x.png")))
    by_data = await ask(served_private, image_message(data_uri(image_server.png)))
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    assert by_url.usage == by_data.usage
    moved = await ask(served_private, image_message(image_server.url("/moved")))
    assert moved.choices[0].message.content == by_data.choices[0].message.content
    assert image_server.paths[-2:] == ["/moved", "/x.png"]


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/page.html", "text/html, not an image"),
        ("/missing.png", "HTTP 404"),
        ("/slow", "longer than 1s"),
    ],
)
async def test_allowed_fetch_refuses_what_is_not_an_image(
    served_private: Served, image_server: ImageServer, path: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(served_private, image_message(image_server.url(path)))
    assert caught.value.param == "messages[0].content[1].image_url.url"
    assert words in caught.value.message


async def test_fetch_and_data_uri_size_caps(served_private: Served) -> None:
    big = data_uri(png((1, 2, 3), (400, 400)) + b"\0" * 8192)
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(served_private, image_message(big))
    assert "limit is 4096 bytes" in caught.value.message
