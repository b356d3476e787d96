"""The Starlette application: routes, limits, and the one table that maps errors to HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from modeldeploy_server.batcher import Batcher
from modeldeploy_server.capture import PayloadCapture
from modeldeploy_server.codec import decode_infer_request, encode_infer_response, select_outputs
from modeldeploy_server.config import ServeConfig
from modeldeploy_server.errors import (
    ConfigError,
    InvalidInput,
    MalformedRequest,
    ModelExecutionError,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
    UnsupportedMediaType,
)
from modeldeploy_server.metadata import validate_inputs
from modeldeploy_server.metrics import ServerMetrics
from modeldeploy_server.openapi import build_openapi
from modeldeploy_server.records import decode_csv, decode_instances, encode_csv, encode_predictions
from modeldeploy_server.runtime import OnnxModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

logger = logging.getLogger("uvicorn.error")

# The one mapping from domain errors to HTTP status codes.
ERROR_STATUS: dict[type[ServerError], int] = {
    MalformedRequest: 400,
    InvalidInput: 400,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    ModelExecutionError: 500,
    Overloaded: 503,
    NotReady: 503,
    RequestTimeout: 504,
}
RETRY_AFTER_S = "1"
JSON = "application/json"
CSV = "text/csv"
BINARY = "application/octet-stream"
HEADER_LENGTH = "inference-header-content-length"


class JSONResponse(Response):
    """orjson-encoded JSON."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        """Serialize with orjson."""
        return orjson.dumps(content)


def error_response(exc: ServerError, headers: dict[str, str] | None = None) -> Response:
    """The `{"error": ...}` answer for a domain error."""
    status = ERROR_STATUS[type(exc)]
    extra = dict(headers or {})
    if status == 503:
        extra["retry-after"] = RETRY_AFTER_S
    if status == 413:
        # The rest of the body was never read, so the connection cannot be reused.
        extra["connection"] = "close"
    return JSONResponse({"error": str(exc)}, status_code=status, headers=extra)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": f"{exc.detail}: {request.method} {request.url.path}"},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


@dataclass
class ServingState:
    """Mutable process state: readiness flips on at warm-up and off at SIGTERM."""

    ready: bool = False
    draining: bool = False


@dataclass(frozen=True)
class _Answer:
    body: bytes
    media_type: str
    headers: dict[str, str]


class InferenceService:
    """The endpoints of one served model; resources are created by `lifespan`."""

    def __init__(self, config: ServeConfig, model: OnnxModel) -> None:
        self.config = config
        self.model = model
        self.metadata = model.metadata
        self.metrics = ServerMetrics(model.metadata)
        self.state = ServingState()
        self._batcher: Batcher | None = None
        self._capture: PayloadCapture | None = None
        self._output_names = [spec.name for spec in model.metadata.outputs]
        self._model_headers = {
            "x-model-version": self.metadata.version,
            "x-model-sha256": self.metadata.sha256,
        }
        self._openapi = orjson.dumps(build_openapi(self.metadata))
        self._server_metadata = {
            "name": "modeldeploy",
            "version": importlib.metadata.version("modeldeploy"),
            "extensions": ["binary_tensor_data"],
        }

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start the batcher and capture, warm the model up, then become ready."""
        config = self.config
        self._batcher = Batcher(
            self.model.run,
            batchable=self.metadata.batchable,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_batch_delay_ms / 1000,
            max_queue=config.max_queue,
            observe=self.metrics.observe_batch,
        )
        self.metrics.track_queue_depth(self._batcher.depth)
        if config.capture_path is not None:
            self._capture = PayloadCapture(
                config.capture_path, config.capture_sample_rate, self.metrics.capture_dropped.inc
            )
        try:
            feed = self.model.synthetic_feed()
            await self._batcher.submit(feed, next(iter(feed.values())).shape[0])
        except ServerError as exc:
            raise ConfigError(f"warm-up with a synthetic request failed: {exc}") from exc
        self.state.ready = True
        try:
            yield
        finally:
            self.state.ready = False
            await self._batcher.close()
            if self._capture is not None:
                self._capture.close()

    # -- helpers -------------------------------------------------------------------------------

    def _check_model(self, request: Request) -> None:
        params = request.path_params
        if params["name"] != self.metadata.name:
            raise ModelNotFound(f"model {params['name']!r} is not served here")
        version = params.get("version")
        if version is not None and version != self.metadata.version:
            raise ModelNotFound(f"model {self.metadata.name!r} has no version {version!r}")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refusing as soon as it is known to be over the limit (chunked included)."""
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes is over the {limit} limit")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is over the {limit} byte limit")
                chunks.append(chunk)
        except ClientDisconnect:
            raise MalformedRequest(
                "the client disconnected before sending the whole body"
            ) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _serve(
        self,
        request: Request,
        protocol: str,
        answer: Callable[[Request, bytes], Awaitable[_Answer]],
    ) -> Response:
        """Time, bound, answer, count and capture one inference request."""
        started = time.perf_counter()
        body = b""
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                self._check_model(request)
                body = await self._read_body(request)
                result = await answer(request, body)
            response = Response(
                result.body,
                media_type=result.media_type,
                headers={**self._model_headers, **result.headers},
            )
        except ServerError as exc:
            response = error_response(exc, self._model_headers)
        except TimeoutError:
            response = error_response(
                RequestTimeout(f"request took over {self.config.request_timeout_s} s"),
                self._model_headers,
            )
        except Exception as exc:  # a bug: still answer in JSON and count it
            response = await _unexpected_error(request, exc)
        self.metrics.observe_request(protocol, response.status_code, time.perf_counter() - started)
        if self._capture is not None:
            self._capture.offer(
                self.metadata.name,
                self.metadata.version,
                protocol,
                body,
                request.headers.get("content-type", ""),
                bytes(response.body),
                response.media_type or "",
            )
        return response

    async def _run(self, feed: Any, rows: int) -> dict[str, Any]:
        assert self._batcher is not None, "the lifespan starts the batcher"
        return await self._batcher.submit(feed, rows)

    # -- inference -----------------------------------------------------------------------------

    async def _answer_v2(self, request: Request, body: bytes) -> _Answer:
        raw_length = request.headers.get(HEADER_LENGTH)
        header_length = None
        if raw_length is not None:
            if not raw_length.strip().isdigit():
                raise MalformedRequest(f"{HEADER_LENGTH} must be an integer")
            header_length = int(raw_length)
        decoded = decode_infer_request(body, header_length)
        feed, rows = validate_inputs(decoded.inputs, self.metadata, self.config.max_rows)
        selected = select_outputs(decoded, self._output_names)
        outputs = await self._run(feed, rows)
        content, json_length = encode_infer_response(
            self.metadata.name,
            self.metadata.version,
            decoded.id,
            [(name, outputs[name], binary) for name, binary in selected],
        )
        if json_length is None:
            return _Answer(content, JSON, {})
        return _Answer(content, BINARY, {HEADER_LENGTH: str(json_length)})

    async def _answer_records(self, request: Request, body: bytes) -> _Answer:
        if _media_type(request.headers.get("content-type")) == CSV:
            tensors = decode_csv(body, self.metadata)
        else:
            tensors = decode_instances(body, self.metadata)
        feed, rows = validate_inputs(tensors, self.metadata, self.config.max_rows)
        outputs = await self._run(feed, rows)
        if CSV in request.headers.get("accept", ""):
            return _Answer(encode_csv(outputs), CSV, {})
        return _Answer(encode_predictions(outputs), JSON, {})

    async def infer_v2(self, request: Request) -> Response:
        """POST /v2/models/{name}[/versions/{version}]/infer"""
        return await self._serve(request, "v2", self._answer_v2)

    async def predict_records(self, request: Request) -> Response:
        """POST /v1/models/{name}:predict (JSON records or CSV)"""
        protocol = "csv" if _media_type(request.headers.get("content-type")) == CSV else "v1"
        return await self._serve(request, protocol, self._answer_records)

    # -- health and metadata -------------------------------------------------------------------

    def _readiness(self) -> bool:
        return self.state.ready and not self.state.draining

    async def live(self, request: Request) -> Response:
        """GET /v2/health/live"""
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        """GET /v2/health/ready: 503 before warm-up and after SIGTERM."""
        ready = self._readiness()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        """GET /v2"""
        return JSONResponse(self._server_metadata)

    async def model_metadata(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{version}]"""
        try:
            self._check_model(request)
        except ModelNotFound as exc:
            return error_response(exc)
        return JSONResponse(self.metadata.as_json())

    async def model_ready(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{version}]/ready and GET /v1/models/{name}"""
        try:
            self._check_model(request)
        except ModelNotFound as exc:
            return error_response(exc)
        ready = self._readiness()
        return JSONResponse(
            {"name": self.metadata.name, "ready": ready}, status_code=200 if ready else 503
        )

    async def prometheus(self, request: Request) -> Response:
        """GET /metrics"""
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(self, request: Request) -> Response:
        """GET /v2/openapi.json: this server's API, for clients and schema-driven tests."""
        return Response(self._openapi, media_type=JSON)

    def routes(self) -> list[Route]:
        """Every route of the server."""
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        return [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/openapi.json", self.openapi, methods=["GET"]),
            Route(model, self.model_metadata, methods=["GET"]),
            Route(versioned, self.model_metadata, methods=["GET"]),
            Route(model + "/ready", self.model_ready, methods=["GET"]),
            Route(versioned + "/ready", self.model_ready, methods=["GET"]),
            Route(model + "/infer", self.infer_v2, methods=["POST"]),
            Route(versioned + "/infer", self.infer_v2, methods=["POST"]),
            Route("/v1/models/{name}:predict", self.predict_records, methods=["POST"]),
            Route("/v1/models/{name}", self.model_ready, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def build_app(config: ServeConfig, model: OnnxModel) -> tuple[Starlette, InferenceService]:
    """The ASGI app serving `model`, and its service (whose state serve.py flips on SIGTERM)."""
    service = InferenceService(config, model)
    app = Starlette(
        routes=service.routes(),
        lifespan=service.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected_error},
    )
    return app, service
