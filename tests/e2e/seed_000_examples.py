"""The code examples of the gateway SDK's documentation (seed 000), copied as they are (the
indentation the seed's text lost is restored), and the changes that port them to ember:
the import line, and the SDK's placeholder model ids replaced with ember's aliases."""

from __future__ import annotations

# The one import a team changes; `Strongly()` then reads EMBER_BASE_URL.
PORTED_IMPORT = ("from strongly import Strongly", "from ember import Ember as Strongly")

# The seed's placeholders ("your-tts-model-id", ...) → the ids ember serves them under.
MODEL_IDS = {
    '"your-tts-model-id"': '"tts-1"',
    '"your-stt-model-id"': '"whisper-1"',
    '"your-image-model-id"': '"dall-e-3"',
    '"your-video-model-id"': '"text-to-video"',
    '"your-music-model-id"': '"musicgen"',
    '"your-moderation-model-id"': '"omni-moderation-latest"',
    '"your-rerank-model-id"': '"rerank"',
}


def ported(source: str) -> str:
    """The example as it runs against ember: only the import and placeholder ids differ."""
    assert PORTED_IMPORT[0] in source
    source = source.replace(*PORTED_IMPORT)
    for placeholder, model_id in MODEL_IDS.items():
        source = source.replace(placeholder, model_id)
    return source


EXAMPLES: dict[str, str] = {}

EXAMPLES["chat_completion"] = '''
from strongly import Strongly
client = Strongly()
response = client.ai.inference.chat_completion(
    model="gpt-4o-mini",
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is gradient descent?"},
    ],
)
print(response.content)
print(f"Tokens used: {response.usage.total_tokens}")
'''

EXAMPLES["multi_turn"] = '''
from strongly import Strongly
client = Strongly()
messages = [
    {"role": "system", "content": "You are a Python expert."},
    {"role": "user", "content": "What are decorators?"},
]
response = client.ai.inference.chat_completion(
    model="gpt-4o-mini",
    messages=messages,
)
print(f"Assistant: {response.content}")
# Continue the conversation
messages.append({"role": "assistant", "content": response.content})
messages.append({"role": "user", "content": "Show me an example."})
response = client.ai.inference.chat_completion(
    model="gpt-4o-mini",
    messages=messages,
)
print(f"Assistant: {response.content}")
'''

EXAMPLES["generation_parameters"] = '''
from strongly import Strongly
client = Strongly()
response = client.ai.inference.chat_completion(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "List three benefits of unit testing."}],
    temperature=0.3, # Lower = more deterministic
    max_tokens=256, # Cap the response length
    top_p=0.9, # Nucleus sampling
    stop=["\\n\\n", "---"], # Stop generating at these sequences
)
print(response.content)
'''

EXAMPLES["streaming"] = '''
from strongly import Strongly
client = Strongly()
print("Response: ", end="", flush=True)
for chunk in client.ai.inference.chat_completion(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Write a haiku about machine learning."}],
    stream=True,
):
    print(chunk.content, end="", flush=True)
print()
'''

EXAMPLES["collecting_a_streamed_response"] = '''
from strongly import Strongly
client = Strongly()
chunks = []
for chunk in client.ai.inference.chat_completion(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Explain recursion briefly."}],
    stream=True,
):
    chunks.append(chunk.content)
full_response = "".join(chunks)
print(full_response)
'''

EXAMPLES["text_completion"] = '''
from strongly import Strongly
client = Strongly()
response = client.ai.inference.completion(
    model="gpt-4o-mini",
    prompt="Explain the difference between a list and a tuple in Python:",
    max_tokens=200,
    temperature=0.5,
)
print(response.content)
print(f"Tokens: {response.usage.total_tokens}")
'''

EXAMPLES["streaming_text_completion"] = '''
from strongly import Strongly
client = Strongly()
for chunk in client.ai.inference.completion(
    model="gpt-4o-mini",
    prompt="Write a short poem about data pipelines:",
    stream=True,
):
    print(chunk.content, end="", flush=True)
print()
'''

EXAMPLES["embeddings"] = '''
from strongly import Strongly
client = Strongly()
response = client.ai.inference.embedding(
    model="text-embedding-ada-002",
    input="Machine learning is a subset of artificial intelligence.",
)
print(f"Embedding dimension: {len(response.embeddings[0])}")
'''

