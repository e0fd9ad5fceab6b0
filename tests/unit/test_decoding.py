"""The core's sampler, detokenizer and stop strings, on plain numpy logits (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.contracts.chat import Sampling, SamplingParams
from engine.core.sampling import CANDIDATES, SamplerState, apply_penalties, choose_tokens
from engine.generation.text_stream import IncrementalDetokenizer, StopStringMatcher
from tests.tiny_models import build_tokenizer


def states(sampling: Sampling, rows: int, vocab: int, seed_offset: int = 0) -> list[SamplerState]:
    return [SamplerState(sampling, vocab, [], index + seed_offset) for index in range(rows)]


def picks(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    return np.array(choose_tokens(logits, states(sampling, len(logits), logits.shape[1])))


def test_greedy_and_degenerate_filters_pick_the_argmax() -> None:
    logits = np.array([[0.1, 3.0, 0.2, 2.9], [5.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    for sampling in (Sampling(temperature=0), Sampling(temperature=1.0, top_k=1, seed=0),
                     Sampling(temperature=1.0, top_p=0.01, seed=0),
                     Sampling(temperature=1.0, min_p=0.99, seed=0)):
        assert picks(logits, sampling).tolist() == [1, 0]


def test_top_p_keeps_exactly_the_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two, never the third.
    logits = np.log(np.array([[0.5, 0.3, 0.2]])).repeat(2000, axis=0)
    assert set(picks(logits, Sampling(temperature=1.0, top_p=0.7, seed=1)).tolist()) == {0, 1}


def test_top_p_beyond_the_candidates_uses_the_whole_row() -> None:
    # A flat row: the first CANDIDATES tokens hold a fraction of the mass, top_p 0.9 needs more.
    vocab = CANDIDATES * 8
    logits = np.zeros((400, vocab), dtype=np.float32)
    chosen = picks(logits, Sampling(temperature=1.0, top_p=0.9, seed=3))
    assert len(set(chosen.tolist())) > CANDIDATES  # tokens outside the first candidates


def test_min_p_drops_unlikely_tokens() -> None:
    logits = np.log(np.array([[0.6, 0.3, 0.05, 0.05]])).repeat(3000, axis=0)
    assert set(picks(logits, Sampling(temperature=1.0, min_p=0.2, seed=2)).tolist()) == {0, 1}


def test_seeded_sampling_is_reproducible_and_choices_differ() -> None:
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    sampling = Sampling(temperature=1.0, seed=5)
    first = [choose_tokens(logits, states(sampling, 4, 50)) for _ in range(2)]
    assert first[0] == first[1]
    many = np.repeat(logits[:1], 64, axis=0)
    assert len(set(choose_tokens(many, states(sampling, 64, 50)))) > 1  # seed + index


def test_seeds_of_any_64_bit_value_work() -> None:
    logits = np.zeros((1, 10), dtype=np.float32)
    for seed in (-(2**63), -1, 0, 2**64 - 1):
        assert 0 <= picks(logits, Sampling(temperature=1.0, seed=seed))[0] < 10


def test_penalties_follow_openai_and_hf_formulas() -> None:
    sampling = Sampling(presence_penalty=0.5, frequency_penalty=0.25)
    state = SamplerState(sampling, 3, [], 0)
    for token in (1, 2, 2, 2):
        state.record(token)
    row = apply_penalties(np.zeros(3, dtype=np.float32), state)
    assert np.allclose(row, [0.0, -0.75, -1.25])
    repeat = SamplerState(Sampling(repetition_penalty=2.0), 3, [0], 0)  # the prompt counts
    repeat.record(1)
    assert np.allclose(apply_penalties(np.array([2.0, -2.0, 2.0], np.float32), repeat),
                       [1.0, -4.0, 2.0])


def test_a_penalty_changes_a_greedy_choice() -> None:
    logits = np.array([[3.0, 2.9, 0.0]], dtype=np.float32)
    state = SamplerState(Sampling(temperature=0, frequency_penalty=1.0), 3, [], 0)
    state.record(0)
    assert choose_tokens(logits, [state]) == [1]


def test_resolved_sampling_takes_request_then_model_then_openai_defaults() -> None:
    model = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 256}
    config = {"temperature": 0.6, "top_k": 20}
    settled = SamplingParams(top_p=0.5).resolved(model, config)
    assert (settled.temperature, settled.top_p, settled.top_k, settled.max_tokens) == (
        0.2, 0.5, 20, 256)
    assert SamplingParams(temperature=0).resolved(model).temperature == 0  # 0 is a value
    assert SamplingParams().resolved() == Sampling()


def test_batched_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.2, 1e-12]])).repeat(6000, axis=0)
    share = np.bincount(picks(logits, Sampling(temperature=1.0)), minlength=4) / 6000
    assert np.allclose(share, [0.5, 0.3, 0.2, 0.0], atol=0.03)


def test_seeded_row_is_the_same_alone_or_in_a_batch() -> None:
    logits = np.random.default_rng(1).normal(size=(5, 100)).astype(np.float32)
    settings = [Sampling(temperature=0.8, top_p=0.9 if i % 2 else 1.0, top_k=20 * i,
                         seed=None if i == 2 else i) for i in range(5)]
    together = choose_tokens(logits, [SamplerState(s, 100, [], 0) for s in settings])
    for row in (0, 1, 3, 4):
        alone = choose_tokens(logits[row:row + 1], [SamplerState(settings[row], 100, [], 0)])
        assert alone[0] == together[row]


def test_detokenizer_never_splits_a_multibyte_character() -> None:
    tokenizer = build_tokenizer()
    text = "Café 🙂🙂 日本語, naïve résumé ☕"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text) // 2  # unseen characters really are split into byte tokens
    detok = IncrementalDetokenizer(lambda tokens: tokenizer.decode(tokens))
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
