"""The hardened YAML reader of config files and `key=value` overrides: plain data only, refusing (as a one-line
ConfigError naming the file or key) what could run code, read the environment or exhaust memory, time or the
stack: anchors and aliases, duplicate keys, deep nesting, oversized files and values, unparseable integers, and
OmegaConf `${...}` interpolation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the offending key and value in the message."""


# A config is a few KB holding a few hundred values, nested four levels deep. These bounds are far above that
# and far below what could exhaust memory, time or the interpreter's stack (the evaluator also reads the
# config.yaml of every checkpoint it finds, so a config file is untrusted input).
MAX_CONFIG_BYTES = 1 << 20  # a config file, or one override's value
MAX_YAML_DEPTH = 64  # nesting levels of collections
MAX_YAML_NODES = 10_000  # keys and values in one document


# ------------------------------------------------------------------------------------------------ reading YAML


class _Refused(yaml.YAMLError):
    """YAML that metalm configs do not accept: anchors/aliases, duplicate keys, too deep, too many values."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(problem)
        self.problem, self.line = problem, line


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data only) that also refuses anchors and aliases and bounds depth and size.

    An alias is a reference, so nine anchors of nine aliases each are 9**9 values once anything walks the
    data (an "alias bomb"); refusing them while composing, before any data exists, makes that impossible.
    Composing recurses once per nesting level, so depth is bounded here too, far below the stack limit.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("YAML anchors and aliases (&name, *name) are not allowed in metalm configs; "
                           "write the value out", line)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _Refused(f"more than {MAX_YAML_NODES} YAML values; expected at most {MAX_YAML_NODES} "
                           "(a config holds a few hundred)", line)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels", line)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_bounded_int(self, node):
        try:
            return self.construct_yaml_int(node)
        except ValueError:  # longer than int()'s conversion limit (4300 digits)
            raise _Refused(f"an integer of {len(node.value)} digits; expected one that fits in 64 bits",
                           node.start_mark.line + 1) from None


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_bounded_int)


def _check_duplicate_keys(node: yaml.Node, where: str) -> None:
    """PyYAML keeps the last of two equal keys without a word; a config that says a thing twice is an error."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{where}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                _check_duplicate_keys(value_node, where)
                continue
            name, line = key_node.value, key_node.start_mark.line + 1
            full = f"{where}.{name}" if where else name
            if name in first_line:
                raise _Refused(f"duplicate key {full!r} at line {line} (first at line {first_line[name]}); "
                               "give each key once")
            first_line[name] = line
            _check_duplicate_keys(value_node, full)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML text -> plain data; `where` (the key the text is the value of, or "") prefixes duplicate-key names.

    Raises `_Refused` for what metalm refuses and yaml.YAMLError for text that is not YAML.
    """
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: where, then what."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        what = ", ".join(str(p) for p in (e.context, e.problem) if p)
        if mark is not None:
            return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
        return what
    return " ".join(str(e).split())


def show(value: Any, limit: int = 120) -> str:
    """repr(value) for a message, shortened when absurdly long (a message stays one readable line)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _reject_interpolation(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_interpolation(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _reject_interpolation(v, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(f"{where}={show(node)}: interpolation ('${{...}}') is not allowed in metalm configs")


def read_yaml_file(path: Path) -> dict:
    """The mapping a config file holds (an empty file: {}), or a ConfigError naming the file and the problem."""
    where = f"config file {path}"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # never more: the file may be huge, or grow while read
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {max(size, len(raw))} bytes; expected at most {MAX_CONFIG_BYTES} "
                          "(a config is a few KB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{where} is not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} "
                          "(save it as UTF-8)") from None
    try:
        data = _parse_yaml(text, "")
    except _Refused as e:
        raise ConfigError(f"{where}: " + (f"line {e.line}: " if e.line else "") + e.problem) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    _reject_interpolation(data, "")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """(key, value) of a `key=value` override, the value read as YAML with the same refusals as a file."""
    if "=" not in item:
        raise ConfigError(f"override {show(item)}: expected key=value (e.g. train.max_steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.startswith("+") and key.lstrip("+"):
        raise ConfigError(f"override {show(item)}: metalm has no '+' (Hydra's add-a-key): every key already "
                          f"exists in the schema, so write {show(key.lstrip('+') + '=' + raw)}")
    if not key:
        raise ConfigError(f"override {show(item)}: empty key")
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"override {key}: a value of {len(raw)} characters; expected at most {MAX_CONFIG_BYTES}")
    try:
        value = _parse_yaml(raw, key) if raw.strip() else ""
    except _Refused as e:
        raise ConfigError(f"override {key}={show(raw)}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={show(raw)}: value is not valid YAML: {_yaml_problem(e)}") from None
    _reject_interpolation(value, key)
    return key, value
