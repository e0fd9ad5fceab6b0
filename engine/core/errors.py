"""One error hierarchy for the whole engine.

Each dialect maps these onto its own envelope in exactly one place (server/errors.py), so
engine and adapter code raise the error that says what went wrong and never think about HTTP.
"""

from __future__ import annotations


class EmberError(Exception):
    """Base of every error ember reports to a caller."""

    status_code = 500
    error_type = "server_error"
    code: str | None = "internal_error"
    retry_after: float | None = None  # seconds, sent as Retry-After when set

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(EmberError):
    """A known field carries a value ember cannot accept."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class UnsupportedFeatureError(InvalidRequestError):
    """A valid request asks for something this model or build does not do (yet)."""

    code = "unsupported_feature"


class AuthenticationError(EmberError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(EmberError):
    """A valid key that is not allowed this model, route or organisation."""

    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class ModelNotFoundError(EmberError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(EmberError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class WrongTaskError(InvalidRequestError):
    """The model exists but serves another task (an embedding model asked to chat)."""

    code = "model_task_mismatch"


class PayloadTooLargeError(EmberError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class OverloadedError(EmberError):
    """A model's queue is full: the caller should retry after `retry_after` seconds."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"
    retry_after: float = 1.0

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after


class ModelLoadError(EmberError):
    """The model could not be loaded; other models keep serving."""

    status_code = 503
    error_type = "server_error"
    code = "model_load_failed"


class ModelUnavailableError(EmberError):
    """The model is known but cannot run here (weights not installed, memory budget)."""

    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"


class ModelExecutionError(EmberError):
    """The model raised while running a batch: that batch's requests fail, nothing else."""

    code = "model_error"


class ModelOutOfMemoryError(EmberError):
    """Out of memory (host or CUDA) while running: retry later (the model then runs smaller
    batches), or smaller."""

    status_code = 503
    error_type = "server_error"
    code = "out_of_memory"
    retry_after = 1.0


class DeadlineExceededError(EmberError):
    status_code = 504
    error_type = "server_error"
    code = "deadline_exceeded"


class RequestCancelledError(EmberError):
    """The caller went away; nothing is sent back, the work is dropped."""

    status_code = 499
    error_type = "cancelled"
    code = "cancelled"


class ConflictError(EmberError):
    """The operation clashes with the current state (unloading a model that is serving)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


def is_out_of_memory(exc: BaseException) -> bool:
    """Host (MemoryError) or accelerator (torch.OutOfMemoryError) memory ran out."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def model_failure(model: str, exc: Exception) -> EmberError:
    """What the caller is told when a model raised: out of memory is a 503 (retry later,
    perhaps smaller); anything else a 500 naming the model and the error."""
    if isinstance(exc, EmberError):
        return exc
    if is_out_of_memory(exc):
        return ModelOutOfMemoryError(f"{model!r} ran out of memory on this batch; retry "
                                     "later or with a smaller request")
    return ModelExecutionError(f"{model!r} failed: {type(exc).__name__}: {exc}")