EXAMPLES["batch_embeddings"] = '''
from strongly import Strongly
client = Strongly()
texts = [
    "Machine learning uses statistical methods to learn from data.",
    "Deep learning is based on artificial neural networks.",
    "The weather forecast calls for rain tomorrow.",
]
response = client.ai.inference.embedding(
    model="text-embedding-ada-002",
    input=texts,
)
print(f"Generated {len(response.embeddings)} embeddings")
print(f"Dimension: {len(response.embeddings[0])}")
'''

EXAMPLES["similarity_search"] = '''
import math
from strongly import Strongly
client = Strongly()
def cosine_similarity(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    norm_a = math.sqrt(sum(x * x for x in a))
    norm_b = math.sqrt(sum(x * x for x in b))
    return dot / (norm_a * norm_b)
texts = [
    "Machine learning is a subset of artificial intelligence.",
    "Deep learning uses neural networks with many layers.",
    "The weather today is sunny and warm.",
]
response = client.ai.inference.embedding(
    model="text-embedding-ada-002",
    input=texts,
)
sim_01 = cosine_similarity(response.embeddings[0], response.embeddings[1])
sim_02 = cosine_similarity(response.embeddings[0], response.embeddings[2])
print(f"ML vs Deep Learning: {sim_01:.4f}") # High similarity
print(f"ML vs Weather: {sim_02:.4f}") # Low similarity
'''

EXAMPLES["text_to_speech"] = '''
from strongly import Strongly
client = Strongly()
# Generate speech from text
response = client.ai.inference.speech(
    model="your-tts-model-id",
    input="Hello, welcome to Strongly AI!",
    voice="alloy",
    response_format="mp3",
    speed=1.0,
)
# Save the audio file
with open("output.mp3", "wb") as f:
    f.write(response.content)
print(f"Audio format: {response.content_type}")
print(f"Audio size: {len(response.content)} bytes")
'''

EXAMPLES["transcription"] = '''
from strongly import Strongly
client = Strongly()
# Transcribe audio file
with open("recording.mp3", "rb") as audio_file:
    response = client.ai.inference.transcription(
        model="your-stt-model-id",
        file=audio_file,
        filename="recording.mp3",
        language="en",
    )
print(f"Transcript: {response.text}")
if response.segments:
    for seg in response.segments:
        print(f" [{seg.start:.1f}s - {seg.end:.1f}s] {seg.text}")
'''

EXAMPLES["translation"] = '''
from strongly import Strongly
client = Strongly()
# Translate audio to English
with open("french_audio.mp3", "rb") as audio_file:
    response = client.ai.inference.translation(
        model="your-stt-model-id",
        file=audio_file,
    )
print(f"English translation: {response.text}")
'''

EXAMPLES["image_generation"] = '''
from strongly import Strongly
client = Strongly()
# Generate an image
response = client.ai.inference.image_generation(
    model="your-image-model-id",
    prompt="A serene mountain landscape at sunset",
    n=1,
    size="1024x1024",
    quality="standard",
)
for image in response.data:
    if image.url:
        print(f"Image URL: {image.url}")
    if image.revised_prompt:
        print(f"Revised prompt: {image.revised_prompt}")
'''

EXAMPLES["video_generation"] = '''
from strongly import Strongly
client = Strongly()
# Submit a video generation job
job = client.ai.inference.video_generation(
    model="your-video-model-id",
    prompt="A drone flying over a tropical forest",
    duration=5,
    resolution="1080p",
)
print(f"Job submitted: {job.job_id}")
# Poll for completion
import time
while job.status not in ("completed", "failed", "cancelled"):
    time.sleep(10)
    job = client.ai.inference.generation_status(job_id=job.job_id)
    print(f"Status: {job.status}, Progress: {job.progress}%")
if job.status == "completed":
    print(f"Result: {job.result}")
'''

EXAMPLES["music_generation"] = '''
from strongly import Strongly
client = Strongly()
# Generate music
job = client.ai.inference.music_generation(
    model="your-music-model-id",
    prompt="Upbeat electronic music with a catchy melody",
    duration=30,
)
print(f"Job submitted: {job.job_id}")
'''

# The seed's cancel example continues from a job made by the one before it (`job`).
CANCEL_CONTINUATION = '''
from strongly import Strongly
client = Strongly()
# Cancel a running job
cancelled = client.ai.inference.cancel_generation(job_id=job.job_id)
print(f"Cancelled: {cancelled.status}")
'''

