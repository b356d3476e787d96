"""`modeldeploy-server`: one console script, one subcommand per process role."""

from __future__ import annotations

import importlib
import sys

# Each role lives in its own module so that `fetch` (an init container) never imports onnxruntime
# and `route` never loads a model. Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "serve": ("modeldeploy_server.serve", "serve one ONNX model over HTTP"),
    "fetch": ("modeldeploy_server.fetch", "download a model and verify its sha256"),
    "route": ("modeldeploy_server.router", "split traffic by weight across variants"),
    "batch": ("modeldeploy_server.batch", "score a CSV or JSON-lines file (one shard of it)"),
    "gate": ("modeldeploy_server.gate", "judge a variant's answers to a golden dataset"),
    "probe": ("modeldeploy_server.probe", "send a rollout's probe traffic at a bounded rate"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's module."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in SUBCOMMANDS:
        usage = "\n".join(f"  {name:<6} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
        print(
            f"usage: modeldeploy-server {{{','.join(SUBCOMMANDS)}}} ...\n{usage}", file=sys.stderr
        )
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    module_name, _ = SUBCOMMANDS[args[0]]
    module = importlib.import_module(module_name)
    exit_code: int = module.main(args[1:])
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
