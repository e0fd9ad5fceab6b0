from __future__ import annotations

import pytest
import torch

from engine.types import SamplingParams
from models.decoding import (
    IncrementalDetokenizer,
    StopStringMatcher,
    apply_penalties,
    sample_next,
    sample_rows,
)
from tests.tiny_models import build_tokenizer


def test_greedy_and_degenerate_filters_pick_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2, 2.9], [5.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([1, 0])
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0), None), expected)
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert torch.equal(sample_next(logits, top1, torch.Generator().manual_seed(0)), expected)
    nucleus = SamplingParams(temperature=1.0, top_p=0.01)
    assert torch.equal(sample_next(logits, nucleus, torch.Generator().manual_seed(0)), expected)


def test_top_p_keeps_exactly_the_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two, never the third.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(2000, 1)
    params = SamplingParams(temperature=1.0, top_p=0.7)
    picks = sample_next(logits, params, torch.Generator().manual_seed(1))
    assert set(picks.tolist()) == {0, 1}


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=1.0)
    first = sample_next(logits, params, torch.Generator().manual_seed(5))
    again = sample_next(logits, params, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)


def test_penalties_follow_openai_formula() -> None:
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    apply_penalties(logits, counts, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert torch.allclose(logits, torch.tensor([[0.0, -0.75, -1.25]]))


def test_detokenizer_never_splits_a_multibyte_character() -> None:
    tokenizer = build_tokenizer()
    text = "Café 🙂🙂 日本語, naïve résumé ☕"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text) // 2  # unseen characters really are split into byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(token) for token in ids]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_stop_matcher_finds_stops_across_deltas_and_holds_back_prefixes() -> None:
    stops = StopStringMatcher(["###", "END"])
    assert stops.find("abc #", 3) == -1
    assert stops.find("abc ###", 5) == 4  # a stop that started in an earlier delta
    assert stops.safe_length("hello #") == 6
    assert stops.safe_length("hello ##") == 6
    assert stops.safe_length("hello EN") == 6
    assert stops.safe_length("hello") == 5
    assert StopStringMatcher([]).safe_length("abc") == 3


@pytest.mark.parametrize("text", ["", "x"])
def test_stop_matcher_edge_cases(text: str) -> None:
    assert StopStringMatcher(["xyz"]).find(text, 0) == -1


def test_batched_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).repeat(6000, 1)
    picks = sample_rows(logits, [SamplingParams(temperature=1.0)] * 6000, [None] * 6000)
    share = torch.bincount(picks, minlength=4).float() / 6000
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03)


def test_seeded_row_is_the_same_alone_or_in_a_batch() -> None:
    logits = torch.randn(5, 100)
    params = [SamplingParams(temperature=0.8, top_p=0.9 if i % 2 else 1.0, top_k=20 * i)
              for i in range(5)]

    def generators() -> list[torch.Generator | None]:
        return [torch.Generator().manual_seed(i) if i != 2 else None for i in range(5)]

    together = sample_rows(logits.clone(), params, generators())
    for row in (0, 1, 3, 4):
        alone = sample_rows(logits[row:row + 1].clone(), [params[row]], [generators()[row]])
        assert int(alone[0]) == int(together[row])
