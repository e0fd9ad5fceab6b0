"""Embedding backends on the real packaged MiniLM: each serves vectors within its stated
cosine of fp32 torch on a fixed set of texts (not the probe set the load checks); a variant
this machine cannot run, a failed export and a variant below the entry's `min_cosine` each fall
back to fp32 torch with a log line; /v1/models says which backend serves."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.harness import make_sentences
from engine.contracts.base import LoadContext
from engine.contracts.embeddings import EmbeddingRequest
from engine.core.registry import ModelEntry
from engine.core.settings import Settings
from models.embeddings import SentenceTransformerEmbeddings
from models.encoders import PROBE_TEXTS, OnnxEncoder, bf16_problem
from tests.conftest import packaged, serve_in_process

TEXTS = make_sentences(48, seed=7)
# What each backend keeps against fp32 torch on MiniLM (the README's table). int8 is below the
# default entry's 0.99 bar on an AVX2 CPU, so an entry must lower min_cosine to serve it.
STATED_COSINE = {"onnx": 0.9999, "onnx-int8": 0.95, "bf16": 0.995}


def minilm(tmp_path: Path, **options: Any) -> SentenceTransformerEmbeddings:
    entry = ModelEntry(**packaged("all-minilm-l6-v2", options=options))
    context = LoadContext(device="cpu", dtype=torch.float32, models_dir=tmp_path, threads=1)
    adapter = SentenceTransformerEmbeddings(entry, context)
    adapter.load()
    return adapter


def vectors(adapter: SentenceTransformerEmbeddings) -> np.ndarray:
    request = EmbeddingRequest(model=None, texts=TEXTS)
    return np.stack(adapter.batch(adapter.tokenize(request)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return vectors(minilm(tmp_path_factory.mktemp("fp32"), backend="torch"))


def lowest_cosine(found: np.ndarray, reference: np.ndarray) -> float:
    return float((found * reference).sum(axis=1).min())  # unit vectors


def test_the_fixed_set_is_not_the_probe_set() -> None:
    assert not set(TEXTS) & set(PROBE_TEXTS)


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_each_onnx_backend_keeps_its_stated_cosine(
    backend: str, reference: np.ndarray, tmp_path: Path
) -> None:
    adapter = minilm(tmp_path, backend=backend, min_cosine=STATED_COSINE[backend])
    assert adapter.backend_name == backend, adapter.backend_note
    assert lowest_cosine(vectors(adapter), reference) >= STATED_COSINE[backend]
    exported = tmp_path / "onnx"
    (folder,) = exported.iterdir()  # one export per entry and checkpoint fingerprint
    assert folder.name.startswith("all-minilm-l6-v2-")
    # Exported once: a second load reuses the files in the model cache.
    files = {p: p.stat().st_mtime_ns for p in exported.rglob("*.onnx")}
    again = minilm(tmp_path, backend=backend, min_cosine=STATED_COSINE[backend])
    assert {p: p.stat().st_mtime_ns for p in exported.rglob("*.onnx")} == files
    assert again.backend_name == backend


def test_bf16_serves_only_where_the_hardware_has_it(
    reference: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="models.encoders"):
        adapter = minilm(tmp_path, backend="bf16")
    problem = bf16_problem("cpu")
    if problem is None:
        assert adapter.backend_name == "bf16"
        assert lowest_cosine(vectors(adapter), reference) >= STATED_COSINE["bf16"]
    else:  # this CPU: fp32 torch, and the log says why
        assert adapter.backend_name == "torch"
        assert problem in caplog.text and problem in (adapter.backend_note or "")
        assert lowest_cosine(vectors(adapter), reference) > 0.99999


def test_a_failed_export_falls_back_to_torch_with_a_log_line(
    reference: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "not-a-folder"
    cache.write_text("a file where the model cache should be")
    with caplog.at_level(logging.WARNING, logger="models.encoders"):
        adapter = minilm(cache, backend="onnx")
    assert adapter.backend_name == "torch"
    assert "not serving on onnx" in caplog.text
    assert lowest_cosine(vectors(adapter), reference) > 0.99999


def test_a_variant_below_min_cosine_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="models.encoders"):
        adapter = minilm(tmp_path, backend="onnx-int8", min_cosine=1.0)
    assert adapter.backend_name == "torch"
    assert "below the entry's min_cosine 1.0" in caplog.text


def test_auto_serves_the_fastest_variant_that_passes(tmp_path: Path,
                                                     reference: np.ndarray) -> None:
    adapter = minilm(tmp_path, backend="auto", min_cosine=0.99)
    assert adapter.backend_name in ("onnx-int8", "onnx", "bf16", "torch")
    assert "x fp32 torch on the probe batch" in (adapter.backend_note or "") or (
        adapter.backend_name == "torch")
    stated = STATED_COSINE.get(adapter.backend_name, 0.99999)
    assert lowest_cosine(vectors(adapter), reference) >= stated
    assert (tmp_path / "onnx").exists()


async def test_models_lists_the_backend_serving_each_model(
    make_settings: Callable[..., Settings],
) -> None:
    onnx_entry = packaged("all-minilm-l6-v2", id="minilm-onnx", aliases=[], default=False,
                          options={"backend": "onnx"})
    settings = make_settings(models=[onnx_entry], preload=["minilm-onnx", "all-minilm-l6-v2"])
    async with serve_in_process(settings) as served:
        await served.app.state.engine.wait_preloaded()
        onnx = (await served.http.get("/v1/models/minilm-onnx")).json()
        torch_served = (await served.http.get("/v1/models/all-minilm-l6-v2")).json()
        embedded = await served.openai.embeddings.create(model="minilm-onnx", input=TEXTS[:4])
        baseline = await served.openai.embeddings.create(model="all-minilm-l6-v2",
                                                         input=TEXTS[:4])
    assert (onnx["backend"], onnx["dtype"]) == ("onnx", "float32")
    assert "min cosine" in onnx["backend_note"]
    assert torch_served["backend"] == "torch"
    found = np.array([d.embedding for d in embedded.data])
    expected = np.array([d.embedding for d in baseline.data])
    assert lowest_cosine(found, expected) >= STATED_COSINE["onnx"]


def test_a_cross_encoder_serves_on_onnx_with_the_scores_of_torch(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Rerank uses the same backends: a (tiny, random) cross-encoder exported with its
    segment ids scores pairs as fp32 torch does."""
    from models.rerank import CrossEncoderRerank
    from tests.tiny_models import build_tiny_bert_classifier

    source = build_tiny_bert_classifier(tmp_path / "cross-encoder", ["relevance"])
    context = LoadContext(device="cpu", dtype=torch.float32, models_dir=tmp_path, threads=1)

    def reranker(backend: str) -> CrossEncoderRerank:
        entry = ModelEntry(id="tiny-cross", task="rerank",
                           adapter="models.rerank:CrossEncoderRerank", source=str(source),
                           options={"backend": backend})
        adapter = CrossEncoderRerank(entry, context)
        adapter.load()
        return adapter

    on_onnx, on_torch = reranker("onnx"), reranker("torch")
    assert (on_onnx.backend_name, on_torch.backend_name) == ("onnx", "torch")
    query, documents = "what is the capital of france", ["Paris is the capital.", "pizza", ""]
    documents[-1] = "The capital of France is Paris, on the Seine."
    onnx_scores = on_onnx.relevance(on_onnx.batch(on_onnx.prepare(query, documents)))
    torch_scores = on_torch.relevance(on_torch.batch(on_torch.prepare(query, documents)))
    assert np.allclose(onnx_scores, torch_scores, atol=1e-4)
    # Segment ids matter: the pair's second text is type 1 in both.
    runtime = on_onnx._runtime
    assert isinstance(runtime, OnnxEncoder) and "token_type_ids" in runtime.inputs
