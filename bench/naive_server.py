"""The naive baseline: a plain Starlette endpoint, json.loads -> numpy -> session.run -> json.

What a first version of an ONNX endpoint usually looks like; run under plain `uvicorn` defaults.
Model path from NAIVE_MODEL_PATH.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_options = ort.SessionOptions()
_options.intra_op_num_threads = 1
session = ort.InferenceSession(os.environ["NAIVE_MODEL_PATH"], _options)


async def infer(request: Request) -> Response:
    payload = json.loads(await request.body())
    tensor = payload["inputs"][0]
    data = np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    results = session.run(None, {tensor["name"]: data})
    outputs = [
        {"name": node.name, "shape": list(value.shape), "data": value.ravel().tolist()}
        for node, value in zip(session.get_outputs(), results, strict=True)
    ]
    return Response(json.dumps({"outputs": outputs}), media_type="application/json")


app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
