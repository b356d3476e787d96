"""`modeldeploy`: the user CLI. `run` a ModelDeployment on this machine, `render` the objects the
operator would create for it, `validate` it offline as the cluster would at admission; `batch`
runs a BatchPrediction on this machine (render and validate take BatchPredictions too); `rollout`
shows or steers a rollout in the cluster."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import yaml

from modeldeploy_operator import cli_rollout
from modeldeploy_operator.batch_render import UnresolvedModel, render_batch_job, resolve_model
from modeldeploy_operator.config import DEFAULT_SERVER_IMAGE
from modeldeploy_operator.gate_jobs import render_with_gates
from modeldeploy_operator.kubeyaml import Document, KubeYAMLError, load_documents
from modeldeploy_operator.local_batch import LocalBatchSettings, run_local_batch
from modeldeploy_operator.local_runner import LocalRunSettings, run_local
from modeldeploy_operator.render import render_router_identity
from modeldeploy_operator.spec import (
    BATCH_KIND,
    KIND,
    BatchPrediction,
    InvalidSpecError,
    ModelDeployment,
    parse_batch_prediction,
    parse_model_deployment,
)
from modeldeploy_operator.validation import default_model_deployment, validate_model_deployment

DEFAULT_PORT = 8080


class ManifestError(Exception):
    """A document is not a valid ModelDeployment (or BatchPrediction); each line of the message
    names a field."""


@dataclass(frozen=True)
class Loaded:
    """One valid document, parsed as the API server would store it (CRD defaults filled in)."""

    label: str
    md: ModelDeployment


@dataclass(frozen=True)
class LoadedBatch:
    """One valid BatchPrediction document, parsed as the API server would store it."""

    label: str
    bp: BatchPrediction


@dataclass(frozen=True)
class Refused:
    """One invalid document and why, one field per line."""

    label: str
    reason: str


Verdict = Loaded | LoadedBatch | Refused


def read_documents(path: str) -> list[Document]:
    """The YAML documents of a file ('-': stdin), parsed as `kubectl apply -f` parses them."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        return load_documents(text)
    except (OSError, UnicodeDecodeError, KubeYAMLError) as error:
        raise ManifestError(f"cannot read {path}: {error}") from None


def document_kind(obj: object) -> str:
    """BatchPrediction for a document that says so, else ModelDeployment (checked as one)."""
    return BATCH_KIND if isinstance(obj, dict) and obj.get("kind") == BATCH_KIND else KIND


def check_document(obj: object) -> ModelDeployment | BatchPrediction:
    """Validate one document as admission would; parse it as the API server would store it."""
    kind = document_kind(obj)
    errors = validate_model_deployment(obj, kind)
    if errors:
        raise ManifestError("\n".join(f"{e.field}: {e.message}" for e in errors))
    stored = default_model_deployment(cast(dict[str, Any], obj), kind)
    try:
        if kind == BATCH_KIND:
            return parse_batch_prediction(stored)
        return parse_model_deployment(stored)
    except InvalidSpecError as error:
        raise ManifestError(str(error)) from None


def check_file(path: str) -> list[Verdict]:
    """One verdict per document, in file order, each labelled with the file (and document)."""
    documents = read_documents(path)
    if not documents:
        raise ManifestError(f"{path}: no YAML document in it")
    verdicts: list[Verdict] = []
    for document in documents:
        label = path if len(documents) == 1 else f"{path}, document {document.number}"
        label += "" if len(documents) == 1 else f" (line {document.line})"
        try:
            parsed = check_document(document.value)
        except ManifestError as error:
            label += f": invalid {document_kind(document.value)}{_named(document)}"
            verdicts.append(Refused(label, str(error)))
            continue
        if isinstance(parsed, BatchPrediction):
            verdicts.append(LoadedBatch(label, parsed))
        else:
            verdicts.append(Loaded(label, parsed))
    return verdicts


