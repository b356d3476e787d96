"""`modeldeploy`: the user CLI. `run` a ModelDeployment on this machine, `render` the objects the
operator would create for it, `validate` it offline as the cluster would at admission."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from modeldeploy_operator.config import DEFAULT_SERVER_IMAGE
from modeldeploy_operator.local_runner import LocalRunSettings, run_local
from modeldeploy_operator.render import render_objects
from modeldeploy_operator.spec import InvalidSpecError, ModelDeployment, parse_model_deployment
from modeldeploy_operator.validation import default_model_deployment, validate_model_deployment

DEFAULT_PORT = 8080


class ManifestError(Exception):
    """The file is not one valid ModelDeployment; each line of the message names a field."""


def load_model_deployment(path: str) -> tuple[dict[str, Any], ModelDeployment]:
    """Read one ModelDeployment from a YAML file ('-': stdin), validated as admission would.

    Returns the object as the API server would store it (CRD defaults filled in) and its parse.
    """
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ManifestError(f"cannot read {path}: {error}") from None
    if len(documents) != 1:
        raise ManifestError(f"{path}: expected one YAML document, found {len(documents)}")
    errors = validate_model_deployment(documents[0])
    if errors:
        raise ManifestError("\n".join(f"{e.field}: {e.message}" for e in errors))
    stored = default_model_deployment(documents[0])
    try:
        return stored, parse_model_deployment(stored)
    except InvalidSpecError as error:
        raise ManifestError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `modeldeploy` console script."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        stored, md = load_model_deployment(args.file)
    except ManifestError as error:
        print(f"{args.file}: invalid ModelDeployment:\n{_indent(str(error))}", file=sys.stderr)
        return 1
    try:
        exit_code: int = args.command(args, stored, md, sys.stdout)
    except BrokenPipeError:
        # The reader went away (`modeldeploy render | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return exit_code


def run(args: argparse.Namespace, stored: dict[str, Any], md: ModelDeployment, out: TextIO) -> int:
    """`modeldeploy run`: the servers and the router on loopback, until Ctrl-C or SIGTERM."""
    base_dir = Path.cwd() if args.file == "-" else Path(args.file).resolve().parent
    settings = LocalRunSettings(
        port=args.port,
        base_dir=base_dir,
        claim_dirs=dict(args.pvc),
        cache_dir=args.cache_dir,
    )
    return run_local(md, settings, out, sys.stderr)


def render(
    args: argparse.Namespace, stored: dict[str, Any], md: ModelDeployment, out: TextIO
) -> int:
    """`modeldeploy render`: what the operator applies, as a YAML stream, every variant Ready."""
    if args.namespace is not None:
        md = dataclasses.replace(md, namespace=args.namespace)
    objects = render_objects(md, server_image=args.server_image)
    yaml.dump_all(objects, out, Dumper=_BlockStringDumper, sort_keys=False)
    return 0


def validate(
    args: argparse.Namespace, stored: dict[str, Any], md: ModelDeployment, out: TextIO
) -> int:
    """`modeldeploy validate`: loading already validated; say so."""
    print(f"{args.file}: valid ModelDeployment {md.name!r} ({len(md.variants)} variants)", file=out)
    return 0


class _BlockStringDumper(yaml.SafeDumper):
    """Multi-line strings (the router's routes.json) as literal blocks, readable in reviews."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStringDumper.add_representer(str, _represent_str)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeldeploy",
        description="Run, render or validate a ModelDeployment (modeldeploy.dev/v1alpha1).",
    )
    commands = parser.add_subparsers(required=True, metavar="{run,render,validate}")
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
    run_parser.add_argument(
        "--pvc",
        type=_claim_dir,
        action="append",
        default=[],
        metavar="CLAIM=DIR",
        help="read pvc://CLAIM/PATH from DIR/PATH (default: the directory CLAIM beside the YAML "
        "file, or in the working directory with -f -)",
    )
    run_parser.add_argument(
        "--cache-dir",
        type=Path,
        default=_default_cache_dir(os.environ),
        help="where http(s) models are downloaded, by sha256 (default ~/.cache/modeldeploy/models)",
    )
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
    return parser


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
