"""The few API calls `modeldeploy rollout` makes, as kubectl makes them: a kubeconfig's current
context (server, CA, token or client certificate), a GET of the ModelDeployment and a JSON merge
patch of one annotation (what `kubectl annotate --overwrite` sends). No Kubernetes client library:
the CLI installs with the local extra only.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import yaml

from modeldeploy_operator.spec import API_GROUP, API_VERSION, PLURAL

FIELD_MANAGER = "modeldeploy-cli"
TIMEOUT_S = 30.0


class KubeconfigError(Exception):
    """The kubeconfig cannot be used (missing, no such context, unsupported credentials)."""


class RequestError(Exception):
    """The API server refused a request or could not be reached."""


@dataclass(frozen=True)
class Connection:
    server: str
    namespace: str
    context: ssl.SSLContext
    token: str | None


def default_kubeconfig(env: Mapping[str, str]) -> Path:
    """$KUBECONFIG (its first file) or ~/.kube/config, as kubectl reads it."""
    first = env.get("KUBECONFIG", "").split(os.pathsep)[0]
    return Path(first) if first else Path.home() / ".kube" / "config"


def connect(path: Path, context_name: str | None = None) -> Connection:
    """What the kubeconfig at `path` says about reaching the cluster of its (or the named)
    context."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {error}") from None
    name = context_name or config.get("current-context")
    context = _named(config, "contexts", name, "context")
    cluster = _named(config, "clusters", context.get("cluster"), "cluster")
    user = _named(config, "users", context.get("user"), "user") if context.get("user") else {}
    base = path.parent
    if cluster.get("insecure-skip-tls-verify"):
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    elif cluster.get("certificate-authority-data"):
        tls = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
    elif cluster.get("certificate-authority"):
        tls = ssl.create_default_context(cafile=str(base / cluster["certificate-authority"]))
    else:
        tls = ssl.create_default_context()
    _load_client_certificate(tls, user, base)
    token = user.get("token")
    if token is None and user.get("tokenFile"):
        token = (base / user["tokenFile"]).read_text(encoding="utf-8").strip()
    if "exec" in user or "auth-provider" in user:
        raise KubeconfigError("exec and auth-provider credentials are not supported; use kubectl")
    return Connection(
        server=str(cluster["server"]).rstrip("/"),
        namespace=str(context.get("namespace") or "default"),
        context=tls,
        token=token,
    )


def _named(config: Mapping[str, Any], section: str, name: Any, field: str) -> dict[str, Any]:
    for entry in config.get(section) or []:
        if entry.get("name") == name:
            return cast(dict[str, Any], entry.get(field) or {})
    raise KubeconfigError(f"kubeconfig has no {field} named {name!r}")


def _load_client_certificate(tls: ssl.SSLContext, user: Mapping[str, Any], base: Path) -> None:
    if user.get("client-certificate-data"):
        # ssl reads a certificate chain from files only: a private directory, removed at once.
        with tempfile.TemporaryDirectory() as directory:
            cert, key = Path(directory, "cert"), Path(directory, "key")
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            tls.load_cert_chain(cert, key)
    elif user.get("client-certificate"):
        tls.load_cert_chain(base / user["client-certificate"], base / user["client-key"])


class ModelDeployments:
    """GET and annotate ModelDeployments of one namespace."""

    def __init__(self, connection: Connection, namespace: str | None = None) -> None:
        self.namespace = namespace or connection.namespace
        headers = {"Accept": "application/json"}
        if connection.token:
            headers["Authorization"] = f"Bearer {connection.token}"
        self._client = httpx.Client(
            base_url=connection.server,
            verify=connection.context,
            headers=headers,
            timeout=TIMEOUT_S,
        )

    def close(self) -> None:
        self._client.close()

    def _path(self, name: str) -> str:
        return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{self.namespace}/{PLURAL}/{name}"

    def get(self, name: str) -> dict[str, Any]:
        return self._request("GET", self._path(name))

    def annotate(self, name: str, key: str, value: str) -> dict[str, Any]:
        """`kubectl annotate --overwrite modeldeployment/NAME KEY=VALUE`."""
        return self._request(
            "PATCH",
            self._path(name),
            params={"fieldManager": FIELD_MANAGER},
            content=json.dumps({"metadata": {"annotations": {key: value}}}).encode(),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    def _request(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, **options)
        except httpx.HTTPError as error:
            raise RequestError(f"{method} {path}: {error}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise RequestError(f"{method} {path}: {response.status_code} {message}")
        return cast(dict[str, Any], response.json())
