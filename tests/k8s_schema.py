"""Offline validation of Kubernetes manifests, for tests.

* Built-in kinds (``batch/v1`` Job, ``v1`` Service, ...) are checked against the strict JSON
  schemas shipped inside the ``kubernetes_validate`` package (unknown fields fail).
* Custom resources (``PyTorchJob``, ``JobSet``) are checked against the ``openAPIV3Schema`` of
  the CRDs in ``tests/k8s_crds/``, converted to strict JSON Schema, after applying the schema
  defaults as the API server does; then every ``x-kubernetes-validations`` CEL rule is evaluated
  with cel-python (transition rules, which reference ``oldSelf``, are skipped: there is no old
  object on create) and ``x-kubernetes-list-type`` set/map uniqueness is checked.
* Anything else is an error: nothing unknown passes silently, and a CEL rule this module cannot
  evaluate is reported as an error (see :func:`unsupported_rules`).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import lark
import yaml
from celpy import celtypes
from celpy.evaluation import CELEvalError, base_functions
from referencing import Registry, Resource

CRD_DIR = Path(__file__).parent / "k8s_crds"
DEFAULT_K8S_VERSION = "1.30"

PathParts = Sequence[str | int]
Validator = jsonschema.protocols.Validator
_MAX_MESSAGE = 240
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------------------------
# YAML and paths


class _ManifestLoader(_Loader):  # type: ignore[misc, valid-type]
    """Safe loader that keeps timestamps as strings, as JSON (and the API server) sees them."""


_ManifestLoader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_str)


def load_yaml_documents(text: str) -> list[dict[str, Any]]:
    """Parse a (multi-document) YAML string; empty documents are dropped."""
    docs = [d for d in yaml.load_all(text, Loader=_ManifestLoader) if d is not None]
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ValueError(f"YAML document {i} is a {type(doc).__name__}, not a mapping")
    return docs


def format_path(parts: PathParts) -> str:
    """``["spec", "containers", 0, "foo"]`` -> ``spec.containers[0].foo``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "<root>"


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _schema_errors(validator: Validator, doc: dict[str, Any]) -> list[str]:
    """Every JSON-schema error, one string each; unknown fields are named in the path."""
    errors: list[str] = []
    for err in validator.iter_errors(doc):
        path = list(err.absolute_path)
        if (
            err.validator == "additionalProperties"
            and err.schema.get("additionalProperties") is False
            and isinstance(err.instance, dict)
        ):
            for key in _unknown_keys(err.instance, err.schema):
                errors.append(f"{format_path([*path, key])}: unknown field")
            continue
        errors.append(f"{format_path(path)}: {_shorten(err.message)}")
    return sorted(errors)


def _unknown_keys(instance: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    known = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    return [k for k in instance if k not in known and not any(re.search(p, k) for p in patterns)]


# --------------------------------------------------------------------------------------------
# Built-in kinds: kubernetes_validate's strict JSON schemas


@functools.cache
def _schema_root() -> Any:
    return importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"


@functools.cache
def _available_versions() -> dict[tuple[int, int], str]:
    """``{(1, 30): "v1.30.0-local-strict", ...}``."""
    found: dict[tuple[int, int], str] = {}
    for entry in _schema_root().iterdir():
        m = re.fullmatch(r"v(\d+)\.(\d+)\.\d+-local-strict", entry.name)
        if m:
            found[(int(m[1]), int(m[2]))] = entry.name
    return found


def _schema_dir(k8s_version: str) -> str:
    """Newest strict schema directory whose Kubernetes version is <= ``k8s_version``."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?", k8s_version.strip())
    if not m:
        raise ValueError(f"bad Kubernetes version {k8s_version!r} (want e.g. '1.30')")
    wanted = (int(m[1]), int(m[2]))
    usable = [v for v in _available_versions() if v <= wanted]
    if not usable:
        oldest = min(_available_versions())
        raise ValueError(f"no schemas for Kubernetes {k8s_version} (oldest: {oldest})")
    return _available_versions()[max(usable)]


def _load_json(schema_dir: str, name: str) -> dict[str, Any] | None:
    entry = _schema_root() / schema_dir / name
    if not entry.is_file():
        return None
    return json.loads(entry.read_text(encoding="utf-8"))


@functools.cache
def _definitions(schema_dir: str) -> Resource[Any]:
    defs = _load_json(schema_dir, "_definitions.json")
    if defs is None:
        raise FileNotFoundError(f"{schema_dir}/_definitions.json missing from kubernetes_validate")
    return Resource.from_contents(defs)


def _builtin_file(api_version: str, kind: str) -> str:
    """kubernetes_validate's naming: ``rbac.authorization.k8s.io/v1`` Role -> role-rbac-v1.json."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{group_version}.json"


@functools.cache
def _builtin_validator(schema_dir: str, api_version: str, kind: str) -> Validator | None:
    """Validator for a built-in kind, or None when the schema set has no such apiVersion/kind."""
    schema = _load_json(schema_dir, _builtin_file(api_version, kind))
    if schema is None:
        return None
    group, _, version = api_version.rpartition("/")
    gvk = {"group": group, "version": version, "kind": kind}
    if gvk not in schema.get("x-kubernetes-group-version-kind", []):
        return None  # e.g. "batch.example.com/v1" maps onto the batch/v1 file name
    defs = _definitions(schema_dir)
    registry: Registry[Any] = Registry().with_resources(
        [(defs.id() or "", defs), (schema["$id"], Resource.from_contents(schema))]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


# --------------------------------------------------------------------------------------------
# Custom resources: CRD openAPIV3Schema -> strict JSON Schema

# Top-level ObjectMeta is `type: object` in the CRDs; check it loosely but strictly-keyed.
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "managedFields": {"type": "array", "items": {"type": "object"}},
    },
}


