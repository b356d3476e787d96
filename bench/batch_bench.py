"""Batch predictions benchmark: `modeldeploy-server batch` against raw onnxruntime, and its memory.

One command (from the repository root):

    .venv/bin/python bench/batch_bench.py [--rows 1000000] [--rss-rows 10000000]
        [--out bench/results/batch.json]

For the iris logistic regression and the digits MLP (tests/models.py), at the same batch size
(--batch-rows, default 8192):
- raw onnxruntime: `session.run` in this process, one thread, pinned to CPU 0, on ready numpy
  arrays (the ceiling: no file, no parsing, no output);
- raw file loop: the least a script does for the same job in this process, pinned to CPU 0:
  read the CSV with the csv module in chunks, np.array(..., float32), session.run, csv.writer;
- one shard: `modeldeploy-server batch` on one core (taskset -c 0, --intra-op-threads 1);
- two shards: `--shard 0/2` on CPU 0 and `--shard 1/2` on CPU 1 at once (wall time of both);
- the same with `--format npz` (binary columns in and out, nothing to parse) on
  --npz-rows-factor times the rows (default 10: it is that much faster), and a shard's fixed
  start cost (a one-row file), which `..._cpu_after_start` leaves out.
Then the resident memory of one shard over a --rss-rows-row iris CSV, sampled every 0.2 s.
Prints `uptime` first: on a shared machine the numbers are only as good as its load. So rates are
also given per CPU second (the process's user + system time: what other processes on the core
do not change), and `one_shard_vs_raw_onnxruntime_cpu` compares those.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.models import BuiltModel, build_digits_mlp, build_iris_logreg  # noqa: E402
from tests.processes import server_command  # noqa: E402


def write_csv(path: Path, features: np.ndarray[Any, Any], rows: int) -> None:
    """`rows` rows cycling through the data set's rows, float32 text, a header of feature names."""
    block = "".join(",".join(str(np.float32(v)) for v in row) + "\n" for row in features)
    header = ",".join(f"f{i}" for i in range(features.shape[1])) + "\n"
    whole, rest = divmod(rows, len(features))
    tail = "".join(block.splitlines(keepends=True)[:rest])
    with path.open("w") as stream:
        stream.write(header)
        for _ in range(whole):
            stream.write(block)
        stream.write(tail)


