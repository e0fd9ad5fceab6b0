"""Prometheus metrics, registered once per process on the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "ember_requests_total", "HTTP requests by route and status", ["route", "status"]
)
REQUEST_SECONDS = Histogram(
    "ember_request_seconds", "HTTP request latency (time to the response head)", ["route"]
)
PROMPT_TOKENS = Counter("ember_prompt_tokens_total", "Prompt tokens processed", ["model"])
GENERATED_TOKENS = Counter("ember_generated_tokens_total", "Tokens generated", ["model"])
EMBEDDED_INPUTS = Counter("ember_embedded_inputs_total", "Inputs embedded", ["model"])
AUDIO_SECONDS = Counter(
    "ember_audio_seconds_total", "Seconds of audio transcribed or synthesized", ["model"]
)
GENERATED_IMAGES = Counter("ember_generated_images_total", "Images generated", ["model"])
QUEUE_DEPTH = Gauge("ember_queue_depth", "Requests waiting (not yet running) per model", ["model"])
MODEL_LOADED = Gauge("ember_model_loaded", "1 while the model is loaded", ["model"])
MODEL_LOAD_SECONDS = Gauge("ember_model_load_seconds", "Duration of the last load", ["model"])
BATCH_SIZE = Histogram(
    "ember_batch_size", "Items per batch run by a model's batcher or chat decode step",
    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_SECONDS = Histogram(
    "ember_batch_seconds", "Compute time of one batch or decode step", ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
GRAMMAR_SECONDS = Histogram(
    "ember_grammar_compile_seconds", "Output-grammar compile time (a cached one: a copy)",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
RATE_LIMITED = Counter(
    "ember_rate_limited_total", "Requests refused by a key's own limit", ["key", "route", "limit"]
)
TIME_TO_FIRST_TOKEN = Histogram(
    "ember_time_to_first_token_seconds", "Submission to first generated token", ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INTER_TOKEN_SECONDS = Histogram(
    "ember_inter_token_seconds", "Time between a sequence's generated tokens", ["model"],
    buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
)
KV_CACHE_USED = Gauge(
    "ember_kv_cache_used_ratio", "Reserved share of a chat model's KV-cache budget", ["model"]
)
