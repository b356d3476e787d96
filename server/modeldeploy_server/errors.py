"""Domain errors of the inference server; `app.py` maps each to an HTTP status in one table."""

from __future__ import annotations


class ServerError(Exception):
    """Base class: the message is safe to show to the client and says what is wrong and where."""


class MalformedRequest(ServerError):
    """The body cannot be parsed (not JSON, not UTF-8, not the protocol's shape)."""


class InvalidInput(ServerError):
    """The request parses but does not fit the model (names, datatypes, shapes, values)."""


class ModelRejected(ServerError):
    """The request fits the model's signature, but the model cannot run on its values (a Reshape
    to an impossible shape, an index out of range)."""


class ModelNotFound(ServerError):
    """The path names a model or version this server does not serve."""


class PayloadTooLarge(ServerError):
    """The body is over the byte limit or carries more rows than allowed."""


class UnsupportedMediaType(ServerError):
    """The body is encoded in a way this server does not read (e.g. a Content-Encoding)."""


class Overloaded(ServerError):
    """The batch queue is full; the client should retry later."""


class NotReady(ServerError):
    """The server is starting or shutting down."""


class RequestTimeout(ServerError):
    """The request did not finish within the configured time."""


class ModelExecutionError(ServerError):
    """onnxruntime failed on input that passed validation."""


class ConfigError(ServerError):
    """The process configuration is invalid; the process exits with this message."""