def write_npz(path: Path, features: np.ndarray[Any, Any], rows: int) -> None:
    """The same rows as write_csv, as float32 arrays in an .npz (np.savez: stored members)."""
    reps = -(-rows // len(features))
    np.savez(path, input=np.tile(features.astype(np.float32), (reps, 1))[:rows])


def session(built: BuiltModel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(built.path), options, providers=["CPUExecutionProvider"])


def raw_onnxruntime(built: BuiltModel, rows: int, batch_rows: int) -> tuple[float, float]:
    """rows/s and rows per CPU second of session.run alone on ready arrays of batch_rows rows,
    the best of three passes over `rows` rows after a warm-up pass. CPU is this thread's own
    (`thread_time`: session.run with one intra-op thread runs on the caller), so BLAS threads
    still spinning after the model was trained are not charged to onnxruntime; a cold first
    pass measured 0.6x the later ones."""
    sess = session(built)
    reps = -(-batch_rows // len(built.features))
    batch = np.tile(built.features, (reps, 1))[:batch_rows].astype(np.float32)
    runs = max(rows // batch_rows, 1)
    best_wall = best_cpu = float("inf")
    for attempt in range(4):
        started, cpu = time.perf_counter(), time.thread_time()
        for _ in range(runs):
            sess.run(None, {"input": batch})
        if attempt:
            best_wall = min(best_wall, time.perf_counter() - started)
            best_cpu = min(best_cpu, time.thread_time() - cpu)
    done = runs * batch_rows
    return done / best_wall, done / best_cpu


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def raw_file_loop(built: BuiltModel, source: Path, batch_rows: int) -> float:
    """rows/s of a minimal in-process CSV-to-CSV loop (no validation, no sharding, no digests)."""
    sess = session(built)
    names = [o.name for o in sess.get_outputs()]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    rows = 0
    started = time.perf_counter()
    with source.open(newline="") as stream:
        reader = csv.reader(stream)
        next(reader)
        while chunk := [row for _, row in zip(range(batch_rows), reader, strict=False)]:
            label, probabilities = sess.run(names, {"input": np.array(chunk, dtype=np.float32)})
            writer.writerows(np.column_stack([label, probabilities]).astype(str).tolist())
            out.seek(0)
            out.truncate()
            rows += len(chunk)
    return rows / (time.perf_counter() - started)


def shards(
    built: BuiltModel,
    source: Path,
    output: Path,
    count: int,
    batch_rows: int,
    file_format: str = "csv",
) -> dict[str, Any]:
    """Run `count` shards at once, shard i pinned to CPU i; rows/s over the wall time, peak RSS."""
    processes = []
    started, cpu = time.perf_counter(), _children_cpu_s()
    for index in range(count):
        argv = [
            "taskset", "-c", str(index % os.cpu_count()),  # type: ignore[operator]
            *server_command(), "batch", "--model-path", str(built.path),
            "--sha256", built.sha256, "--input", str(source), "--output", str(output),
            "--shard", f"{index}/{count}", "--batch-rows", str(batch_rows),
            "--intra-op-threads", "1", "--format", file_format,
            "--termination-message-path", str(output / f"message-{index}.json"),
        ]  # fmt: skip
        processes.append(subprocess.Popen(argv, stderr=subprocess.PIPE))
    peak = 0
    samples: list[int] = []
    while any(p.poll() is None for p in processes):
        rss = 0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                rss += psutil.Process(process.pid).memory_info().rss
        peak = max(peak, rss)
        samples.append(rss)
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(err.decode())
    cpu_seconds = _children_cpu_s() - cpu
    messages = [json.loads((output / f"message-{i}.json").read_text()) for i in range(count)]
    rows = sum(m["rowsIn"] for m in messages)
    return {
        "shards": count,
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "cpu_seconds": round(cpu_seconds, 2),
        "rows_per_cpu_s": round(rows / cpu_seconds),
        "peak_rss_mib": round(peak / 2**20, 1),
        "rss_mib_at_10_50_90_percent": [
            round(samples[int(len(samples) * f)] / 2**20, 1) for f in (0.1, 0.5, 0.9)
        ]
        if samples
        else [],
    }


def npz_cells(
    built: BuiltModel, work: Path, name: str, rows: int, args: argparse.Namespace, raw_cpu: float
) -> dict[str, Any]:
    """The same model on .npz input and output: 1 and 2 shards, and a shard's start cost (a
    one-row file: imports, model sha256, probe), which the ratio after start leaves out."""
    cell: dict[str, Any] = {"npz_rows": rows}
    source = work / f"{name}.npz"
    write_npz(source, built.features, 1)
    start = shards(built, source, work / f"{name}-npz-start", 1, args.batch_rows, "npz")
    cell["npz_start_cpu_seconds"] = start["cpu_seconds"]
    write_npz(source, built.features, rows)
    cell["npz_bytes"] = source.stat().st_size
    for count in (1, 2):
        out = work / f"{name}-npz-out-{count}"
        cell[f"npz_shards_{count}"] = shards(built, source, out, count, args.batch_rows, "npz")
    one = cell["npz_shards_1"]
    cell["one_npz_shard_vs_raw_onnxruntime_cpu"] = round(one["rows_per_cpu_s"] / raw_cpu, 3)
    after_start = rows / max(one["cpu_seconds"] - start["cpu_seconds"], 1e-9)
    cell["one_npz_shard_vs_raw_onnxruntime_cpu_after_start"] = round(after_start / raw_cpu, 3)
    source.unlink()
    return cell


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per model for speed")
    parser.add_argument("--rss-rows", type=int, default=10_000_000, help="rows for the RSS run")
    parser.add_argument("--batch-rows", type=int, default=8192)
    parser.add_argument("--models", default="iris,mlp")
    parser.add_argument(
        "--npz-rows-factor", type=int, default=10, help=".npz runs score this many times --rows"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "batch.json")
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    os.sched_setaffinity(0, {0})
    results: dict[str, Any] = {"uptime_before": os.getloadavg(), "batch_rows": args.batch_rows}
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as scratch:
        work = Path(scratch)
        builders = {"iris": build_iris_logreg, "mlp": build_digits_mlp}
        for name in args.models.split(","):
            built = builders[name](work)
            # The MLP costs ~100x iris per row: fewer rows keep each cell to seconds.
            rows = args.rows if name == "iris" else args.rows // 10
            source = work / f"{name}.csv"
            write_csv(source, built.features, rows)
            cell: dict[str, Any] = {"rows": rows, "csv_bytes": source.stat().st_size}
            raw, raw_cpu = raw_onnxruntime(built, rows, args.batch_rows)
            cell["raw_onnxruntime_rows_per_s"] = round(raw)
            cell["raw_onnxruntime_rows_per_cpu_s"] = round(raw_cpu)
            cell["raw_file_loop_rows_per_s"] = round(raw_file_loop(built, source, args.batch_rows))
            for count in (1, 2):
                out = work / f"{name}-out-{count}"
                cell[f"shards_{count}"] = shards(built, source, out, count, args.batch_rows)
            one = cell["shards_1"]["rows_per_s"]
            cell["one_shard_vs_raw_onnxruntime"] = round(
                one / cell["raw_onnxruntime_rows_per_s"], 3
            )
            cell["one_shard_vs_raw_file_loop"] = round(one / cell["raw_file_loop_rows_per_s"], 3)
            cell["one_shard_vs_raw_onnxruntime_cpu"] = round(
                cell["shards_1"]["rows_per_cpu_s"] / raw_cpu, 3
            )
            source.unlink()
            cell.update(npz_cells(built, work, name, rows * args.npz_rows_factor, args, raw_cpu))
            results[name] = cell
            print(name, json.dumps(cell), flush=True)
        if args.rss_rows:
            built = build_iris_logreg(work)
            source = work / "big.csv"
            write_csv(source, built.features, args.rss_rows)
            rss = shards(built, source, work / "big-out", 1, args.batch_rows)
            rss["csv_bytes"] = source.stat().st_size
            results["rss"] = rss
            print("rss", json.dumps(rss), flush=True)
    results["uptime_after"] = os.getloadavg()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
