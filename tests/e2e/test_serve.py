"""`ember serve` as a real process on a free port, with the packaged default models (SmolLM2
chat, MiniLM embeddings, Whisper base speech to text, the Piper voice), driven by the
published `openai` client."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.audio_files import word_error_rate
from tests.e2e.process import ember_serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("serve") / "ember.log"
    with ember_serve(log_path, {"EMBER_DATA_DIR": str(log_path.parent / "data")}) as (base, _):
        yield base
    output = log_path.read_text()
    assert "ember serving at http://127.0.0.1:" in output
    assert (
        "models ready: smollm2-135m-instruct (chat), all-minilm-l6-v2 (embedding), "
        "whisper-base (stt), piper-en-us-joe (tts)"
    ) in output


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_models_list_the_packaged_defaults(client: openai.OpenAI) -> None:
    states = {m.id: (m.model_extra or {}).get("state") for m in client.models.list().data}
    assert states["smollm2-135m-instruct"] == "ready"
    assert states["all-minilm-l6-v2"] == "ready"


def test_the_default_chat_model_runs_on_llama_cpp_with_its_own_defaults(server: str) -> None:
    info = httpx.get(f"{server}/v1/models/smollm2-135m-instruct").json()
    if importlib.util.find_spec("llama_cpp") is not None:  # what `make serve` installs
        assert info["backend"] == "llama.cpp", info["backend_note"]
        assert info["dtype"] == "gguf"
    else:  # no build: transformers serves it, and says why
        assert info["backend"] == "transformers" and info["backend_note"]
    assert info["sampling_defaults"]["temperature"] == 0.2
    assert info["sampling_defaults"]["top_p"] == 0.9
    assert info["sampling_defaults"]["max_tokens"] == 512


def test_a_bare_request_gets_a_sensible_answer(client: openai.OpenAI) -> None:
    """No sampling fields (a seed only, to be reproducible): the README's example. At
    OpenAI's temperature 1.0 the 135M model babbled; its own defaults (0.2 / 0.9) answer."""
    reply = client.chat.completions.create(
        model="gpt-4o-mini", seed=0,
        messages=[{"role": "user", "content": "Which city is the capital of France?"}],
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens <= 512


def test_real_chat_answers_and_stream_matches(client: openai.OpenAI) -> None:
    messages: list = [{"role": "user", "content": "Which city is the capital of France?"}]
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, temperature=0, max_tokens=30
    )
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    streamed = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, temperature=0, max_tokens=30, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_real_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=5,
        temperature=0,
    )
    assert reply.choices[0].text.strip()


def test_real_embeddings_rank_meaning(client: openai.OpenAI) -> None:
    texts = [
        "Machine learning is a subset of artificial intelligence.",
        "Deep learning uses neural networks with many layers.",
        "The weather today is sunny and warm.",
    ]
    data = client.embeddings.create(model="text-embedding-ada-002", input=texts).data
    vectors = [d.embedding for d in data]

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert len(vectors[0]) == 384
    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2


def test_bad_request_then_still_serving(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], temperature=5
        )
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    reply = client.embeddings.create(model="text-embedding-ada-002", input="still here")
    assert reply.data


STORY = (
    "The lighthouse keeper climbed the stairs at dusk. He lit the lamp and watched the sea. "
    "A small boat was fighting the waves near the rocks. He rang the bell three times. "
    "The boat turned away from the rocks and reached the harbour. In the morning the "
    "fishermen brought him bread and fresh fish."
)


def test_speech_streams_before_synthesis_finishes_and_transcribes(server: str) -> None:
    body = {"model": "tts-1", "input": STORY, "voice": "alloy", "response_format": "mp3"}
    started = time.perf_counter()
    first_byte_s, data = 0.0, b""
    with httpx.stream("POST", f"{server}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/mpeg"
        for chunk in response.iter_raw():
            first_byte_s = first_byte_s or time.perf_counter() - started
            data += chunk
    total_s = time.perf_counter() - started
    # Six sentences: the first one's audio leaves long before the last one is synthesized.
    assert first_byte_s < total_s / 2, (first_byte_s, total_s)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    text = client.audio.transcriptions.create(model="whisper-1", file=("story.mp3", data)).text
    assert word_error_rate(STORY, text) <= 0.15, text


def test_models_command_lists_the_registry() -> None:
    output = subprocess.run(
        [sys.executable, "-m", "ember.cli", "models"], capture_output=True, text=True, check=True
    ).stdout
    assert "smollm2-135m-instruct" in output and "gpt-4o-mini" in output