def _named(document: Document) -> str:
    metadata = document.value.get("metadata") if isinstance(document.value, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f" {name!r}" if isinstance(name, str) and name else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `modeldeploy` console script."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "rollout", False):
        return cli_rollout.main(args, sys.stdout, sys.stderr)
    try:
        verdicts = check_file(args.file)
    except ManifestError as error:
        print(error, file=sys.stderr)
        return 1
    loaded = [v for v in verdicts if not isinstance(v, Refused)]
    if args.command is not validate:
        for refused in verdicts:
            if isinstance(refused, Refused):
                print(f"{refused.label}:\n{_indent(refused.reason)}", file=sys.stderr)
        if len(loaded) != len(verdicts):
            return 1
    try:
        exit_code: int = args.command(args, verdicts, sys.stdout)
    except BrokenPipeError:
        # The reader went away (`modeldeploy render | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return exit_code


def run(args: argparse.Namespace, verdicts: list[Verdict], out: TextIO) -> int:
    """`modeldeploy run`: the servers and the router on loopback, until Ctrl-C or SIGTERM."""
    if any(isinstance(v, LoadedBatch) for v in verdicts):
        print(f"{args.file}: a BatchPrediction runs with `modeldeploy batch`", file=sys.stderr)
        return 1
    if len(verdicts) != 1:
        print(
            f"{args.file}: run takes one ModelDeployment, the file has {len(verdicts)}:"
            " put each in a file of its own",
            file=sys.stderr,
        )
        return 1
    (only,) = verdicts
    assert isinstance(only, Loaded)
    base_dir = Path.cwd() if args.file == "-" else Path(args.file).resolve().parent
    settings = LocalRunSettings(
        port=args.port,
        base_dir=base_dir,
        claim_dirs=dict(args.pvc),
        cache_dir=args.cache_dir,
        reload=None if args.file == "-" else watch_file(args.file),
    )
    return run_local(only.md, settings, out, sys.stderr)


def watch_file(path: str) -> Callable[[], ModelDeployment | str | None]:
    """For `run`: the file's ModelDeployment each time it changed, why it cannot be used, or None
    while it has not changed."""
    seen = [_stamp(path)]

    def reload() -> ModelDeployment | str | None:
        stamp = _stamp(path)
        if stamp == seen[0]:
            return None
        seen[0] = stamp
        try:
            (verdict,) = check_file(path)
        except (ManifestError, ValueError) as error:
            return f"{path}: {error}"
        if isinstance(verdict, Refused):
            return f"{verdict.label}: {verdict.reason}"
        if isinstance(verdict, LoadedBatch):
            return f"{path}: no longer a ModelDeployment"
        return verdict.md

    return reload


def _stamp(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)
    return stat.st_mtime_ns, stat.st_size


def render(args: argparse.Namespace, verdicts: list[Verdict], out: TextIO) -> int:
    """`modeldeploy render`: what the operator applies, as one YAML stream, every variant Ready."""
    objects = []
    identities: set[str] = set()  # namespaces whose router identity is rendered
    models = {v.md.name: v.md for v in verdicts if isinstance(v, Loaded)}
    for loaded in verdicts:
        if isinstance(loaded, LoadedBatch):
            bp = loaded.bp
            if args.namespace is not None:
                bp = dataclasses.replace(bp, namespace=args.namespace)
            try:
                model = resolve_model(bp, models.get(bp.model_ref.name) if bp.model_ref else None)
            except UnresolvedModel as error:
                print(
                    f"{loaded.label}: spec.model.modelDeployment: {error} in this file (render "
                    "reads the referenced ModelDeployment from the same file)",
                    file=sys.stderr,
                )
                return 1
            objects.append(render_batch_job(bp, model, server_image=args.server_image))
            continue
        assert isinstance(loaded, Loaded)
        md = loaded.md
        if args.namespace is not None:
            md = dataclasses.replace(md, namespace=args.namespace)
        if md.routing.mode == "router" and md.namespace not in identities:
            # What the operator creates with a namespace's first router (owned by none).
            identities.add(md.namespace)
            objects += render_router_identity(md.namespace)
        objects += render_with_gates(md, server_image=args.server_image)
    yaml.safe_dump_all(objects, out, sort_keys=False)
    return 0


def batch(args: argparse.Namespace, verdicts: list[Verdict], out: TextIO) -> int:
    """`modeldeploy batch`: the BatchPrediction's shards as processes on this machine."""
    batches = [v.bp for v in verdicts if isinstance(v, LoadedBatch)]
    if len(batches) != 1:
        print(
            f"{args.file}: batch takes one BatchPrediction (and the ModelDeployment it names, if "
            f"any); the file has {len(batches)}",
            file=sys.stderr,
        )
        return 1
    settings = LocalBatchSettings(
        base_dir=Path.cwd() if args.file == "-" else Path(args.file).resolve().parent,
        claim_dirs=dict(args.pvc),
        cache_dir=args.cache_dir,
    )
    models = [v.md for v in verdicts if isinstance(v, Loaded)]
    return run_local_batch(batches[0], models, settings, out)


def validate(args: argparse.Namespace, verdicts: list[Verdict], out: TextIO) -> int:
    """`modeldeploy validate`: one verdict per document; exit 1 if any is invalid."""
    for verdict in verdicts:
        if isinstance(verdict, Refused):
            print(f"{verdict.label}:\n{_indent(verdict.reason)}", file=sys.stderr, flush=True)
        elif isinstance(verdict, LoadedBatch):
            bp = verdict.bp
            print(
                f"{verdict.label}: valid BatchPrediction {bp.name!r} ({bp.shards} shards)",
                file=out,
                flush=True,
            )
        else:
            md = verdict.md
            print(
                f"{verdict.label}: valid ModelDeployment {md.name!r} ({len(md.variants)} variants)",
                file=out,
                flush=True,
            )
    return 0 if not any(isinstance(v, Refused) for v in verdicts) else 1


def _claim_dir(text: str) -> tuple[str, Path]:
    claim, sep, directory = text.partition("=")
    if not sep or not claim or not directory:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CLAIM=DIRECTORY")
    return claim, Path(directory).resolve()


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1..65535)")
    return port