@dataclass(frozen=True)
class CustomResource:
    """One served version of a CRD: its converted JSON schema and where it came from."""

    api_version: str
    kind: str
    source: str
    schema: dict[str, Any]


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """Convert a structural OpenAPI v3 schema node (recursively) to strict JSON Schema."""
    out = dict(node)
    if out.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.get("nullable"):
        types = out.get("type")
        if types is not None:
            out["type"] = [*(types if isinstance(types, list) else [types]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out:
        out["properties"] = {k: to_json_schema(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"])
    return out


def _read_crd(path: Path) -> Iterator[CustomResource]:
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        if not version.get("served", False):
            continue
        schema = to_json_schema(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = _OBJECT_META
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
        api_version = f"{group}/{version['name']}"
        yield CustomResource(api_version, kind, path.name, schema)


@functools.cache
def custom_resources() -> dict[tuple[str, str], CustomResource]:
    """``{(apiVersion, kind): CustomResource}`` for every CRD file in ``tests/k8s_crds``."""
    found: dict[tuple[str, str], CustomResource] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for cr in _read_crd(path):
            found[(cr.api_version, cr.kind)] = cr
    return found


@functools.cache
def _crd_validator(api_version: str, kind: str) -> Validator:
    schema = custom_resources()[(api_version, kind)].schema
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _apply_defaults(value: Any, schema: dict[str, Any]) -> None:
    """Fill absent fields that have a schema ``default``, in place (API-server defaulting)."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and "properties" not in schema:
            for item in value.values():
                _apply_defaults(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _apply_defaults(item, schema["items"])


# --------------------------------------------------------------------------------------------
# CEL (x-kubernetes-validations)

# Kubernetes CEL extension functions cel-python lacks, by name. The rules in the shipped CRDs
# only use standard CEL (has, size, all, exists, ==, !, &&, ||), so none are needed yet; add
# an implementation here (name -> Python callable on celtypes) when a new CRD needs one.
_EXTENSION_FUNCTIONS: dict[str, Callable[..., Any]] = {}
_MACROS = frozenset({"has", "dyn", "all", "exists", "exists_one", "map", "filter", "reduce"})
_ENV = celpy.Environment()


@dataclass(frozen=True)
class CelRule:
    """One ``x-kubernetes-validations`` entry and the schema path it sits on."""

    kind: str
    path: str
    rule: str
    message: str | None = None
    message_expression: str | None = None
    field_path: str | None = None

    @property
    def is_transition(self) -> bool:
        return re.search(r"\boldSelf\b", self.rule) is not None


def _called_names(tree: lark.Tree) -> set[str]:
    """Names of all functions/methods/macros called in a parsed CEL expression."""
    names: set[str] = set()
    for node in tree.iter_subtrees():
        if node.data == "ident_arg":
            names.add(str(node.children[0]))
        elif node.data == "member_dot_arg":
            names.add(str(node.children[1]))
    return names


@functools.cache
def _compile(expression: str) -> celpy.Runner | str:
    """A runnable program, or the reason the expression is not supported."""
    try:
        ast = _ENV.compile(expression)
    except celpy.CELParseError as exc:
        return f"does not parse: {_shorten(str(exc))}"
    known = set(base_functions) | set(_EXTENSION_FUNCTIONS) | _MACROS
    missing = sorted(_called_names(ast) - known)
    if missing:
        return f"uses functions cel-python lacks: {', '.join(missing)}"
    return _ENV.program(ast, functions=_EXTENSION_FUNCTIONS)


def to_cel(value: Any) -> Any:
    """Python JSON-like value -> CEL value (bool before int: bool is an int subclass)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, (list, tuple)):
        return celtypes.ListType([to_cel(v) for v in value])
    if isinstance(value, dict):
        return celtypes.MapType({to_cel(k): to_cel(v) for k, v in value.items()})
    raise TypeError(f"cannot convert {type(value).__name__} to CEL")


def _run(program: celpy.Runner, cel_self: Any) -> Any:
    """Evaluate; CEL errors come back as CELEvalError (raised or returned)."""
    try:
        return program.evaluate({"self": cel_self})
    except CELEvalError as exc:
        return exc
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return CELEvalError(str(exc))


def _cel_error_text(err: CELEvalError) -> str:
    text = str(err.args[0]) if err.args else repr(err)
    return _shorten(text.split(" (in activation")[0])


def _rule_message(rule: CelRule, cel_self: Any) -> str:
    if rule.message_expression:
        program = _compile(rule.message_expression)
        if not isinstance(program, str):
            result = _run(program, cel_self)
            if isinstance(result, celtypes.StringType) and result:
                return str(result)
    return rule.message or f"failed rule: {rule.rule}"


def _evaluate_rule(rule: CelRule, value: Any, path: PathParts) -> str | None:
    """None when the rule holds, else the error string."""
    where = format_path([*path, *_field_path(rule.field_path)])
    program = _compile(rule.rule)
    if isinstance(program, str):
        return f"{where}: CEL rule not supported ({program}): {rule.rule}"
    cel_self = to_cel(value)
    result = _run(program, cel_self)
    if isinstance(result, CELEvalError):
        return f"{where}: CEL rule evaluation error: {_cel_error_text(result)}: {rule.rule}"
    if not isinstance(result, celtypes.BoolType):
        return f"{where}: CEL rule returned {type(result).__name__}, not bool: {rule.rule}"
    if result:
        return None
    return f"{where}: {_rule_message(rule, cel_self)} (CEL rule: {rule.rule})"


def _field_path(field_path: str | None) -> list[str | int]:
    """``.spec.foo[0]`` style fieldPath -> path parts (only simple forms)."""
    if not field_path:
        return []
    parts: list[str | int] = []
    for name, index in re.findall(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]", field_path):
        parts.append(name if name else int(index))
    return parts


def _rules_at(schema: dict[str, Any], kind: str, path: str) -> list[CelRule]:
    return [
        CelRule(
            kind=kind,
            path=path,
            rule=v["rule"],
            message=v.get("message"),
            message_expression=v.get("messageExpression"),
            field_path=v.get("fieldPath"),
        )
        for v in schema.get("x-kubernetes-validations", [])
    ]


# --------------------------------------------------------------------------------------------
# Walking a custom resource along its schema: CEL rules and list-type uniqueness

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    types = schema.get("type")
    if types is None:
        return True
    names = types if isinstance(types, list) else [types]
    if isinstance(value, bool):
        return "boolean" in names
    return any(isinstance(value, _JSON_TYPES.get(n, ())) for n in names)


def _walk(value: Any, schema: dict[str, Any], kind: str, path: list[str | int]) -> Iterator[str]:
    """Errors from CEL rules and list-type checks at this node and below."""
    if value is None or not _type_ok(value, schema):
        return  # type errors are already reported by the JSON-schema pass
    for rule in _rules_at(schema, kind, format_path(path)):
        if not rule.is_transition:
            error = _evaluate_rule(rule, value, path)
            if error:
                yield error
    if isinstance(value, list):
        yield from _list_type_errors(value, schema, path)
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                yield from _walk(item, schema["items"], kind, [*path, i])
    elif isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if "properties" not in schema else None)
            if isinstance(sub, dict):
                yield from _walk(item, sub, kind, [*path, key])


def _list_type_errors(value: list[Any], schema: dict[str, Any], path: PathParts) -> Iterator[str]:
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "set":
        keys: list[Any] = [json.dumps(v, sort_keys=True) for v in value]
    elif list_type == "map":
        names = schema.get("x-kubernetes-list-map-keys", [])
        keys = [
            json.dumps([v.get(n) for n in names]) if isinstance(v, dict) else None for v in value
        ]
    else:
        return
    seen: set[Any] = set()
    for i, key in enumerate(keys):
        if key is not None and key in seen:
            yield f"{format_path([*path, i])}: duplicate entry in list-type={list_type}: {key}"
        seen.add(key)


# --------------------------------------------------------------------------------------------
# Public API


def validate(doc: dict[str, Any], k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """All validation errors of one manifest (empty list: valid)."""
    if not isinstance(doc, dict):
        return [f"<root>: manifest must be a mapping, got {type(doc).__name__}"]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
        return ["<root>: apiVersion and kind must be non-empty strings"]
    if (api_version, kind) in custom_resources():
        return _validate_custom(doc, api_version, kind)
    validator = _builtin_validator(_schema_dir(k8s_version), api_version, kind)
    if validator is None:
        return [f"<root>: unknown apiVersion/kind {api_version} {kind} (no schema, no CRD)"]
    return _schema_errors(validator, doc)


def _validate_custom(doc: dict[str, Any], api_version: str, kind: str) -> list[str]:
    schema = custom_resources()[(api_version, kind)].schema
    defaulted = copy.deepcopy(doc)
    _apply_defaults(defaulted, schema)
    errors = _schema_errors(_crd_validator(api_version, kind), defaulted)
    return errors + list(_walk(defaulted, schema, kind, []))


def validate_all(
    docs: Sequence[dict[str, Any]], k8s_version: str = DEFAULT_K8S_VERSION
) -> list[str]:
    """Errors of several manifests, each prefixed with ``<kind>/<name>``."""
    errors: list[str] = []
    for i, doc in enumerate(docs):
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        kind = doc.get("kind") if isinstance(doc, dict) else None
        label = f"{kind or '<no kind>'}/{name or f'<document {i}>'}"
        errors.extend(f"{label}: {e}" for e in validate(doc, k8s_version))
    return errors


def cel_rules() -> list[CelRule]:
    """Every ``x-kubernetes-validations`` rule of the known CRDs."""
    return [rule for cr in custom_resources().values() for rule in _schema_rules(cr)]


def _schema_rules(cr: CustomResource) -> Iterator[CelRule]:
    stack: list[tuple[dict[str, Any], list[str | int]]] = [(cr.schema, [])]
    while stack:
        node, path = stack.pop()
        yield from _rules_at(node, cr.kind, format_path(path))
        for key, sub in node.get("properties", {}).items():
            stack.append((sub, [*path, key]))
        if isinstance(node.get("items"), dict):
            stack.append((node["items"], [*path, "*"]))
        if isinstance(node.get("additionalProperties"), dict):
            stack.append((node["additionalProperties"], [*path, "*"]))


def unsupported_rules() -> list[str]:
    """Non-transition rules (and messageExpressions) that cel-python cannot run here."""
    out: list[str] = []
    for rule in cel_rules():
        if rule.is_transition:
            continue
        for expression in filter(None, [rule.rule, rule.message_expression]):
            problem = _compile(expression)
            if isinstance(problem, str):
                out.append(f"{rule.kind} {rule.path}: {problem}: {expression}")
    return out


def cel_rule_summary() -> dict[str, dict[str, int]]:
    """Per kind: total rules, transition rules skipped, evaluated, and unsupported."""
    summary: dict[str, dict[str, int]] = {}
    for rule in cel_rules():
        counts = summary.setdefault(
            rule.kind, {"total": 0, "transition_skipped": 0, "evaluated": 0, "unsupported": 0}
        )
        counts["total"] += 1
        if rule.is_transition:
            counts["transition_skipped"] += 1
        elif isinstance(_compile(rule.rule), str):
            counts["unsupported"] += 1
        else:
            counts["evaluated"] += 1
    return summary
