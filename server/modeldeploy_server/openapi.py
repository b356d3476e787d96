"""The server's OpenAPI 3.0 document, specialised to the served model (names, datatypes)."""

from __future__ import annotations

from typing import Any

from modeldeploy_server.metadata import V2_TO_NUMPY, ModelMetadata


def _error_responses(*codes: int) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    descriptions = {
        400: "malformed request or input that does not fit the model",
        404: "unknown model or version",
        413: "body or row count over the limit",
        415: "unsupported Content-Encoding",
        422: "the model cannot run on the input's values",
        503: "not ready or overloaded (Retry-After)",
        504: "request timeout",
    }
    return {str(code): {"description": descriptions[code], "content": error} for code in codes}


def _path_parameters(*names: str, metadata: ModelMetadata) -> list[dict[str, Any]]:
    values = {"name": metadata.name, "version": metadata.version}
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "example": values[name],
        }
        for name in names
    ]


def build_openapi(metadata: ModelMetadata) -> dict[str, Any]:
    """OpenAPI 3.0.3 for every route of the server."""
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    inference_errors = _error_responses(400, 404, 413, 415, 422, 503, 504)
    infer = {
        "post": {
            "summary": "Open Inference Protocol v2 inference",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}
                },
            },
            "responses": {
                "200": {
                    "description": "outputs",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/InferResponse"}
                        }
                    },
                },
                **inference_errors,
            },
        }
    }
    paths: dict[str, Any] = {
        "/v2/health/live": {"get": {"responses": {"200": ok_json}}},
        "/v2/health/ready": {"get": {"responses": {"200": ok_json, **_error_responses(503)}}},
        "/v2": {"get": {"responses": {"200": ok_json}}},
        "/v2/models/{name}": {
            "get": {"responses": {"200": ok_json, **_error_responses(404)}},
            "parameters": _path_parameters("name", metadata=metadata),
        },
        "/v2/models/{name}/versions/{version}": {
            "get": {"responses": {"200": ok_json, **_error_responses(404)}},
            "parameters": _path_parameters("name", "version", metadata=metadata),
        },
        "/v2/models/{name}/ready": {
            "get": {"responses": {"200": ok_json, **_error_responses(404, 503)}},
            "parameters": _path_parameters("name", metadata=metadata),
        },
        "/v2/models/{name}/infer": {
            **infer,
            "parameters": _path_parameters("name", metadata=metadata),
        },
        "/v2/models/{name}/versions/{version}/infer": {
            **infer,
            "parameters": _path_parameters("name", "version", metadata=metadata),
        },
        "/v1/models/{name}:predict": {
            "post": {
                "summary": "records (instances) or CSV inference",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/RecordsRequest"}
                        },
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                "responses": {"200": ok_json, **inference_errors},
            },
            "parameters": _path_parameters("name", metadata=metadata),
        },
        "/metrics": {
            "get": {
                "responses": {
                    "200": {
                        "description": "Prometheus metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                }
            }
        },
    }
    # A model may have no inputs (a Constant), never no outputs.
    example_tensor = (metadata.inputs or metadata.outputs)[0].name
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "Tensor": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string", "example": example_tensor},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "datatype": {"type": "string", "enum": list(V2_TO_NUMPY)},
                "parameters": {"type": "object"},
                "data": {"type": "array", "items": {}},
            },
        },
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "parameters": {"type": "object"},
                        },
                    },
                },
            },
        },
        "InferResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
            },
        },
        "RecordsRequest": {
            "type": "object",
            "required": ["instances"],
            "properties": {
                "instances": {
                    "type": "array",
                    "items": {"oneOf": [{"type": "array"}, {"type": "object"}]},
                }
            },
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": f"modeldeploy server for {metadata.name}", "version": metadata.version},
        "paths": paths,
        "components": {"schemas": schemas},
    }
