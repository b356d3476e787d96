"""YAML read as kubectl reads it: go-yaml v2's scalars, sigs.k8s.io/yaml's keys, then JSON.

Expected values follow go.yaml.in/yaml/v2 resolve.go and Go's encoding/json; the comment says
where PyYAML's safe_load differs. The real kubectl and apiserver agree in test_crd_admission.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from modeldeploy_operator.kubeyaml import KubeYAMLError, load_documents


def value_of(scalar: str) -> Any:
    (document,) = load_documents(f"k: {scalar}\n")
    return document.value["k"]


@pytest.mark.parametrize(
    ("scalar", "expected"),
    [
        ("yes", True),
        ("On", True),
        ("off", False),
        ("y", True),  # PyYAML: "y"
        ("N", False),  # PyYAML: "N"
        ("~", None),
        ("0755", 493),  # leading zero: octal for both
        ("0o17", 15),  # PyYAML: "0o17"
        ("0x1F", 31),
        ("0b101", 5),
        ("1_000", 1000),
        ("+7", 7),
        ("-0", 0),
        ("08", 8),  # not octal: a float for go-yaml, the integer 8 in JSON; PyYAML: "08"
        ("1e3", 1000),  # PyYAML: "1e3"
        ("100.0", 100),  # integral float: written 100 in JSON; PyYAML: 100.0
        ("1.5", 1.5),
        (".5", 0.5),
        ("1e21", 1e21),  # from 1e21 Go writes an exponent: stays a float
        ("1:30", "1:30"),  # PyYAML: 90 (sexagesimal)
        ("2026-10-02", "2026-10-02"),  # PyYAML: datetime.date
        ("1e400", "1e400"),  # overflows float64: a string
        ("=", "="),  # PyYAML: refuses the value tag
        ("9223372036854775807", 2**63 - 1),
        ("18446744073709551615", float(2**64 - 1)),  # uint64: a float64 for the apiserver
        ("1" * 64, float("1" * 64)),  # an all-digit sha256; PyYAML: an int
        ('"1111"', "1111"),
        ("'yes'", "yes"),
        ("!!str 08", "08"),
        ("!!int '0x10'", 16),
        ("!!float 2", 2),
        ("!!timestamp 2001-01-01", "2001-01-01"),
    ],
)
def test_scalars_resolve_as_go_yaml_v2_then_json(scalar: str, expected: Any) -> None:
    value = value_of(scalar)

    assert value == expected
    assert type(value) is type(expected)


def test_keys_become_strings_as_sigs_k8s_io_yaml_writes_them() -> None:
    (document,) = load_documents("1.5: a\n1e7: b\n0.0001: c\n12: d\nno: e\n")

    assert document.value == {"1.5": "a", "1e+07": "b", "0.0001": "c", "12": "d", "false": "e"}


def test_documents_are_numbered_and_located_skipping_empty_ones() -> None:
    text = "# header\n---\n---\na: 1\n---\n\n# lead\nb: 2\n...\n"

    documents = load_documents(text)

    assert [(d.number, d.line, d.value) for d in documents] == [(1, 4, {"a": 1}), (2, 8, {"b": 2})]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a: .inf\n",
            "document 1 (line 1): cannot convert YAML to JSON: json: unsupported value: +Inf",
        ),
        ("a: [\n", "expected the node content"),
        ("~: x\n", "unsupported map key: None"),
        ("a: !!int abc\n", "cannot decode 'abc' as tag:yaml.org,2002:int"),
    ],
)
def test_what_kubectl_cannot_send_is_refused(text: str, message: str) -> None:
    with pytest.raises(KubeYAMLError) as refused:
        load_documents(text)

    assert message in str(refused.value)
