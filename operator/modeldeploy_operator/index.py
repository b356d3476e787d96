"""The operator's in-memory view of its objects, kept from watch events and relists.

Reconciles read their snapshot from here instead of listing (issue 14): the ModelDeployments,
every child labelled as one's own, the router Services' EndpointSlices and the variant pods,
by owner. The index
is pure data: the informer (informer.py) feeds it on the event loop and each change says which
ModelDeployment it concerns, so that one, and only that one, is looked at again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from modeldeploy_operator import naming
from modeldeploy_operator.contract import ROUTER_IDENTITY
from modeldeploy_operator.plan import Snapshot, pods_worth_reading
from modeldeploy_operator.spec import KIND

MdKey = tuple[str, str]  # (namespace, name) of a ModelDeployment
ObjectKey = tuple[str, str, str]  # (kind, namespace, name)
ENDPOINT_SLICE = "EndpointSlice"
POD = "Pod"
DELETED_UIDS_KEPT = 100_000
NOT_CHILDREN = frozenset({KIND, ENDPOINT_SLICE, POD})  # kept here, but not applied by us
# The kinds of a namespace's router identity (render_router_identity), named ROUTER_IDENTITY.
IDENTITY_KINDS = ("ServiceAccount", "RoleBinding")


def is_router_identity(kind: str, obj: Mapping[str, Any]) -> bool:
    """Whether `obj` is (a part of) its namespace's router identity: no ModelDeployment owns it."""
    meta = obj.get("metadata", {})
    return (
        kind in IDENTITY_KINDS
        and meta.get("name") == ROUTER_IDENTITY
        and naming.MODEL_DEPLOYMENT not in (meta.get("labels") or {})
    )


