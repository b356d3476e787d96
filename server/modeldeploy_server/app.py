"""The Starlette application: routes, limits, and the one table that maps errors to HTTP.

Inference endpoints are plain ASGI handlers (no Request/Response objects on the hot path). The
Starlette router owns every route, so wrong methods, unknown paths and unknown models answer
405/404 in JSON; `FastPath` in front sends the exact inference paths of the served model straight
to the same handlers, skipping route matching and the middleware stack.
"""

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
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from modeldeploy_server.batcher import Batcher
from modeldeploy_server.batching import Feed, probe_batching
from modeldeploy_server.capture import PayloadCapture
from modeldeploy_server.codec import decode_infer_request, encode_infer_response, select_outputs
from modeldeploy_server.config import ServeConfig
from modeldeploy_server.deadlines import Deadlines
from modeldeploy_server.edge import BACKOFF_STATE_KEY
from modeldeploy_server.errors import (
    ConfigError,
    InvalidInput,
    MalformedRequest,
    ModelExecutionError,
    ModelNotFound,
    ModelRejected,
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
from modeldeploy_server.records import (
    decode_csv,
    decode_example,
    decode_instances,
    encode_csv,
    encode_predictions,
)
from modeldeploy_server.routing import PROBE_HEADER
from modeldeploy_server.runtime import OnnxModel

logger = logging.getLogger("uvicorn.error")

# The one mapping from domain errors to HTTP status codes.
ERROR_STATUS: dict[type[ServerError], int] = {
    MalformedRequest: 400,
    InvalidInput: 400,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    ModelRejected: 422,
    ModelExecutionError: 500,
    Overloaded: 503,
    NotReady: 503,
    RequestTimeout: 504,
}
RETRY_AFTER_S = b"1"
JSON = b"application/json"
CSV = b"text/csv"
BINARY = b"application/octet-stream"
HEADER_LENGTH = b"inference-header-content-length"
_PROBE_NAME = PROBE_HEADER.encode("latin-1")
Headers = list[tuple[bytes, bytes]]


def render_error(exc: ServerError) -> tuple[int, bytes, Headers]:
    """Status, `{"error": ...}` body and extra headers for a domain error."""
    status = ERROR_STATUS[type(exc)]
    headers: Headers = []
    if status == 503:
        headers.append((b"retry-after", RETRY_AFTER_S))
    if status == 413:
        # The rest of the body was never read, so the connection cannot be reused.
        headers.append((b"connection", b"close"))
    return status, orjson.dumps({"error": str(exc)}), headers


class JSONResponse(Response):
    """orjson-encoded JSON."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Serialize with orjson."""
        return orjson.dumps(content)


async def _domain_error(request: Request, exc: Exception) -> Response:
    """render_error as a Starlette response, for errors raised outside the inference path."""
    assert isinstance(exc, ServerError)
    status, body, headers = render_error(exc)
    response = Response(body, status_code=status, media_type="application/json")
    response.raw_headers.extend(headers)
    return response


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

    def drain(self) -> None:
        """SIGTERM arrived: readiness fails from now on."""
        self.draining = True


@dataclass
class _Incoming:
    """The request headers the inference handlers look at, read in one pass."""

    content_length: bytes | None = None
    content_type: bytes = b""
    content_encoding: bytes = b"identity"
    accept: bytes = b""
    header_length: bytes | None = None
    # Probe traffic (a rollout's `modeldeploy-server probe`): counted apart, never captured.
    probe: bool = False
    # The request's scope["state"]: where an overload refusal asks the connection to back off.
    state: dict[str, Any] | None = None

    @classmethod
    def parse(cls, scope: Scope) -> _Incoming:
        incoming = cls(state=scope.get("state"))
        for name, value in scope["headers"]:
            if name == b"content-length":
                incoming.content_length = value
            elif name == b"content-type":
                incoming.content_type = value.split(b";", 1)[0].strip().lower()
            elif name == b"content-encoding":
                incoming.content_encoding = value.strip().lower()
            elif name == b"accept":
                incoming.accept = value
            elif name == HEADER_LENGTH:
                incoming.header_length = value
            elif name == _PROBE_NAME:
                incoming.probe = True
        return incoming


@dataclass(slots=True)
class _Answer:
    body: bytes
    content_type: bytes
    headers: Headers


Answerer = Callable[[_Incoming, bytes], Awaitable[_Answer]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class InferenceService:
    """The endpoints of one served model; resources are created by `lifespan`."""

    def __init__(self, config: ServeConfig, model: OnnxModel) -> None:
        self.config = config
        self.model = model
        self.metadata = model.metadata
        self.metrics = ServerMetrics(model.metadata)
        self.state = ServingState()
        self._batcher: Batcher | None = None
        self._deadlines: Deadlines | None = None
        self._capture: PayloadCapture | None = None
        self._output_names = [spec.name for spec in model.metadata.outputs]
        self._model_headers: Headers = [
            (b"x-model-version", self.metadata.version.encode()),
            (b"x-model-sha256", self.metadata.sha256.encode()),
        ]
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
        warm_up = self._warm_up_request()
        batchable = self.metadata.batch_axis and await asyncio.to_thread(
            self._merges_row_by_row, warm_up[0]
        )
        self._deadlines = Deadlines(config.request_timeout_s)
        self._batcher = Batcher(
            self.model.run,
            batchable=batchable,
            uniform=self.metadata.uniform,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_batch_delay_ms / 1000,
            max_queue=config.max_queue,
            observe=self.metrics.observe_batch,
            in_flight=self._deadlines.in_flight,
        )
        self.metrics.track_queue_depth(self._batcher.depth)
        if config.capture_path is not None:
            self._capture = PayloadCapture(
                config.capture_path, config.capture_sample_rate, self.metrics.capture_dropped.inc
            )
        await self._warm_up(*warm_up)
        self.state.ready = True
        try:
            yield
        finally:
            self.state.ready = False
            await self._batcher.close()
            await self._deadlines.close()
            if self._capture is not None:
                self._capture.close()

    def _warm_up_request(self) -> tuple[Feed, int]:
        """The user's example (validated: a bad one stops the server), else a synthetic one."""
        example = self.config.warmup_example
        if example is None:
            return self.model.synthetic_feed(), 1
        try:
            tensors = decode_example(example, self.metadata)
            return validate_inputs(tensors, self.metadata, self.config.max_rows)
        except ServerError as exc:
            raise _example_failed(exc) from exc

    def _merges_row_by_row(self, feed: Feed) -> bool:
        """Model thread's stand-in, before it starts: the batching probe (batching.py)."""
        merges, why = probe_batching(self.model.run, feed)
        if why is not None:
            logger.log(
                logging.INFO if merges else logging.WARNING,
                "batching %s: %s",
                "on" if merges else "off",
                why,
            )
        return merges

    async def _warm_up(self, feed: Feed, rows: int) -> None:
        """Run the warm-up request: the user's example must succeed; a valid model may refuse
        the synthetic one (zeros, one row) when its inputs are data (axes, sizes, a shape)."""
        assert self._batcher is not None, "the lifespan starts the batcher"
        try:
            await self._batcher.submit(feed, rows)
        except ServerError as exc:
            if self.config.warmup_example is not None:
                raise _example_failed(exc) from exc
            logger.warning(
                "warm-up: the model refused a synthetic request (%s); serving without warm-up "
                "(give --warmup-example for a request it accepts)",
                exc,
            )

    # -- the inference path (plain ASGI) -------------------------------------------------------

    async def _read_body(self, incoming: _Incoming, receive: Receive) -> bytes:
        """The body, refusing as soon as it is known to be over the limit (chunked included)."""
        limit = self.config.max_request_bytes
        declared = incoming.content_length
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {int(declared)} bytes is over the {limit} limit"
            )
        if incoming.content_encoding != b"identity":
            encoding = incoming.content_encoding.decode("latin-1")
            raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise MalformedRequest("the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the {limit} byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _serve(
        self, protocol: str, answer: Answerer, incoming: _Incoming, receive: Receive, send: Send
    ) -> None:
        """Bound, answer, send, count and capture one inference request."""
        started = time.perf_counter()
        body = b""
        deadlines, batcher = self._deadlines, self._batcher
        task = asyncio.current_task()
        assert deadlines is not None and batcher is not None and task is not None, "lifespan"
        deadlines.start(task)
        try:
            # A full queue refuses before the body is read, and again before it is decoded (the
            # costly part), where the place is taken: a client trickling its body holds none.
            batcher.check_room()
            body = await self._read_body(incoming, receive)
            batcher.reserve(task)
            result = await answer(incoming, body)
            deadlines.finish(task)
            batcher.release(task)
            status, content, content_type, extra = (
                200,
                result.body,
                result.content_type,
                result.headers,
            )
        except (Exception, asyncio.CancelledError) as exc:
            deadlines.finish(task)
            batcher.release(task)
            error: BaseException = exc
            if isinstance(exc, asyncio.CancelledError):
                if not deadlines.expired(task):
                    raise
                error = RequestTimeout(f"request took over {deadlines.timeout_s} s")
            elif not isinstance(exc, ServerError):  # a bug: still answer in JSON, and count it
                logger.exception("unexpected error in %s inference", protocol, exc_info=exc)
                error = ModelExecutionError(f"internal error: {type(exc).__name__}")
            assert isinstance(error, ServerError)
            status, content, extra = render_error(error)
            content_type = JSON
            if isinstance(error, Overloaded) and incoming.state is not None:
                incoming.state[BACKOFF_STATE_KEY] = float(RETRY_AFTER_S)
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(content)).encode()),
            *self._model_headers,
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        if incoming.probe:
            self.metrics.observe_probe(protocol, status, time.perf_counter() - started)
            return
        self.metrics.observe_request(protocol, status, time.perf_counter() - started)
        if self._capture is not None:
            self._capture.offer(
                self.metadata.name,
                self.metadata.version,
                protocol,
                body,
                incoming.content_type.decode("latin-1"),
                content,
                content_type.decode("latin-1"),
            )

    async def _run(self, feed: Any, rows: int) -> dict[str, Any]:
        assert self._batcher is not None, "the lifespan starts the batcher"
        return await self._batcher.submit(feed, rows)

    async def _answer_v2(self, incoming: _Incoming, body: bytes) -> _Answer:
        header_length = None
        if incoming.header_length is not None:
            if not incoming.header_length.strip().isdigit():
                raise MalformedRequest("Inference-Header-Content-Length must be an integer")
            header_length = int(incoming.header_length)
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
            return _Answer(content, JSON, [])
        return _Answer(content, BINARY, [(HEADER_LENGTH, str(json_length).encode())])

    async def _answer_records(self, incoming: _Incoming, body: bytes) -> _Answer:
        if incoming.content_type == CSV:
            tensors = decode_csv(body, self.metadata)
        else:
            tensors = decode_instances(body, self.metadata)
        feed, rows = validate_inputs(tensors, self.metadata, self.config.max_rows)
        outputs = await self._run(feed, rows)
        if CSV in incoming.accept:
            return _Answer(encode_csv(outputs), CSV, [])
        return _Answer(encode_predictions(outputs), JSON, [])

    async def infer_v2(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v2/models/{name}[/versions/{version}]/infer"""
        await self._serve("v2", self._answer_v2, _Incoming.parse(scope), receive, send)

    async def predict_records(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/models/{name}:predict (JSON records or CSV)"""
        incoming = _Incoming.parse(scope)
        protocol = "csv" if incoming.content_type == CSV else "v1"
        await self._serve(protocol, self._answer_records, incoming, receive, send)

    def fast_paths(self) -> dict[str, Handler]:
        """The exact inference paths of the served model."""
        name, version = self.metadata.name, self.metadata.version
        return {
            f"/v2/models/{name}/infer": self.infer_v2,
            f"/v2/models/{name}/versions/{version}/infer": self.infer_v2,
            f"/v1/models/{name}:predict": self.predict_records,
        }

    # -- health and metadata -------------------------------------------------------------------

    def _check_model(self, params: dict[str, Any]) -> None:
        if params["name"] != self.metadata.name:
            raise ModelNotFound(f"model {params['name']!r} is not served here")
        version = params.get("version")
        if version is not None and version != self.metadata.version:
            raise ModelNotFound(f"model {self.metadata.name!r} has no version {version!r}")

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
        self._check_model(request.path_params)
        return JSONResponse(self.metadata.as_json())

    async def model_ready(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{version}]/ready and GET /v1/models/{name}"""
        self._check_model(request.path_params)
        ready = self._readiness()
        return JSONResponse(
            {"name": self.metadata.name, "ready": ready}, status_code=200 if ready else 503
        )

    async def prometheus(self, request: Request) -> Response:
        """GET /metrics"""
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(self, request: Request) -> Response:
        """GET /v2/openapi.json: this server's API, for clients and schema-driven tests."""
        return Response(self._openapi, media_type="application/json")

    def routes(self) -> list[Route]:
        """Every route of the server."""
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        infer = _ModelEndpoint(self, self.infer_v2)
        return [
            Route(model + "/infer", infer, methods=["POST"]),
            Route(versioned + "/infer", infer, methods=["POST"]),
            Route(
                "/v1/models/{name}:predict",
                _ModelEndpoint(self, self.predict_records),
                methods=["POST"],
            ),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/openapi.json", self.openapi, methods=["GET"]),
            Route(model, self.model_metadata, methods=["GET"]),
            Route(versioned, self.model_metadata, methods=["GET"]),
            Route(model + "/ready", self.model_ready, methods=["GET"]),
            Route(versioned + "/ready", self.model_ready, methods=["GET"]),
            Route("/v1/models/{name}", self.model_ready, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]


def _example_failed(exc: ServerError) -> ConfigError:
    return ConfigError(f"warm-up with the example request failed: {exc}")


class _ModelEndpoint:
    """An inference handler behind the router: 404 unless the path names the served model."""

    def __init__(self, service: InferenceService, handler: Handler) -> None:
        self._service = service
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._service._check_model(scope["path_params"])
        await self._handler(scope, receive, send)


class FastPath:
    """Pure ASGI middleware: exact inference paths go straight to their handler."""

    def __init__(self, app: ASGIApp, paths: dict[str, Handler]) -> None:
        self._app = app
        self._paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self._paths.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self._app(scope, receive, send)


def build_app(config: ServeConfig, model: OnnxModel) -> tuple[ASGIApp, InferenceService]:
    """The ASGI app serving `model`, and its service (whose state serve.py flips on SIGTERM)."""
    service = InferenceService(config, model)
    app = Starlette(
        routes=service.routes(),
        lifespan=service.lifespan,
        exception_handlers={
            ServerError: _domain_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    return FastPath(app, service.fast_paths()), service
