"""Pure batch logic: which queued requests can share one model run, merging and splitting."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from modeldeploy_server.errors import ServerError

Feed = Mapping[str, np.ndarray[Any, Any]]


def merge_key(feed: Feed) -> Hashable:
    """Requests merge only when every input agrees on everything but the batch dimension, and a
    request's own inputs agree on that one: one whose first dimensions differ runs alone."""
    if len({array.shape[0] for array in feed.values()}) > 1:
        return object()
    return tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in feed.items()))


def plan_batches(
    keys: Sequence[Hashable], rows: Sequence[int], max_batch_size: int
) -> list[list[int]]:
    """Group request indices (in arrival order) into batches of one key and at most
    max_batch_size rows; a request larger than that runs alone."""
    batches: list[list[int]] = []
    open_batch: dict[Hashable, tuple[list[int], int]] = {}
    for index, (key, count) in enumerate(zip(keys, rows, strict=True)):
        if count >= max_batch_size:
            batches.append([index])
            continue
        current = open_batch.get(key)
        if current is not None and current[1] + count <= max_batch_size:
            current[0].append(index)
            open_batch[key] = (current[0], current[1] + count)
            continue
        batch = [index]
        batches.append(batch)
        open_batch[key] = (batch, count)
    return batches


def merge_feeds(feeds: Sequence[Feed]) -> dict[str, np.ndarray[Any, Any]]:
    """Concatenate the requests' inputs along the batch dimension."""
    if len(feeds) == 1:
        return dict(feeds[0])
    return {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}


def split_outputs(
    outputs: Mapping[str, np.ndarray[Any, Any]], rows: Sequence[int]
) -> list[dict[str, np.ndarray[Any, Any]]]:
    """Cut merged outputs back into per-request outputs, in order."""
    if len(rows) == 1:
        return [dict(outputs)]
    total = sum(rows)
    for name, array in outputs.items():
        if array.shape[:1] != (total,):
            raise ValueError(f"output {name!r} has shape {array.shape}, expected {total} rows")
    bounds = np.cumsum([0, *rows]).tolist()
    return [
        {name: array[start:stop] for name, array in outputs.items()}
        for start, stop in itertools.pairwise(bounds)
    ]


def shifted(feed: Feed) -> dict[str, np.ndarray[Any, Any]]:
    """A second request like `feed`, every floating-point value moved by one (integers may be
    indices or sizes, strings categories: they stay)."""
    return {name: array + 1 if array.dtype.kind == "f" else array for name, array in feed.items()}


def answers_row_by_row(
    together: Mapping[str, np.ndarray[Any, Any]],
    first: Mapping[str, np.ndarray[Any, Any]],
    second: Mapping[str, np.ndarray[Any, Any]],
) -> bool:
    """Whether a merged run of two requests answered each what it answers alone, stacked."""
    for name, array in together.items():
        if array.ndim == 0 or first[name].ndim == 0:
            return False
        expected = np.concatenate([first[name], second[name]])
        if array.shape != expected.shape:
            return False
        if array.dtype.kind in "fc":
            if not np.allclose(array, expected, rtol=1e-4, atol=1e-5, equal_nan=True):
                return False
        elif not np.array_equal(array, expected):
            return False
    return True


def probe_batching(
    run: Callable[[Feed], Mapping[str, np.ndarray[Any, Any]]], feed: Feed
) -> tuple[bool, str | None]:
    """Whether rows may share a model run (the server merging requests, batch scoring a chunk):
    do two requests run together answer what they answer apart? The graph's shapes cannot tell
    (Gather with row numbers, a reduction over the first dimension); one merged run of `feed`
    and a shifted copy can. With what to log, when there is something."""
    second = shifted(feed)
    try:
        together = run(merge_feeds([feed, second]))
        apart = (run(feed), run(second))
    except ServerError as exc:
        return True, f"the model refused the probe ({exc}); trusting the graph"
    if answers_row_by_row(together, *apart):
        return True, None
    return False, (
        "two requests run together answer differently than apart, so the first dimension is no "
        "batch axis; each request runs as sent"
    )
