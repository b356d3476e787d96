"""Facts the operator renders into pods and the server processes read: one home for both sides.

Dependency-free, so the operator (which must not import the server) and the server image alike
can import it.
"""

from __future__ import annotations

# A single-file ONNX model is one protobuf message, which cannot exceed 2 GiB: `fetch` refuses
# anything larger instead of filling the pod's disk.
MAX_MODEL_BYTES = 2 * 1024 * 1024 * 1024