EXAMPLES["content_moderation"] = '''
from strongly import Strongly
client = Strongly()
# Moderate content
response = client.ai.inference.moderation(
    model="your-moderation-model-id",
    input="Some text to check for policy violations.",
)
for result in response.results:
    print(f"Flagged: {result.flagged}")
    for category, flagged in result.categories.items():
        if flagged:
            print(f" {category}: score={result.category_scores[category]:.4f}")
'''

EXAMPLES["batch_moderation"] = '''
from strongly import Strongly
client = Strongly()
texts = [
    "This is a normal message.",
    "Some other text to check.",
]
response = client.ai.inference.moderation(
    model="your-moderation-model-id",
    input=texts,
)
for i, result in enumerate(response.results):
    print(f"Text {i}: flagged={result.flagged}")
'''

EXAMPLES["document_reranking"] = '''
from strongly import Strongly
client = Strongly()
# Rerank documents by relevance
response = client.ai.inference.rerank(
    model="your-rerank-model-id",
    query="What is machine learning?",
    documents=[
        "Machine learning is a subset of artificial intelligence.",
        "The weather today is sunny and warm.",
        "Deep learning uses neural networks to learn from data.",
    ],
    top_n=2,
)
for result in response.results:
    print(f"Index: {result.index}, Score: {result.relevance_score:.4f}")
    if result.document:
        print(f" Text: {result.document.get('text', '')}")
'''

EXAMPLES["complete_example"] = '''
import math
from strongly import Strongly
def main():
    client = Strongly()
    # --- Chat Completion ---
    print("--- Chat Completion ---")
    response = client.ai.inference.chat_completion(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You are a data science tutor."},
            {"role": "user", "content": "Explain overfitting in one paragraph."},
        ],
        temperature=0.5,
        max_tokens=200,
    )
    print(response.content)
    print(f"Tokens used: {response.usage.total_tokens}\\n")
    # --- Streaming Chat ---
    print("--- Streaming Chat ---")
    print("Response: ", end="", flush=True)
    for chunk in client.ai.inference.chat_completion(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Write a haiku about neural networks."}],
        stream=True,
    ):
        print(chunk.content, end="", flush=True)
    print("\\n")
    # --- Text Completion ---
    print("--- Text Completion ---")
    response = client.ai.inference.completion(
        model="gpt-4o-mini",
        prompt="Three benefits of automated testing:",
        max_tokens=150,
        temperature=0.3,
    )
    print(response.content)
    print(f"Tokens used: {response.usage.total_tokens}\\n")
    # --- Embeddings ---
    print("--- Embeddings ---")
    texts = [
        "Machine learning is a subset of artificial intelligence.",
        "Deep learning uses neural networks with many layers.",
        "The weather today is sunny and warm.",
    ]
    response = client.ai.inference.embedding(
        model="text-embedding-ada-002",
        input=texts,
    )
    print(f"Generated {len(response.embeddings)} embeddings")
    print(f"Dimension: {len(response.embeddings[0])}")
    def cosine_similarity(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        norm_a = math.sqrt(sum(x * x for x in a))
        norm_b = math.sqrt(sum(x * x for x in b))
        return dot / (norm_a * norm_b)
    sim_01 = cosine_similarity(response.embeddings[0], response.embeddings[1])
    sim_02 = cosine_similarity(response.embeddings[0], response.embeddings[2])
    print(f"ML vs Deep Learning: {sim_01:.4f}")
    print(f"ML vs Weather: {sim_02:.4f}")
    # --- Multi-Turn Conversation ---
    print("\\n--- Multi-Turn Conversation ---")
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "What is the difference between SQL and NoSQL?"},
    ]
    response = client.ai.inference.chat_completion(
        model="gpt-4o-mini",
        messages=messages,
    )
    print(f"Assistant: {response.content[:200]}...")
    messages.append({"role": "assistant", "content": response.content})
    messages.append({"role": "user", "content": "When should I choose NoSQL?"})
    response = client.ai.inference.chat_completion(
        model="gpt-4o-mini",
        messages=messages,
    )
    print(f"Assistant: {response.content[:200]}...")
if __name__ == "__main__":
    main()
'''
