"""The API server's audit log, for counting what the operator asks of it (issue 14): a control
plane started with `audit_flags` records every request of one user; `Audit` reads them back from
a mark on. Shared by tests/operator/test_quiet.py and bench/operator_bench.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

WRITES = frozenset({"create", "update", "patch", "delete", "deletecollection"})
POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["%s"]
  - level: None
"""


def operator_user(namespace: str) -> str:
    """The operator's ServiceAccount (manifests/serviceaccount.yaml) installed in `namespace`."""
    return f"system:serviceaccount:{namespace}:modeldeploy-operator"


def audit_flags(directory: Path, user: str) -> tuple[list[str], Audit]:
    """kube-apiserver flags that log every request of `user`, and the log they write."""
    policy = directory / "audit-policy.yaml"
    policy.write_text(POLICY % user)
    audit = Audit(directory / "audit.log", user)
    flags = [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={audit.path}",
        "--audit-log-format=json",
        "--audit-log-mode=blocking",
    ]
    return flags, audit


class Audit:
    """One user's requests as the API server's audit log records them, from a mark on."""

    def __init__(self, path: Path, user: str) -> None:
        self.path = path
        self.user = user
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def requests(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as log:
            log.seek(self.offset)
            lines = log.read().splitlines()
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if e["user"]["username"] == self.user]

    def verbs(self) -> Counter[str]:
        """Requests since the mark by verb (get, list, watch, create, patch, ...)."""
        return Counter(e["verb"] for e in self.requests())

    def writes(self) -> Counter[str]:
        """'verb resource/name[/subresource]' of every write since the mark."""
        return Counter(
            f"{e['verb']} {e['objectRef'].get('resource')}/{e['objectRef'].get('name', '')}"
            + (f"/{e['objectRef']['subresource']}" if e["objectRef"].get("subresource") else "")
            for e in self.requests()
            if e["verb"] in WRITES
        )

    def lists(self) -> list[str]:
        return [e["requestURI"] for e in self.requests() if e["verb"] == "list"]
