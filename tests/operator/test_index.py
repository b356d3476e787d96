"""The watch index: snapshots by owner, events, and relists that drop what is gone."""

from __future__ import annotations

from typing import Any

from modeldeploy_operator import naming
from modeldeploy_operator.index import Index
from modeldeploy_operator.spec import KIND


def md(name: str, version: str = "1") -> dict[str, Any]:
    meta = {"name": name, "namespace": "ns", "resourceVersion": version}
    return {"kind": KIND, "metadata": meta}


def child(
    kind: str, name: str, owner: str, version: str = "1", uid: str = "", **labels: str
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "resourceVersion": version,
        "labels": {naming.MODEL_DEPLOYMENT: owner, **labels},
    }
    if uid:
        meta["uid"] = uid
    return {"kind": kind, "metadata": meta}


def names(index: Index, owner: str) -> list[str]:
    snapshot = index.snapshot(("ns", owner))
    assert snapshot is not None
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in snapshot.children)


def test_snapshot_holds_the_owners_children_and_its_router_slices_only() -> None:
    index = Index()
    index.replace(KIND, "ns", [md("a"), md("b")])
    index.replace(
        "Deployment", "ns", [child("Deployment", "a-v1", "a"), child("Deployment", "b-v1", "b")]
    )
    router_slice = child("EndpointSlice", "a-x", "a", **{naming.SERVICE_NAME_LABEL: "a"})
    other_slice = child("EndpointSlice", "a-v1-x", "a", **{naming.SERVICE_NAME_LABEL: "a-v1"})
    index.replace("EndpointSlice", "ns", [router_slice, other_slice])
    snapshot = index.snapshot(("ns", "a"))
    assert snapshot is not None
    assert names(index, "a") == ["Deployment/a-v1"]
    assert list(snapshot.endpoint_slices) == [router_slice]
    assert index.snapshot(("ns", "gone")) is None
    assert index.counts() == {KIND: 2, "Deployment": 2, "EndpointSlice": 2}


def test_events_say_which_model_deployment_they_concern() -> None:
    index = Index()
    index.replace(KIND, "ns", [md("a")])
    assert index.update("Service", "ADDED", child("Service", "a-v1", "a")) == ("ns", "a")
    # A child relabelled to another owner leaves the first one's snapshot.
    assert index.update("Service", "MODIFIED", child("Service", "a-v1", "b", "2")) == ("ns", "b")
    assert names(index, "a") == []
    assert index.update("Service", "DELETED", child("Service", "a-v1", "b", "3")) == ("ns", "b")
    assert index.counts()["Service"] == 0


def test_a_relist_drops_objects_deleted_while_no_watch_ran_and_names_their_owners() -> None:
    index = Index()
    index.replace(KIND, "ns", [md("a"), md("b")])
    index.replace(
        "RouteTable",
        "ns",
        [child("RouteTable", "a-routes", "a"), child("RouteTable", "b-routes", "b")],
    )
    changed = index.replace("RouteTable", "ns", [child("RouteTable", "b-routes", "b")])
    assert changed == {("ns", "a")}  # b's is unchanged (same resourceVersion)
    assert names(index, "a") == [] and names(index, "b") == ["RouteTable/b-routes"]
    changed = index.replace("RouteTable", "ns", [child("RouteTable", "b-routes", "b", "7")])
    assert changed == {("ns", "b")}
    assert index.replace(KIND, "ns", [md("b")]) == {("ns", "a")}
    assert index.model_deployments("ns") == [("ns", "b")]


def test_an_event_older_than_what_the_index_holds_does_not_replace_it() -> None:
    """The operator writes what it applied into the index; the watch's earlier events that
    arrive afterwards must not bring back the object as it was before that write."""
    index = Index()
    written = child("Deployment", "a-v1", "a", version="120", uid="u1")
    index.update("Deployment", "MODIFIED", written)
    late = child("Deployment", "a-v1", "a", version="95", uid="u1")
    assert index.update("Deployment", "MODIFIED", late) == ("ns", "a")
    assert index.get("Deployment", "ns", "a-v1") is written
    newer = child("Deployment", "a-v1", "a", version="121", uid="u1")
    index.update("Deployment", "MODIFIED", newer)
    assert index.get("Deployment", "ns", "a-v1") is newer
    # Another object of that name (deleted and created again) is news at any version.
    recreated = child("Deployment", "a-v1", "a", version="7", uid="u2")
    index.update("Deployment", "MODIFIED", recreated)
    assert index.get("Deployment", "ns", "a-v1") is recreated


def test_a_write_that_reaches_the_index_after_its_objects_deletion_is_dropped() -> None:
    """A reconcile applied a child, the garbage collector deleted it (the watch said so), and
    only then the reconcile's write reaches the index: it must not bring the object back."""
    index = Index()
    applied = child("Deployment", "gone-v1", "gone", version="40", uid="u1")
    index.update("Deployment", "ADDED", applied)
    index.update("Deployment", "DELETED", applied)
    index.update("Deployment", "MODIFIED", applied)  # the reconcile's write, late
    assert index.get("Deployment", "ns", "gone-v1") is None
    assert index.counts()["Deployment"] == 0
    again = child(
        "Deployment", "gone-v1", "gone", version="41", uid="u2"
    )  # created anew: another uid, news
    index.update("Deployment", "ADDED", again)
    assert index.get("Deployment", "ns", "gone-v1") is again


def test_the_deletion_of_a_recreated_objects_predecessor_keeps_the_new_one() -> None:
    """Recreate: our write of the new object reaches the index before the watch reports the old
    one's deletion; that deletion must not remove the new one."""
    index = Index()
    old = child("Service", "a-v1", "a", version="10", uid="old")
    index.update("Service", "ADDED", old)
    new = child("Service", "a-v1", "a", version="12", uid="new")
    index.update("Service", "MODIFIED", new)  # our write, through
    index.update("Service", "DELETED", old)  # the watch, late
    assert index.get("Service", "ns", "a-v1") is new


def identity(kind: str, version: str = "1") -> dict[str, Any]:
    meta = {
        "name": "modeldeploy-router",
        "namespace": "ns",
        "resourceVersion": version,
        "labels": {naming.MANAGED_BY: naming.FIELD_MANAGER},
    }
    return {"kind": kind, "metadata": meta}


def test_the_router_identity_is_every_model_deployment_s_and_released_with_the_last() -> None:
    index = Index()
    index.replace(KIND, "ns", [md("a"), md("b")])
    account, binding = identity("ServiceAccount"), identity("RoleBinding")
    # Owned by none: its events name no ModelDeployment, every snapshot shows it.
    assert index.update("ServiceAccount", "ADDED", account) is None
    assert index.update("RoleBinding", "ADDED", binding) is None
    for name in ("a", "b"):
        snapshot = index.snapshot(("ns", name))
        assert snapshot is not None and list(snapshot.router_identity) == [account, binding]
        assert snapshot.children == ()
    # A relist that finds it changed (a watch missed the edit) concerns every ModelDeployment.
    assert index.replace("RoleBinding", "ns", [identity("RoleBinding", "2")]) == {
        ("ns", "a"),
        ("ns", "b"),
    }
    assert index.unused_router_identity("ns") == []
    gateway = md("b", "2")
    gateway["spec"] = {"routing": {"mode": "gateway"}}
    index.update(KIND, "MODIFIED", gateway)
    index.update(KIND, "DELETED", md("a"))
    assert [o["kind"] for o in index.unused_router_identity("ns")] == [
        "ServiceAccount",
        "RoleBinding",
    ]
