"""Facts the operator renders into pods and the server processes read: one home for both sides.

Dependency-free, so the operator (which must not import the server) and the server image alike
can import it.
"""

from __future__ import annotations

# A single-file ONNX model is one protobuf message, which cannot exceed 2 GiB: `fetch` refuses
# anything larger instead of filling the pod's disk.
MAX_MODEL_BYTES = 2 * 1024 * 1024 * 1024

# The router's routes live in a RouteTable (a custom resource of ours, `<md>-routes`): the
# operator applies its `spec.routes`, a JSON object in the format of a routes file in local mode,
# carrying a `version` (the operator's content hash). Routers need no other object, so they share
# one identity per namespace (ServiceAccount `modeldeploy-router`, bound to the ClusterRole of the
# same name: read RouteTables, patch their status) instead of a Role per ModelDeployment, which
# costs the API server an RBAC escalation check per write.
ROUTE_TABLE_API_VERSION = "modeldeploy.dev/v1alpha1"
ROUTE_TABLE_KIND = "RouteTable"
ROUTE_TABLE_PLURAL = "routetables"
ROUTER_IDENTITY = "modeldeploy-router"
# After serving routes version V, each router pod sets `status.acks[<pod name>] = V` on its
# RouteTable (a JSON merge patch of the status subresource under its own field manager); the
# operator reads them.
ROUTER_FIELD_MANAGER = "modeldeploy-router"
# The router pod's env: which RouteTable to watch (NAMESPACE/NAME) and its own pod name.
ROUTE_TABLE_ENV = "MODELDEPLOY_ROUTE_TABLE"
POD_NAME_ENV = "MODELDEPLOY_POD_NAME"
# The router's wait for a variant's answer (`routing.timeoutSeconds`), and its disagreement log
# of shadow answers (a file and the size at which it rotates), all set by the operator's render.
ROUTER_TIMEOUT_ENV = "MODELDEPLOY_ROUTER_TIMEOUT_S"
ROUTER_DEFAULT_TIMEOUT_S = 60
ROUTER_SHADOW_LOG_ENV = "MODELDEPLOY_ROUTER_SHADOW_LOG"
ROUTER_SHADOW_LOG_MAX_BYTES_ENV = "MODELDEPLOY_ROUTER_SHADOW_LOG_MAX_BYTES"

# A rollout's probe Job sends this token in the probe header (`x-modeldeploy-probe`); the router
# counts a request as probe traffic only with the token of its routes (`probeToken`).
PROBE_TOKEN_ENV = "MODELDEPLOY_PROBE_TOKEN"

# After SIGTERM a server or router fails readiness at once but keeps its port open this long
# (answering with `Connection: close`) before it stops accepting, so that whoever balances load
# onto it (kube-proxy, a gateway, the router) stops sending first: a plain SIGTERM drops nothing.
# The operator counts it in each pod's terminationGracePeriodSeconds.
SHUTDOWN_DELAY_S = 5

# A BatchPrediction's run: its shards get its uid and name, write the uid into their part
# manifests, and the last shard to finish writes the run's combined manifest (this file name) into
# the output directory, from the part manifests of that uid only.
BATCH_RUN_ID_ENV = "MODELDEPLOY_BATCH_RUN_ID"
BATCH_RUN_NAME_ENV = "MODELDEPLOY_BATCH_RUN_NAME"
BATCH_MANIFEST = "manifest.json"
