#!/usr/bin/env bash
# End to end on a real cluster (kind): builds both images, loads them into kind, installs with
# `kubectl apply -k manifests/`, deploys examples/iris.yaml as written (its models on a
# PersistentVolumeClaim `models`), waits for the ModelDeployment to be Ready and sends predictions
# through the router. Needs a running Docker engine, kind and kubectl: where one is missing it
# prints `SKIP: <reason>` and exits 0. KEEP_CLUSTER=true keeps the cluster for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."

skip() { echo "SKIP: $*"; exit 0; }
command -v docker >/dev/null || skip "docker is not installed; kind needs a Docker engine"
docker info >/dev/null 2>&1 || skip "no Docker engine answers (docker info failed); kind needs one"
command -v kind >/dev/null || skip "kind is not installed (go install sigs.k8s.io/kind@latest)"
command -v kubectl >/dev/null || skip "kubectl is not installed"

cluster=${KIND_CLUSTER:-modeldeploy-e2e}
tag="e2e-$(git rev-parse --short HEAD 2>/dev/null || echo local)"
server_image="modeldeploy-server:$tag"
operator_image="modeldeploy-operator:$tag"
ns=modeldeploy-e2e
local_port=${E2E_PORT:-18080}
step() { printf '\n=== %s\n' "$*"; }
kctl() { kubectl --context "kind-$cluster" "$@"; }

forward_pid=""
cleanup() {
    [[ -z $forward_pid ]] || kill "$forward_pid" 2>/dev/null || true
    [[ ${KEEP_CLUSTER:-false} == true ]] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "build $server_image and $operator_image"
docker build -f Dockerfile.server -t "$server_image" .
docker build -f Dockerfile.operator -t "$operator_image" .

step "kind cluster $cluster"
kind get clusters 2>/dev/null | grep -qx "$cluster" || kind create cluster --name "$cluster" --wait 180s
kind load docker-image --name "$cluster" "$server_image" "$operator_image"

step "install: kubectl apply -k manifests/"
kctl apply -k manifests/
kctl -n modeldeploy-system set image deployment/modeldeploy-operator operator="$operator_image"
kctl -n modeldeploy-system set env deployment/modeldeploy-operator \
    MODELDEPLOY_SERVER_IMAGE="$server_image"
kctl -n modeldeploy-system rollout status deployment/modeldeploy-operator --timeout=180s

step "models: PersistentVolumeClaim 'models' holding examples/models/*.onnx"
kctl create namespace "$ns" --dry-run=client -o yaml | kctl apply -f -
kctl label namespace "$ns" pod-security.kubernetes.io/enforce=restricted --overwrite
kctl -n "$ns" apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: models}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 16Mi}}}
---
apiVersion: v1
kind: Pod
metadata: {name: models-loader}
spec:
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    fsGroup: 65532
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: loader
      image: $server_image
      command: [python, -c, "import time; time.sleep(3600)"]
      securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
      volumeMounts: [{name: models, mountPath: /models}]
  volumes: [{name: models, persistentVolumeClaim: {claimName: models}}]
YAML
kctl -n "$ns" wait --for=condition=Ready pod/models-loader --timeout=180s
for model in examples/models/*.onnx; do
    kctl -n "$ns" cp "$model" "models-loader:/models/$(basename "$model")"
done
kctl -n "$ns" delete pod models-loader --wait=false

step "deploy examples/iris.yaml"
kctl -n "$ns" apply -f examples/iris.yaml
kctl -n "$ns" wait --for=condition=Ready modeldeployment/iris --timeout=300s
kctl -n "$ns" get modeldeployment iris -o wide

step "predict through the router (port-forward to 127.0.0.1:$local_port)"
kctl -n "$ns" port-forward svc/iris "$local_port:80" >/dev/null &
forward_pid=$!
url="http://127.0.0.1:$local_port"
for _ in $(seq 60); do curl -sf "$url/v2/health/ready" >/dev/null && break; sleep 1; done
rows='{"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.0, 1.7]]}'
for variant in v1 v2; do
    answer=$(curl -sf -D /dev/stderr "$url/v1/models/iris:predict" -H "x-model-variant: $variant" \
        -H 'content-type: application/json' -d "$rows")
    echo "$variant: $answer"
    grep -q '"predictions"' <<<"$answer"
done
curl -sf "$url/v2/models/iris/infer" -H 'content-type: application/json' -d '{"inputs": [
  {"name": "sepal_length", "datatype": "FP32", "shape": [1, 1], "data": [5.1]},
  {"name": "sepal_width", "datatype": "FP32", "shape": [1, 1], "data": [3.5]},
  {"name": "petal_length", "datatype": "FP32", "shape": [1, 1], "data": [1.4]},
  {"name": "petal_width", "datatype": "FP32", "shape": [1, 1], "data": [0.2]}]}'
echo
step "passed"
