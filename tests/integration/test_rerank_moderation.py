"""Rerank (raw httpx: the openai client has no rerank) and moderation (the real `openai` client),
on the packaged defaults and on tiny random checkpoints, plus every bad input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from engine.contracts.ranking import MODERATION_CATEGORIES
from engine.core.settings import Settings
from tests.conftest import Served, serve_in_process

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are rich in potassium and easy to digest.",
    "Paris is the capital and largest city of France.",
    "The stock market fell sharply on Monday.",
]
ABUSIVE = "You are a worthless idiot, shut up you stupid piece of shit."
NEUTRAL = "Could you recommend a good book about gardening?"


async def rerank(served: Served, **body: Any) -> Any:
    response = await served.http.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def refused(served: Served, path: str, body: dict[str, Any], status: int = 400) -> Any:
    response = await served.http.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- rerank --------------------------------------------------------------------------------------


async def test_packaged_biencoder_ranks_the_relevant_document_first(served: Served) -> None:
    reply = await rerank(served, model="rerank", query=QUERY, documents=DOCUMENTS)
    assert reply["model"] == "rerank"
    assert reply["id"].startswith("rerank-")
    assert reply["results"][0]["index"] == 1
    scores = [r["relevance_score"] for r in reply["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert scores[0] > scores[1] + 0.3  # clearly apart, not a coin toss
    assert all("document" not in r for r in reply["results"])
    assert reply["usage"]["total_tokens"] > 20


async def test_top_n_and_return_documents(served: Served) -> None:
    documents = [DOCUMENTS[0], {"text": DOCUMENTS[1]}, DOCUMENTS[2]]
    reply = await rerank(served, query=QUERY, documents=documents, top_n=2,
                         return_documents=True, rank_fields=["text"])  # unknown field: ignored
    assert reply["model"] == "minilm-biencoder-rerank"  # no model: the default reranker
    assert len(reply["results"]) == 2
    assert reply["results"][0] == {
        "index": 1, "relevance_score": pytest.approx(reply["results"][0]["relevance_score"]),
        "document": {"text": DOCUMENTS[1]},
    }
    big = await rerank(served, model="rerank", query=QUERY, documents=DOCUMENTS, top_n=50)
    assert len(big["results"]) == 3


async def test_tiny_cross_encoder_returns_the_same_shape(served: Served) -> None:
    reply = await rerank(served, model="tiny-cross-encoder", query=QUERY, documents=DOCUMENTS,
                         return_documents=True)
    results = reply["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores)  # sigmoid of the single logit
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in results)
    again = await rerank(served, model="tiny-cross-encoder", query=QUERY, documents=DOCUMENTS,
                         return_documents=True)
    assert again["results"] == results  # deterministic, batched with itself or not
    # One item per pair: [CLS] query [SEP] document [SEP], counted for each document.
    assert reply["usage"]["total_tokens"] > 3 * 10


async def test_more_documents_than_the_queue_holds(
    make_settings: Callable[..., Settings],
) -> None:
    documents = [f"document number {i} about France" for i in range(40)] + [DOCUMENTS[1]]
    async with serve_in_process(make_settings(max_queue_per_model=16)) as fresh:
        reply = await rerank(fresh, model="rerank", query=QUERY, documents=documents, top_n=1)
    assert reply["results"][0]["index"] == 40


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "rerank", "query": QUERY, "documents": []}, "documents"),
    ({"model": "rerank", "query": QUERY, "documents": ["a", ""]}, "documents[1]"),
    ({"model": "rerank", "query": QUERY, "documents": ["a", {"title": "x"}]}, "documents[1].text"),
    ({"model": "rerank", "query": QUERY, "documents": ["a"], "top_n": 0}, "top_n"),
    ({"model": "rerank", "query": QUERY, "documents": ["a"], "top_n": -3}, "top_n"),
    ({"model": "rerank", "documents": ["a"]}, "query"),
    ({"model": "rerank", "query": "", "documents": ["a"]}, "query"),
    ({"model": "rerank", "query": QUERY, "documents": "a"}, "documents"),
    ({"model": "all-minilm-l6-v2", "query": QUERY, "documents": ["a"]}, "model"),
    ({"model": "tiny-cross-encoder", "query": QUERY, "documents": ["a", "word " * 100]},
     "documents[1]"),
    ({"model": "rerank", "query": QUERY, "documents": ["a", "word " * 300]}, "documents[1]"),
])
async def test_bad_rerank_requests_are_400_naming_the_field(
    served: Served, body: dict[str, Any], param: str
) -> None:
    error = await refused(served, "/v1/rerank", body)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_too_many_documents_states_the_limit(make_settings: Callable[..., Settings]) -> None:
    async with serve_in_process(make_settings(max_rerank_documents=3)) as fresh:
        error = await refused(fresh, "/v1/rerank",
                              {"model": "rerank", "query": QUERY, "documents": ["a"] * 4})
        assert error["param"] == "documents"
        assert "at most 3" in error["message"] and "max_rerank_documents" in error["message"]
        ok = await rerank(fresh, model="rerank", query=QUERY, documents=DOCUMENTS)
        assert len(ok["results"]) == 3  # still serving


async def test_unknown_rerank_model_is_404(served: Served) -> None:
    error = await refused(served, "/v1/rerank",
                          {"model": "no-such-reranker", "query": QUERY, "documents": ["a"]}, 404)
    assert error["code"] == "model_not_found"
    assert "minilm-biencoder-rerank" in error["message"]


# -- moderation ----------------------------------------------------------------------------------


async def test_packaged_model_flags_abuse_and_passes_neutral_text(served: Served) -> None:
    reply = await served.openai.moderations.create(
        model="omni-moderation-latest", input=[ABUSIVE, NEUTRAL]
    )
    assert reply.id.startswith("modr-")
    assert reply.model == "omni-moderation-latest"
    abusive, neutral = reply.results
    assert abusive.flagged and abusive.categories.harassment
    assert abusive.category_scores.harassment > 0.9
    assert not neutral.flagged and not neutral.categories.harassment
    assert neutral.category_scores.harassment < 0.2
    # Categories the classifier does not cover: score 0.0, never flagged.
    assert abusive.category_scores.sexual == 0.0 and abusive.categories.sexual is False
    assert abusive.category_scores.illicit_violent == 0.0


async def test_default_model_and_single_string(served: Served) -> None:
    reply = await served.openai.moderations.create(input=ABUSIVE)
    assert reply.model == "profanity-check"
    assert len(reply.results) == 1 and reply.results[0].flagged
    for alias in ("text-moderation-latest", "text-moderation-stable"):
        again = await served.openai.moderations.create(model=alias, input=NEUTRAL)
        assert not again.results[0].flagged


async def test_every_openai_category_is_reported(served: Served) -> None:
    raw = await served.http.post("/v1/moderations", json={"input": NEUTRAL})
    result = raw.json()["results"][0]
    for field in ("categories", "category_scores", "category_applied_input_types"):
        assert set(result[field]) == set(MODERATION_CATEGORIES)


async def test_multimodal_text_parts_are_one_input(served: Served) -> None:
    parts: list[Any] = [
        {"type": "text", "text": "Hello there."}, {"type": "text", "text": ABUSIVE},
    ]
    reply = await served.openai.moderations.create(input=parts)
    assert len(reply.results) == 1 and reply.results[0].flagged


async def test_tiny_transformers_classifier_maps_labels_onto_categories(served: Served) -> None:
    raw = await served.http.post("/v1/moderations",
                                 json={"model": "tiny-moderation", "input": ["hello", "world"]})
    assert raw.status_code == 200, raw.text
    results = raw.json()["results"]
    assert len(results) == 2
    for result in results:
        assert set(result["categories"]) == set(MODERATION_CATEGORIES)
        scores = result["category_scores"]
        for covered in ("harassment", "harassment/threatening", "violence", "sexual"):
            assert 0.0 < scores[covered] < 1.0  # sigmoid of a random logit
        assert scores["harassment/threatening"] == scores["violence"]  # one label, two places
        assert scores["hate"] == 0.0 and scores["self-harm"] == 0.0
        # Thresholds from the registry entry: 0 flags harassment, 1 never flags sexual.
        assert result["categories"]["harassment"] is True
        assert result["categories"]["sexual"] is False
        assert result["flagged"] is True


@pytest.mark.parametrize(("body", "param"), [
    ({"input": []}, "input"),
    ({"input": ["fine", ""]}, "input[1]"),
    ({"input": ""}, "input[0]"),
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
     "input[0]"),
    ({"input": [{"type": "audio"}]}, "input[0]"),
    ({"model": "all-minilm-l6-v2", "input": "hi"}, "model"),
    ({"model": "tiny-moderation", "input": ["ok", "word " * 100]}, "input[1]"),
])
async def test_bad_moderation_requests_are_400_naming_the_field(
    served: Served, body: dict[str, Any], param: str
) -> None:
    error = await refused(served, "/v1/moderations", body)
    assert error["param"] == param


async def test_too_many_inputs_through_the_openai_client(
    make_settings: Callable[..., Settings],
) -> None:
    async with serve_in_process(make_settings(max_embedding_inputs=2)) as fresh:
        with pytest.raises(openai.BadRequestError) as caught:
            await fresh.openai.moderations.create(input=["a", "b", "c"])
        assert "at most 2" in str(caught.value)
        ok = await fresh.openai.moderations.create(input=["a", "b"])
        assert len(ok.results) == 2


async def test_unknown_moderation_model_is_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError):
        await served.openai.moderations.create(model="no-such-moderator", input="hi")
