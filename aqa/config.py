"""Typed configs: YAML files plus ``key=value`` overrides, checked against dataclasses at start.

Every recipe declares its config as a (nested) dataclass. ``load_config`` reads a YAML file, applies
command-line overrides (dotted keys reach nested sections: ``lora.r=16``), and builds the dataclass.
An unknown key or a value of the wrong type fails at once with a message that names the key and the
fix, so a typo never silently falls back to a default two hours into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from aqa.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be turned into the recipe's dataclass (exit status 2)."""

    exit_code = 2


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown config key '{where}{key}'.{hint} Known keys here: {', '.join(sorted(known))}."
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where the conversion is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"'{key}' cannot be null")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"'{key}' must be one of {list(args)}, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' is a section; give it as a mapping, got {value!r}.")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}. Write it as [a, b] in YAML.")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}.")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "5e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (dict, list)):  # "{text}" or "[x]" unquoted: YAML reads a mapping or a list
            raise ConfigError(f"'{key}' must be a string, got {value!r}: YAML reads braces and brackets as a "
                              f"mapping or a list. Quote the value: {key}: \"...\" in the file, or "
                              f"'{key}=\"...\"' on the command line.")
        raise ConfigError(f"'{key}' must be a string, got {value!r}.")
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    fields = _field_types(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(key, list(fields), prefix)
    kwargs = {k: _coerce(v, fields[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"section '{prefix or cls.__name__}': {err}") from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lora.r=16"`` -> ``(["lora", "r"], 16)``; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (for example max_steps=10).")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has no key.")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any, cls: type) -> None:
    fields = _field_types(cls)
    head = path[0]
    if head not in fields:
        raise _unknown_key(head, list(fields), "")
    if len(path) == 1:
        data[head] = value
        return
    sub_tp = fields[head]
    if not dataclasses.is_dataclass(sub_tp):
        raise ConfigError(f"'{head}' is not a section, so '{'.'.join(path)}' cannot be set.")
    sub = data.setdefault(head, {})
    if not isinstance(sub, dict):
        raise ConfigError(f"'{head}' must be a mapping in the YAML file.")
    try:
        _apply_override(sub, path[1:], value, sub_tp)
    except ConfigError as err:
        raise ConfigError(str(err).replace("config key '", f"config key '{head}.", 1)) from err


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; a missing file or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Pass --config with a file from configs/.")
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values.")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file and ``key=value`` overrides (overrides win)."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, cls)
    return _build(cls, data)


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """A config's fields as a person reads them: the required ones first (model, data, output), then each
    class's own from the recipe's down to the shared settings it builds on."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    order: list[str] = []
    for klass in cls.__mro__:
        order += [n for n in getattr(klass, "__annotations__", {}) if n in fields and n not in order]
    required = [n for n in order if fields[n].default is dataclasses.MISSING
                and fields[n].default_factory is dataclasses.MISSING]  # type: ignore[misc]
    return [fields[n] for n in required + [n for n in order if n not in required]]


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data, for run dirs and W&B (the recipe's own keys first)."""
    data = dataclasses.asdict(cfg)
    return {f.name: data[f.name] for f in ordered_fields(type(cfg))}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, so a run dir says exactly what ran."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


# -- help: every key with its default and meaning ------------------------------------------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """``name -> help`` from the dataclass source, the one place a field's meaning is written: the
    ``# comment`` ending the field's line, else the comment lines right above it."""
    import inspect
    import io
    import re
    import tokenize

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    trailing: dict[int, str] = {}  # line number -> comment text, for comments after code
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip():
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    names = set(getattr(cls, "__annotations__", {}))
    out: dict[str, str] = {}
    above: list[str] = []
    for number, line in enumerate(lines, start=1):
        field_match = re.match(r"^    (\w+)\s*:", line)
        if line.startswith("    #"):
            above.append(line.strip().lstrip("#").strip())
        elif field_match and field_match.group(1) in names:
            text = trailing.get(number) or " ".join(above)
            if text:
                out[field_match.group(1)] = text
            above = []
        else:
            above = []
    return out


def _type_name(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key of a config dataclass, sections flattened with dots: ``(key, type, default, help)``.

    A field's help is the comment on its line in the source; a section's fields follow its own row.
    """
    rows: list[tuple[str, str, str, str]] = []
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(base):
            comments.update(_field_comments(base))
    types_ = _field_types(cls)
    for f in ordered_fields(cls):
        key, tp = prefix + f.name, types_[f.name]
        if dataclasses.is_dataclass(tp):
            doc = (tp.__doc__ or "").strip()
            doc = "" if doc.startswith(tp.__name__ + "(") else doc.split("\n\n")[0].replace("\n", " ")
            rows.append((key, "section", "", comments.get(f.name, "") or doc))
            rows.extend(describe(tp, prefix=key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = json.dumps(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, comments.get(f.name, "")))
    return rows


def help_text(cls: type) -> str:
    """The config keys of ``cls`` as an aligned table for ``--help``."""
    rows = describe(cls)
    width = max(len(k) for k, *_ in rows)
    lines = ["config keys (YAML, or key=value / section.key=value on the command line):"]
    for key, tp, default, text in rows:
        if tp == "section":
            lines.append(f"  {key + ':':<{width + 1}}  {text}")
        else:
            lines.append(f"  {key:<{width}}  = {default:<12} {text}  [{tp}]".rstrip())
    return "\n".join(lines)