def _default_cache_dir(env: Mapping[str, str]) -> Path:
    cache_home = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "modeldeploy" / "models"


def _add_local_locations(parser: argparse.ArgumentParser) -> None:
    """--pvc and --cache-dir: where local mode finds what pvc:// and http(s):// name."""
    parser.add_argument(
        "--pvc",
        type=_claim_dir,
        action="append",
        default=[],
        metavar="CLAIM=DIR",
        help="read pvc://CLAIM/PATH from DIR/PATH (default: the directory CLAIM beside the YAML "
        "file, or in the working directory with -f -)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=_default_cache_dir(os.environ),
        help="where http(s) models are downloaded, by sha256 (default ~/.cache/modeldeploy/models)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeldeploy",
        description="Run, render or validate a ModelDeployment (modeldeploy.dev/v1alpha1).",
    )
    commands = parser.add_subparsers(required=True, metavar="{run,render,validate,batch,rollout}")
    file_help = "the ModelDeployment YAML file ('-' reads stdin)"

    run_parser = commands.add_parser(
        "run",
        help="run it on this machine: one server per variant and the router, on 127.0.0.1",
        description="Fetch each variant's model, start its server and the weighted router on "
        "127.0.0.1, print the URLs and example requests; Ctrl-C or SIGTERM stops everything. "
        "Kubernetes-only fields are listed as ignored.",
    )
    run_parser.add_argument("-f", "--file", required=True, help=file_help)
    run_parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="the router's port (default 8080)"
    )
    _add_local_locations(run_parser)
    run_parser.set_defaults(command=run)

    render_parser = commands.add_parser(
        "render",
        help="print the Kubernetes objects the operator would create",
        description="Print, as a YAML stream, the objects the operator creates for this "
        "ModelDeployment once every variant is Ready (ownerReferences, which need the object's "
        "uid in a cluster, are left out).",
    )
    render_parser.add_argument("-f", "--file", required=True, help=file_help)
    render_parser.add_argument(
        "--namespace", help="namespace of the objects (default: metadata.namespace or 'default')"
    )
    render_parser.add_argument(
        "--server-image",
        default=DEFAULT_SERVER_IMAGE,
        help=f"the operator's server image, unless spec.pod.image is set "
        f"(default {DEFAULT_SERVER_IMAGE})",
    )
    render_parser.set_defaults(command=render)

    validate_parser = commands.add_parser(
        "validate",
        help="check it against the CRD's schema and rules, offline",
        description="Validate against the CRD's OpenAPI schema and CEL rules, as the API server "
        "does at admission; errors name the field; exit 1 if invalid.",
    )
    validate_parser.add_argument("-f", "--file", required=True, help=file_help)
    validate_parser.set_defaults(command=validate)

    batch_parser = commands.add_parser(
        "batch",
        help="run a BatchPrediction on this machine, its shards as processes",
        description="Score the BatchPrediction's input with its model: each shard is "
        "`modeldeploy-server batch --shard I/N`, as in the Job's pods; then write manifest.json "
        "in the output directory. A model named by a ModelDeployment variant is read from a "
        "ModelDeployment in the same file.",
    )
    batch_parser.add_argument(
        "-f", "--file", required=True, help="the BatchPrediction YAML file ('-' reads stdin)"
    )
    _add_local_locations(batch_parser)
    batch_parser.set_defaults(command=batch)
    cli_rollout.add_parser(commands)
    return parser


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
