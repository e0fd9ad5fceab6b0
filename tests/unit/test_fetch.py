"""The guarded image fetcher: address vetting, data: URIs, schemes, and image routing."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest

from engine.contracts.chat import ChatMessage, GenerationRequest, ImageInput, SamplingParams
from engine.core.errors import (
    InvalidRequestError,
    ModelUnavailableError,
    UnsupportedFeatureError,
    WrongTaskError,
)
from engine.core.registry import ModelEntry, Registry
from engine.core.settings import Settings
from engine.core.sources import is_installed
from engine.generation.vision import chat_entry
from engine.media.fetch import AUDIO, address_refusal, decode_data_uri, fetch_image, vet_media_url

PARAM = "messages[0].content[1].image_url.url"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "not publicly routable"),  # carrier-grade NAT
        ("0.0.0.0", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "private"),  # documentation range
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),
        ("::ffff:127.0.0.1", "a loopback address (as ::ffff:7f00:1)"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback address (inside 2002:7f00:1::)"),  # 6to4 around 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 around 169.254.169.254
        ("::127.0.0.1", "reserved"),  # the deprecated IPv4-compatible form
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    refusal = address_refusal(ipaddress.ip_address(address))
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111",
                "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_data_uris_decode_only_images_within_the_cap() -> None:
    data = b"\x89PNG fake bytes"
    encoded = base64.b64encode(data).decode()
    assert decode_data_uri(f"data:image/png;base64,{encoded}", PARAM, 100) == data
    assert decode_data_uri(f"data:IMAGE/JPEG;BASE64,{encoded}", PARAM, 100) == data
    assert decode_data_uri("data:image/svg+xml,%3Csvg%2F%3E", PARAM, 100) == b"<svg/>"
    cases = [
        (f"data:text/plain;base64,{encoded}", "image/* type"),
        (f"data:;base64,{encoded}", "image/* type"),
        ("data:image/png;base64,***", "not valid base64"),
        ("data:image/png;base64,", "no data"),
        ("data:image/png", "no ','"),
        (f"data:image/png;base64,{encoded * 10}", "the limit is 100 bytes"),
    ]
    for uri, words in cases:
        with pytest.raises(InvalidRequestError) as caught:
            decode_data_uri(uri, PARAM, 100)
        assert words in caught.value.message and caught.value.param == PARAM


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc/passwd", "'file' scheme"),
        ("ftp://example.com/a.png", "'ftp' scheme"),
        ("javascript:alert(1)", "'javascript' scheme"),
        ("http:///a.png", "no host"),
        ("https://user:pw@example.com/a.png", "credentials"),
        ("http://localhost:9/a.png", "resolves to"),  # a name is vetted after resolving it
        ("http://127.1:9/a.png", "loopback"),
        ("http://[fe80::1]:9/a.png", "link-local"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://no-such-host.invalid/a.png", "cannot resolve"),
    ],
)
async def test_refused_urls_never_connect(url: str, words: str) -> None:
    settings = Settings(preload=[], fetch_timeout_s=5)
    with pytest.raises(InvalidRequestError) as caught:
        await fetch_image(url, settings, PARAM)
    assert words in caught.value.message
    assert caught.value.param == PARAM and caught.value.status_code == 400


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc/passwd", "'file' scheme"),
        ("gopher://127.0.0.1:9/_x", "'gopher' scheme"),
        ("http://127.0.0.1:9/a.png", "loopback"),
        ("http://0x7f000001:9/a.png", "loopback"),
        ("http://[::ffff:10.0.0.1]/a.png", "private"),
        ("http://localhost:9/a.png", "resolves to"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://user:pw@example.com/a.png", "credentials"),
        ("data:text/plain;base64,aGVsbG8=", "image/* type"),
        ("http://no-such-host.invalid/a.png", "cannot resolve"),
    ],
)
async def test_vetting_a_url_refuses_without_connecting(url: str, words: str) -> None:
    settings = Settings(preload=[], fetch_timeout_s=5)
    with pytest.raises(InvalidRequestError) as caught:
        await vet_media_url(url, settings, PARAM)
    assert words in caught.value.message and caught.value.param == PARAM


async def test_vetting_decodes_data_uris_and_passes_public_urls() -> None:
    settings = Settings(preload=[])
    encoded = base64.b64encode(b"RIFF fake wav").decode()
    assert await vet_media_url(f"data:audio/wav;base64,{encoded}", settings, "audio.url",
                               AUDIO) == b"RIFF fake wav"
    with pytest.raises(InvalidRequestError, match="audio/\\* type"):
        await vet_media_url(f"data:image/png;base64,{encoded}", settings, "audio.url", AUDIO)
    # A public literal address passes: nothing is fetched (fetch_media does that later).
    assert await vet_media_url("http://93.184.215.14/a.png", settings, PARAM) is None


async def test_allowing_private_addresses_still_refuses_other_schemes() -> None:
    settings = Settings(preload=[], fetch_allow_private=True)
    with pytest.raises(InvalidRequestError, match="'file' scheme"):
        await fetch_image("file:///etc/hosts", settings, PARAM)
    # Nothing listens on port 9 (discard) here: the connection itself fails, still a 400.
    with pytest.raises(InvalidRequestError, match="failed"):
        await fetch_image("http://127.0.0.1:9/a.png", settings, PARAM)


# -- which model serves images ----------------------------------------------------------------


def _request(model: str, images: bool = True) -> GenerationRequest:
    image = ImageInput(url="data:", param=PARAM, part="messages[0].content[1]")
    parts: tuple[str | ImageInput, ...] = ("look", image) if images else ()
    return GenerationRequest(model=model, params=SamplingParams(),
                             messages=[ChatMessage("user", "look", parts=parts)])


def _entry(id: str, task: str, source: str, **extra: object) -> ModelEntry:
    return ModelEntry.model_validate(
        {"id": id, "task": task, "adapter": "x:Y", "source": source, **extra}
    )


def test_images_route_to_vision_models(tmp_path: Path) -> None:
    here, missing = str(tmp_path), str(tmp_path / "missing")
    registry = Registry([
        _entry("chat", "chat", here),
        _entry("sees", "chat", here, options={"vision_model": "vlm"}),
        _entry("sees-nothing", "chat", here, options={"vision_model": "vlm-missing"}),
        _entry("vlm", "vision", here),
        _entry("vlm-missing", "vision", missing, install_hint="ember pull vlm-missing"),
        _entry("embed", "embedding", here),
    ])
    assert chat_entry(registry, _request("vlm")).id == "vlm"
    assert chat_entry(registry, _request("vlm", images=False)).id == "vlm"
    assert chat_entry(registry, _request("chat", images=False)).id == "chat"
    assert chat_entry(registry, _request("sees")).id == "vlm"
    assert chat_entry(registry, _request("sees", images=False)).id == "sees"
    with pytest.raises(UnsupportedFeatureError) as caught:
        chat_entry(registry, _request("chat"))
    assert caught.value.param == "messages[0].content[1]"
    assert "cannot see images" in caught.value.message and "vlm" in caught.value.message
    assert "vlm-missing" not in caught.value.message  # only installed ones are offered
    with pytest.raises(ModelUnavailableError, match="ember pull vlm-missing"):
        chat_entry(registry, _request("sees-nothing"))
    # Named directly, a vision model that is not installed is refused before any image is
    # fetched for it; text alone still resolves (the model manager says it is missing).
    with pytest.raises(ModelUnavailableError, match="vlm-missing"):
        chat_entry(registry, _request("vlm-missing"))
    assert chat_entry(registry, _request("vlm-missing", images=False)).id == "vlm-missing"
    with pytest.raises(WrongTaskError):
        chat_entry(registry, _request("embed", images=False))


def test_without_an_installed_vision_model_the_400_says_how_to_get_one(tmp_path: Path) -> None:
    registry = Registry([
        _entry("chat", "chat", str(tmp_path)),
        _entry("smolvlm", "vision", "ember-tests/never-downloaded"),  # an HF repo id
    ])
    with pytest.raises(UnsupportedFeatureError) as caught:
        chat_entry(registry, _request("chat"))
    assert "No vision model is installed" in caught.value.message
    assert "ember pull smolvlm" in caught.value.message


def test_packaged_vision_presets() -> None:
    registry = Registry.from_settings(Settings(preload=[]))
    presets = [e for e in registry.entries() if e.task == "vision"]
    assert {e.id for e in presets} >= {"smolvlm-256m-instruct", "qwen2.5-vl-3b-instruct"}
    assert all(e.adapter == "models.vision:VisionChat" and not e.default for e in presets)
    default_chat = registry.default_for("chat")
    assert default_chat is not None
    assert default_chat.options["vision_model"] == "smolvlm-256m-instruct"
    # An HF repo id counts as installed only when it is in the local HF cache.
    assert not is_installed(_entry("vlm", "vision", "ember-tests/never-downloaded"))
