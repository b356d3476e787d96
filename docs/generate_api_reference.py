"""Write docs/api.md, the ModelDeployment and BatchPrediction API reference, from the CRDs' own
schemas.

The CRDs (crds/*.modeldeploy.dev.yaml) are the one source of truth: their descriptions
are what `kubectl explain` shows, and its rules are what admission enforces. Run after changing it:
    .venv/bin/python docs/generate_api_reference.py          # rewrite docs/api.md
    .venv/bin/python docs/generate_api_reference.py --check  # exit 1 if docs/api.md is stale
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = (
    ROOT / "crds" / "modeldeployments.modeldeploy.dev.yaml",
    ROOT / "crds" / "batchpredictions.modeldeploy.dev.yaml",
)
OUTPUT = ROOT / "docs" / "api.md"
# Constraints shown next to the type, in this order.
CONSTRAINTS = (
    ("minimum", "min {}"),
    ("maximum", "max {}"),
    ("minLength", "length >= {}"),
    ("maxLength", "length <= {}"),
    ("minItems", ">= {} items"),
    ("maxItems", "<= {} items"),
    ("enum", "one of {}"),
    ("pattern", "pattern {}"),
)


def render_reference(crd: Mapping[str, Any], source: Path) -> str:
    """The Markdown reference of the CRD's storage version."""
    names = crd["spec"]["names"]
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = version["schema"]["openAPIV3Schema"]
    api_version = f"{crd['spec']['group']}/{version['name']}"
    lines = [
        f"# {names['kind']} API reference ({api_version})",
        "",
        f"<!-- Generated from {source.relative_to(ROOT)} by docs/generate_api_reference.py;"
        " edit the CRD, not this file. -->",
        "",
        _text(schema.get("description", "")),
        "",
        f"`apiVersion: {api_version}`, `kind: {names['kind']}`, namespaced, plural "
        f"`{names['plural']}`, short names {', '.join(f'`{n}`' for n in names['shortNames'])}, "
        f"categories {', '.join(f'`{c}`' for c in names['categories'])}. "
        f"`kubectl explain {names['singular']}.spec` shows the same descriptions.",
        "",
    ]
    for section in ("spec", "status"):
        sub = schema["properties"][section]
        lines += [f"## {section}", "", _text(sub.get("description", "")), ""]
        lines += ["| Field | Type | Default | Description |", "| --- | --- | --- | --- |"]
        lines += [_row(path, field, required) for path, field, required in _fields(sub, section)]
        lines.append("")
    rules = list(_rules(schema, ""))
    lines += ["## Cross-field rules (CEL, checked at admission)", ""]
    lines += ["| Field | Rule |", "| --- | --- |"]
    lines += [f"| `{path or '(object)'}` | {_text(message)} |" for path, message in rules]
    lines += ["", f"## Printer columns (`kubectl get {names['shortNames'][0]}`)", ""]
    lines += ["| Column | Description |", "| --- | --- |"]
    lines += [
        f"| {c['name']} | {_text(c.get('description', ''))} |"
        for c in version.get("additionalPrinterColumns", [])
    ]
    return "\n".join(lines) + "\n"


def _fields(schema: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    required = set(schema.get("required", ()))
    for name, field in schema.get("properties", {}).items():
        field_path = f"{path}.{name}"
        yield field_path, field, name in required
        yield from _nested(field, field_path)


def _nested(field: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    if "properties" in field:
        yield from _fields(field, path)
    elif field.get("type") == "array" and "properties" in field.get("items", {}):
        yield from _fields(field["items"], f"{path}[]")


def _row(path: str, field: Mapping[str, Any], required: bool) -> str:
    kind = _type(field) + (", **required**" if required else "")
    default = _code(_inline(field["default"])) if "default" in field else ""
    return f"| `{path}` | {kind} | {default} | {_text(field.get('description', ''))} |"


def _type(field: Mapping[str, Any]) -> str:
    kind = str(field.get("type", "any"))
    if field.get("x-kubernetes-int-or-string"):
        kind = "int or string"
    if kind == "array":
        kind = f"array of {_type(field.get('items', {}))}"
    elif kind == "object" and isinstance(field.get("additionalProperties"), Mapping):
        kind = f"map of {_type(field['additionalProperties'])}"
    constraints = [
        text.format(_format(key, field[key])) for key, text in CONSTRAINTS if key in field
    ]
    return ", ".join([kind, *constraints])


def _format(key: str, value: Any) -> str:
    if key == "pattern":
        return _code(value)
    if key == "enum":
        return ", ".join(_code(v) if v else '`""`' for v in value)
    return str(value)


def _rules(schema: Mapping[str, Any], path: str) -> Iterator[tuple[str, str]]:
    for rule in schema.get("x-kubernetes-validations", ()):
        target = path + rule.get("fieldPath", "")
        yield target.lstrip("."), rule.get("message", rule["rule"])
    for name, field in schema.get("properties", {}).items():
        yield from _rules(field, f"{path}.{name}")
    if "items" in schema:
        yield from _rules(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from _rules(schema["additionalProperties"], f"{path}[*]")


def _inline(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "{}" if value == {} else str(value)


def _code(text: str) -> str:
    """A Markdown table cell's code span; GitHub needs `|` escaped even inside it."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _text(text: str) -> str:
    """Prose in a table cell, on one line; `<claim>` must not read as an HTML tag."""
    one_line = " ".join(text.split())
    return one_line.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/api.md from the CRDs.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = "\n".join(
        render_reference(yaml.safe_load(crd.read_text(encoding="utf-8")), crd) for crd in CRDS
    )
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).relative_to(ROOT)}")
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
