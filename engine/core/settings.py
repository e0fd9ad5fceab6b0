"""Settings: defaults that serve offline on a laptop CPU, `EMBER_*` env vars, an optional YAML
file (`EMBER_CONFIG`), and CLI flags on top (highest precedence)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.core.errors import InvalidRequestError


def _default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ember"


class Settings(BaseSettings):
    """Everything an operator can set. Field names map to `EMBER_<NAME>` env vars."""

    model_config = SettingsConfigDict(env_prefix="EMBER_", extra="forbid")

    config: Path | None = Field(None, description="YAML file with any of these settings")
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text (with date and request id) or one JSON object each"
    )
    drain_timeout_s: float = Field(
        30, ge=0, description="on SIGTERM/SIGINT, how long in-flight requests and streams may "
                              "run on before they are ended with a 503"
    )

    registry_file: Path | None = Field(
        None, description="model registry YAML; the packaged configs/models.yaml by default"
    )
    models: list[dict[str, Any]] = Field(
        default_factory=list, description="extra registry entries, or overrides by id"
    )
    data_dir: Path = Field(default_factory=lambda: _default_cache_root() / "data")
    models_dir: Path = Field(default_factory=lambda: _default_cache_root() / "models")

    # NoDecode: `EMBER_PRELOAD=a,b` is a comma list, not JSON.
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["defaults"],
        description="model ids loaded at start; `defaults` = every installed default model",
    )
    device: str = "auto"
    dtype: str = "auto"
    torch_threads: int = Field(0, ge=0, description="intra-op threads; 0 = torch's default")
    llama_threads: int = Field(
        0, ge=0, description="llama.cpp threads per chat model; 0 = every core but one"
    )

    idle_ttl_s: float = Field(0, ge=0, description="unload a model idle this long; 0 = never")
    memory_budget_mb: float = Field(0, ge=0, description="total model memory; 0 = unlimited")

    max_body_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="largest request body (audio uploads included)"
    )
    max_json_depth: int = Field(
        64, gt=0, description="deepest nesting of arrays and objects a JSON body may have"
    )
    max_queue_per_model: int = Field(
        256, gt=0, description="waiting requests (or inputs) per model before 429"
    )
    request_timeout_s: float = Field(
        600, ge=0, description="longest wait in a model's queue before 504; 0 = no limit"
    )
    step_timeout_s: float = Field(
        300, ge=0, description="a compute step (a decode step, an embedding batch) running "
                               "longer is stuck: its model's requests end with 504; 0 = never"
    )
    kv_cache_tokens: int = Field(
        32768, gt=0, description="chat KV-cache budget per model (batch rows x cached length)"
    )
    prefill_chunk_tokens: int = Field(
        512, gt=0, description="prompt tokens prefilled per scheduler step; longer ones are chunked"
    )
    max_embedding_inputs: int = Field(2048, gt=0)
    max_audio_seconds: float = Field(
        7200, gt=0, description="longest audio a transcription or translation may upload"
    )
    max_n: int = Field(8, gt=0, description="largest `n` a chat/completion request may ask for")
    max_prompts: int = Field(
        64, gt=0, description="most prompts one /v1/completions request may carry"
    )
    artifact_ttl_s: float = Field(
        3600, gt=0, description="how long generated files stay at /v1/files/{id}/content"
    )
    public_url: str | None = Field(
        None, description="base URL in returned file links; the request's own by default"
    )
    job_workers: int = Field(1, gt=0, description="video/music jobs running at once")
    job_workers_per_model: int = Field(1, gt=0, description="jobs running at once per model")
    job_max_attempts: int = Field(
        3, gt=0, description="runs a job may start (restarts included) before it is failed"
    )
    job_ttl_s: float = Field(
        86400, gt=0, description="how long finished jobs and their files are kept"
    )
    api_key: str | None = None
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="more accepted API keys, comma-separated (EMBER_API_KEYS=a,b); with "
                    "api_key, any one of them opens the API",
    )
    api_keys_file: Path | None = Field(
        None, description="YAML keys file: salted key hashes (`ember keys new`), each with "
                          "optional model/route/organisation scopes and per-key limits",
    )
    allow_open_access: bool = Field(
        False, description="serve a non-loopback address with no API key (refused otherwise)"
    )
    guard_metrics_and_docs: bool = Field(
        True, description="with API keys set, /metrics, /docs, /redoc and /openapi.json need "
                          "one too (/health and /ready stay open)",
    )

    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="browser origins allowed to call the API "
                                          "(comma-separated, `*` for any); none by default")

    # Image inputs of vision chat (engine/media/fetch.py).
    fetch_allow_private: bool = Field(
        False, description="let image URLs reach private, loopback and link-local addresses"
    )
    fetch_max_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="largest image fetched from a URL or data: URI"
    )
    fetch_timeout_s: float = Field(
        10, gt=0, description="longest an image URL fetch may take, redirects included"
    )
    max_images_per_request: int = Field(
        16, gt=0, description="most image parts one chat request may carry"
    )
    max_rerank_documents: int = Field(
        1000, gt=0, description="most documents one rerank request may carry"
    )

    # Gateway dialects (/v1/ai/*, /api/v3/organizations/{organisation}/ai/*).
    routing_file: Path | None = Field(
        None, description="task/prefer routing table; the packaged configs/routing.yaml by default"
    )
    response_cache_ttl_s: float = Field(
        300, ge=0, description="how long a cached chat response is served; 0 = no cache"
    )
    response_cache_entries: int = Field(1024, gt=0, description="most cached chat responses")
    idempotency_ttl_s: float = Field(
        86400, gt=0, description="how long an idempotency key returns its first result"
    )
    idempotency_entries: int = Field(
        4096, gt=0, description="most idempotency keys remembered (oldest dropped first)"
    )
    organization_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description="organisation -> API keys valid for /api/v3/organizations/{organisation}/ai",
    )

    def accepted_keys(self) -> list[str]:
        """Every API key that opens the API; empty: no authentication."""
        return [key for key in [self.api_key or "", *self.api_keys] if key]

    @field_validator("preload", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        allowed = {"auto", "float32", "bfloat16", "float16"}
        if value not in allowed:
            raise ValueError(f"dtype must be one of {sorted(allowed)}")
        return value


def load_settings(**overrides: Any) -> Settings:
    """Build settings from env + optional YAML, with explicit overrides (CLI flags) on top.

    Overrides whose value is None are ignored so that unset CLI flags do not mask env/YAML.
    """
    overrides = {key: value for key, value in overrides.items() if value is not None}
    base = Settings(**{k: v for k, v in overrides.items() if k == "config"})
    file_values: dict[str, Any] = {}
    if base.config is not None:
        if not base.config.is_file():
            raise InvalidRequestError(f"config file {base.config} does not exist", param="config")
        loaded = yaml.safe_load(base.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise InvalidRequestError(f"config file {base.config} must hold a mapping")
        file_values = loaded
    # env beats YAML: pydantic-settings gives init kwargs precedence, so drop YAML keys that
    # the environment already sets.
    env_keys = {key[len("EMBER_"):].lower() for key in os.environ if key.startswith("EMBER_")}
    merged = {k: v for k, v in file_values.items() if k not in env_keys}
    merged.update(overrides)
    return Settings(**merged)
