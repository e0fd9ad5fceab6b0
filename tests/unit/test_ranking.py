"""Rerank and moderation logic without models: verdicts and thresholds, slicing requests larger
than a model's queue, the wire translation, the moderation options' checks, and the
allow-listed unpickler that loads alt-profanity-check's files."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import torch

from engine.contracts.base import LoadContext
from engine.contracts.ranking import MODERATION_CATEGORIES
from engine.core.batcher import Batcher
from engine.core.compute import ComputeThread
from engine.core.errors import InvalidRequestError, ModelLoadError, UnsupportedFeatureError
from engine.core.registry import ModelEntry, Registry
from engine.core.settings import Settings
from engine.ranking.service import verdict
from models.moderation import DEFAULT_THRESHOLD, ModerationAdapter, load_trusted_joblib
from server.openai.retrieval import document_texts, moderation_texts

COMPUTE = ComputeThread("test-ranking")


def test_verdict_reports_every_category_and_flags_only_covered_ones() -> None:
    thresholds = {c: 0.5 for c in MODERATION_CATEGORIES} | {"hate": 0.9}
    result = verdict({"harassment": 0.7, "hate": 0.8}, thresholds)
    assert set(result.categories) == set(result.category_scores) == set(MODERATION_CATEGORIES)
    assert result.categories["harassment"] and not result.categories["hate"]  # 0.8 < 0.9
    assert result.flagged
    assert result.category_scores["sexual"] == 0.0 and not result.categories["sexual"]
    zero = {c: 0.0 for c in MODERATION_CATEGORIES}
    assert not verdict({}, zero).flagged  # uncovered categories never flag, even at 0


def test_threshold_is_inclusive() -> None:
    thresholds = {c: 0.5 for c in MODERATION_CATEGORIES}
    assert verdict({"violence": 0.5}, thresholds).categories["violence"]
    assert not verdict({"violence": 0.4999}, thresholds).flagged


async def test_requests_larger_than_the_queue_go_in_slices() -> None:
    batcher: Batcher[int, int] = Batcher(
        "slices", lambda items: [i * 2 for i in items], COMPUTE, max_batch_size=4,
        max_wait_ms=1, max_queue=10,
    )
    try:
        assert await batcher.submit_all(list(range(25))) == [i * 2 for i in range(25)]
        assert await batcher.submit_all([1, 2, 3]) == [2, 4, 6]
    finally:
        batcher.shutdown()


def test_documents_may_be_strings_or_text_objects() -> None:
    assert document_texts(["a", {"text": "b", "title": "t"}]) == ["a", "b"]
    with pytest.raises(InvalidRequestError) as caught:
        document_texts(["a", {"title": "t"}])
    assert caught.value.param == "documents[1].text"


def test_moderation_inputs() -> None:
    assert moderation_texts("a") == ["a"]
    assert moderation_texts(["a", "b"]) == ["a", "b"]
    assert moderation_texts([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == [
        "a\nb"
    ]
    with pytest.raises(UnsupportedFeatureError):
        moderation_texts([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])


def adapter(**options: Any) -> ModerationAdapter:
    entry = ModelEntry(id="m", task="moderation", adapter="x:Y", source="s", options=options)
    return ModerationAdapter(entry, LoadContext("cpu", torch.float32, Path(".")))


def test_label_map_merges_labels_and_fans_out() -> None:
    model = adapter(label_map={"insult": "harassment", "toxic": "harassment",
                               "threat": ["harassment/threatening", "violence"]},
                    thresholds={"violence": 0.7})
    model._map_labels(["toxic", "insult", "threat", "obscene"], {})
    scores = model._category_scores(np.array([[0.2, 0.6, 0.3, 0.99]]))[0]
    assert scores == {"harassment": 0.6, "harassment/threatening": 0.3, "violence": 0.3}
    assert model.thresholds["violence"] == 0.7
    assert model.thresholds["hate"] == DEFAULT_THRESHOLD


@pytest.mark.parametrize(("options", "labels", "words"), [
    ({"label_map": {"nope": "harassment"}}, ["toxic"], "does not have"),
    ({"label_map": {"toxic": "rudeness"}}, ["toxic"], "not a moderation category"),
    ({"label_map": {"toxic": "hate"}, "thresholds": {"hate": 2}}, ["toxic"], "between 0 and 1"),
    ({"label_map": {"toxic": "hate"}, "thresholds": {"rude": 0.1}}, ["toxic"], "rude"),
    ({}, ["LABEL_0"], "set options.label_map"),
])
def test_bad_moderation_options_fail_the_load_with_the_reason(
    options: dict[str, Any], labels: list[str], words: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        adapter(**options)._map_labels(labels, {})
    assert words in caught.value.message


class _Payload:
    """Unpickling this would run a command: the allow-list must refuse it before it can."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


def test_trusted_unpickler_loads_numpy_arrays_and_refuses_anything_else(tmp_path: Path) -> None:
    good = tmp_path / "good.joblib"
    joblib.dump(np.arange(4.0), good)
    np.testing.assert_array_equal(load_trusted_joblib(good), np.arange(4.0))
    payloads = [("call.joblib", _Payload()), ("dict.joblib", {"a": _Payload()}),
                ("objects.joblib", np.array([_Payload()], dtype=object))]  # a nested pickle
    for name, payload in payloads:
        bad = tmp_path / name
        joblib.dump(payload, bad)
        with pytest.raises(ModelLoadError) as caught:
            load_trusted_joblib(bad)
        assert "not a trusted type" in caught.value.message
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ModelLoadError):
        load_trusted_joblib(plain)


def test_packaged_registry_names_the_defaults_and_aliases() -> None:
    registry = Registry.from_settings(Settings())
    rerank = registry.default_for("rerank")
    assert rerank is not None and rerank.id == "minilm-biencoder-rerank"
    assert "bi-encoder" in (rerank.description or "")
    assert registry.resolve("rerank", "rerank").id == rerank.id
    moderation = registry.default_for("moderation")
    assert moderation is not None and moderation.id == "profanity-check"
    for alias in ("omni-moderation-latest", "text-moderation-latest", "text-moderation-stable"):
        assert registry.resolve(alias, "moderation").id == "profanity-check"
    assert "pickle" in (moderation.description or "")
