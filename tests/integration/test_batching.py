"""Continuous batching for chat and dynamic batching for embeddings give the same answers as
one-at-a-time, while requests come and go."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from engine.core.settings import Settings
from tests.conftest import Served, serve_in_process

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany. Machine learning",
    "Café",
    "How are you today? I am fine, thank you.",
    "numbers",
]


async def complete(served: Served, chat_model: str, prompt: str, max_tokens: int) -> str:
    reply = await served.openai.completions.create(
        model=chat_model, prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True},
    )
    return reply.choices[0].text


async def test_concurrent_greedy_requests_match_sequential_ones(
    served: Served, chat_model: str
) -> None:
    lengths = [12, 30, 7, 25, 18, 3]  # different lengths: rows leave the batch at different steps
    alone = [await complete(served, chat_model, p, n)
             for p, n in zip(PROMPTS, lengths, strict=True)]
    scheduler = served.app.state.engine.manager.slot(chat_model).runner
    steps_before = scheduler.steps

    async def staggered(index: int) -> str:
        await asyncio.sleep(0.01 * index)  # newcomers join a batch that is already decoding
        return await complete(served, chat_model, PROMPTS[index], lengths[index])

    together = await asyncio.gather(*[staggered(i) for i in range(len(PROMPTS))])
    assert together == alone
    # Far fewer decode steps than the tokens generated: they really shared steps.
    assert scheduler.steps - steps_before < sum(lengths)
    assert scheduler.active_sequences == 0 and scheduler.pending == 0


async def test_the_prompts_of_one_completion_request_decode_together(
    served: Served, chat_model: str
) -> None:
    """A prompt list is decoded concurrently (it once ran prompt after prompt), streamed or
    not, with each prompt's choices at their own indexes."""
    alone = [await complete(served, chat_model, prompt, 30) for prompt in PROMPTS[:4]]
    scheduler = served.app.state.engine.manager.slot(chat_model).runner
    steps_before = scheduler.steps
    listed = await served.openai.completions.create(
        model=chat_model, prompt=PROMPTS[:4], max_tokens=30, temperature=0, n=2,
        extra_body={"ignore_eos": True},
    )
    assert scheduler.steps - steps_before < 2 * 30  # 4 prompts x 30 tokens shared steps
    assert [c.index for c in listed.choices] == list(range(8))
    assert [c.text for c in listed.choices] == [text for text in alone for _ in range(2)]

    stream = await served.openai.completions.create(
        model=chat_model, prompt=PROMPTS[:4], max_tokens=30, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    texts, order = ["", "", "", ""], []
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            order.append(choice.index)
    assert texts == alone
    assert order != sorted(order), "the prompts' tokens interleave: decoded together"


async def test_n_choices_share_one_prefill_and_match_alone(
    served: Served, chat_model: str
) -> None:
    reply = await served.openai.completions.create(
        model=chat_model, prompt="Hello world", max_tokens=10, temperature=0, n=3,
        extra_body={"ignore_eos": True},
    )
    single = await complete(served, chat_model, "Hello world", 10)
    assert [c.text for c in reply.choices] == [single] * 3


async def test_long_prompt_is_prefilled_in_chunks_without_changing_the_answer(
    served: Served, chat_model: str
) -> None:
    scheduler = served.app.state.engine.manager.slot(chat_model).runner
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 12  # > one 64-token chunk
    chunk = scheduler.prefill_chunk_tokens
    try:
        scheduler.prefill_chunk_tokens = 64
        chunked = await complete(served, chat_model, long_prompt, 8)
    finally:
        scheduler.prefill_chunk_tokens = chunk
    whole = await complete(served, chat_model, long_prompt, 8)
    assert chunked == whole


async def test_concurrent_embedding_requests_are_batched_and_ordered(served: Served) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the stock market'}"
             for i in range(24)]
    alone = (await served.openai.embeddings.create(model="all-minilm-l6-v2", input=texts)).data
    batcher = served.app.state.engine.manager.slot("all-minilm-l6-v2").runner
    batches_before = batcher.batches_run
    singles = await asyncio.gather(*[
        served.openai.embeddings.create(model="all-minilm-l6-v2", input=text) for text in texts
    ])
    assert batcher.batches_run - batches_before < len(texts)
    for one, reference in zip(singles, alone, strict=True):
        np.testing.assert_allclose(one.data[0].embedding, reference.embedding, atol=1e-5)


async def test_kv_budget_makes_requests_wait_instead_of_overflowing(
    make_settings: Callable[..., Settings],
) -> None:
    budget = {"id": "tiny-chat", "limits": {"kv_cache_tokens": 60}}
    async with serve_in_process(make_settings(models=[budget])) as served:
        scheduler = (await served.app.state.engine.manager.load("tiny-chat")).runner
        most_rows = 0

        async def watch() -> None:
            nonlocal most_rows
            while True:
                most_rows = max(most_rows, scheduler.active_sequences)
                await asyncio.sleep(0.001)

        watcher = asyncio.ensure_future(watch())
        replies = await asyncio.gather(*[complete(served, "tiny-chat", PROMPTS[1], 30)
                                         for _ in range(8)])
        watcher.cancel()
        assert len(set(replies)) == 1  # all finished, and identical (greedy, same prompt)
        # 10 prompt tokens per row, more once decoding: at most 6 rows fit, never all 8.
        assert 1 <= most_rows < 8
        assert scheduler.active_sequences == 0 and scheduler.pending == 0