class Index:
    """Objects by (kind, namespace, name), and children by the ModelDeployment they belong to."""

    def __init__(self) -> None:
        self._objects: dict[ObjectKey, Mapping[str, Any]] = {}
        self._owner: dict[ObjectKey, MdKey] = {}
        self._by_owner: dict[MdKey, dict[ObjectKey, Mapping[str, Any]]] = {}
        self._counts: dict[str, int] = {}
        # Uids whose deletion the watch reported (oldest first, bounded): an object a reconcile
        # wrote before it was deleted must not come back when that write reaches the index.
        self._deleted: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def counts(self) -> dict[str, int]:
        """Objects held, by kind (a copy: safe to call from another thread)."""
        return dict(self._counts)

    def model_deployments(self, namespace: str) -> list[MdKey]:
        return [(ns, name) for kind, ns, name in self._objects if kind == KIND and ns == namespace]

    def update(self, kind: str, type_: str, obj: Mapping[str, Any]) -> MdKey | None:
        """Record one watch event (ADDED, MODIFIED, DELETED); the ModelDeployment it concerns."""
        meta = obj.get("metadata", {})
        okey = (kind, meta.get("namespace", ""), meta.get("name", ""))
        before = self._owner.get(okey)
        uid = str(meta.get("uid", ""))
        if type_ == "DELETED":
            held = self._objects.get(okey)
            held_uid = str((held or {}).get("metadata", {}).get("uid", ""))
            # Not the object created again under that name (our write may be here first).
            if not uid or not held_uid or held_uid == uid:
                self._remove(okey)
            if uid:
                self._deleted[uid] = None
                if len(self._deleted) > DELETED_UIDS_KEPT:
                    del self._deleted[next(iter(self._deleted))]
            return before
        if uid in self._deleted or _older(obj, self._objects.get(okey)):
            # A watch event from before a write of ours that the index already holds.
            return before
        after = self._store(okey, obj)
        return after if after is not None else before

    def replace(
        self, kind: str, namespace: str, objects: Iterable[Mapping[str, Any]]
    ) -> set[MdKey]:
        """Make `kind` in `namespace` hold exactly `objects` (a relist); the ModelDeployments
        whose view changed: objects gone while no watch ran are dropped here, not kept stale."""
        fresh = {(kind, namespace, o["metadata"]["name"]): o for o in objects}
        stale = [k for k in self._objects if k[0] == kind and k[1] == namespace and k not in fresh]
        changed: set[MdKey] = set()
        identity_changed = False
        for okey in stale:
            owner = self._owner.get(okey)
            if owner is not None:
                changed.add(owner)
            identity_changed |= is_router_identity(kind, self._objects[okey])
            self._remove(okey)
        for okey, obj in fresh.items():
            old = self._objects.get(okey)
            before = self._owner.get(okey)
            if old is not None and _version(old) == _version(obj):
                continue
            identity_changed |= is_router_identity(kind, obj)
            after = self._store(okey, obj)
            changed.update(k for k in (before, after) if k is not None)
        if identity_changed:
            # Every ModelDeployment of the namespace relies on it; each reconcile repairs it.
            changed.update(self.model_deployments(namespace))
        return changed

    def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self._objects.get((kind, namespace, name))

    def unused_router_identity(self, namespace: str) -> list[Mapping[str, Any]]:
        """The namespace's router identity, once no ModelDeployment there may run a router."""
        for ns, name in self._by_owner:
            md = self._objects.get((KIND, ns, name)) if ns == namespace else None
            routing = ((md or {}).get("spec") or {}).get("routing") or {}
            if md is not None and routing.get("mode", "router") not in ("gateway", "none"):
                return []
        return list(self._router_identity(namespace))

    def snapshot(self, key: MdKey) -> Snapshot | None:
        """What a reconcile of `key` observes, as `plan` takes it; None when it does not exist."""
        obj = self._objects.get((KIND, *key))
        if obj is None:
            return None
        owned = self._by_owner.get(key, {})
        router = naming.router_object_name(key[1])
        children = tuple(o for (kind, _, _), o in owned.items() if kind not in NOT_CHILDREN)
        slices = tuple(
            o
            for (kind, _, _), o in owned.items()
            if kind == ENDPOINT_SLICE and _labels(o).get(naming.SERVICE_NAME_LABEL) == router
        )
        pods = [o for (kind, _, _), o in owned.items() if kind == POD]
        gate_pods = tuple(
            p for p in pods if _labels(p).get(naming.COMPONENT) == naming.COMPONENT_GATE
        )
        variant_pods = tuple(p for p in pods if p not in gate_pods)
        return Snapshot(
            model_deployment=obj,
            children=children,
            endpoint_slices=slices,
            # As the plan wants them: only while some variant is not fully rolled out.
            pods=variant_pods if pods_worth_reading(children) else (),
            gate_pods=gate_pods,
            router_identity=self._router_identity(key[0]),
        )

    def _router_identity(self, namespace: str) -> tuple[Mapping[str, Any], ...]:
        return tuple(
            o
            for kind in IDENTITY_KINDS
            if (o := self._objects.get((kind, namespace, ROUTER_IDENTITY))) is not None
            and is_router_identity(kind, o)
        )

    def _store(self, okey: ObjectKey, obj: Mapping[str, Any]) -> MdKey | None:
        self._remove(okey)
        self._objects[okey] = obj
        kind, namespace, name = okey
        self._counts[kind] = self._counts.get(kind, 0) + 1
        owner_name = name if kind == KIND else _labels(obj).get(naming.MODEL_DEPLOYMENT)
        if not owner_name:
            return None
        owner = (namespace, owner_name)
        self._owner[okey] = owner
        self._by_owner.setdefault(owner, {})[okey] = obj
        return owner

    def _remove(self, okey: ObjectKey) -> None:
        if self._objects.pop(okey, None) is not None:
            self._counts[okey[0]] -= 1
        owner = self._owner.pop(okey, None)
        if owner is None:
            return
        bucket = self._by_owner.get(owner)
        if bucket is not None:
            bucket.pop(okey, None)
            if not bucket:
                del self._by_owner[owner]


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels: Mapping[str, str] = obj.get("metadata", {}).get("labels") or {}
    return labels


def _older(obj: Mapping[str, Any], held: Mapping[str, Any] | None) -> bool:
    """Whether `obj` is an earlier version of the same object than `held`. Resource versions are
    opaque to clients, but etcd's are increasing integers: compare them only when both are."""
    if held is None:
        return False
    meta, held_meta = obj.get("metadata", {}), held.get("metadata", {})
    if meta.get("uid") != held_meta.get("uid"):
        return False
    version, held_version = str(meta.get("resourceVersion", "")), _version(held)
    return version.isdigit() and held_version.isdigit() and int(version) < int(held_version)


def _version(obj: Mapping[str, Any]) -> str:
    return str(obj.get("metadata", {}).get("resourceVersion", ""))
