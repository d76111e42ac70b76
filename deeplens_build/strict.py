"""Strict decoding of parsed JSON into frozen dataclasses, for what ``verify``, ``inspect`` and devices read.

A bundle's manifest is checked field by field as pydantic checks ``deeplens.toml`` (no coercion, no unknown
field, every name rule), but reading a bundle must start at once: pydantic builds the manifest's validators
in about 130 ms before it reads a byte (measured, of a 0.25 s ``verify``). msgspec decodes into dataclasses but
ignores unknown fields and has no per-field checks, so this walks the dataclasses' own type hints instead.

Understood: dataclasses, ``tuple[X, ...]``, ``dict``/``Mapping``, unions (``X | None``), ``Literal``, ``str``,
``int``, ``float``, ``bool``, and ``Annotated[X, check, ...]`` whose checks return the value or raise
``ValueError`` with the reason (:mod:`names`' rules, :func:`pattern`, :func:`at_most`, :func:`at_least`).
A field's JSON key is ``metadata["key"]`` when given (``lambda`` for ``lambda_``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")
Check = Callable[[Any], Any]


class Invalid(ValueError):
    """What is wrong and where: ``path`` is the dotted field, empty at the top."""

    def __init__(self, path: tuple[str, ...], problem: str) -> None:
        super().__init__(f"Field `{'.'.join(path)}` {problem}" if path else problem)


def decode(kind: type[T], value: Any) -> T:
    """``value`` (from ``json.loads``) as ``kind``; :class:`Invalid` names the first field that is wrong."""
    return _decode(kind, value, ())


def encode(value: Any) -> Any:
    """A dataclass as JSON values, its fields under their keys: what :func:`decode` reads back."""
    if dataclasses.is_dataclass(value):
        return {f.metadata.get("key", f.name): encode(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("written", True)}
    if isinstance(value, (tuple, list)):
        return [encode(item) for item in value]
    if isinstance(value, Mapping):
        return {key: encode(item) for key, item in value.items()}
    return value


def pattern(regex: str) -> Check:
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"should match {regex}")
        return value
    return check


def at_most(length: int) -> Check:
    def check(value: str) -> str:
        if len(value) > length:
            raise ValueError(f"should have at most {length} characters")
        return value
    return check


def at_least(bound: int) -> Check:
    def check(value: int) -> int:
        if value < bound:
            raise ValueError(f"should be at least {bound}")
        return value
    return check


@functools.cache
def _fields(kind: type) -> tuple[tuple[str, str, Any, bool], ...]:
    """(JSON key, attribute, type, required) of each field of a dataclass."""
    hints = typing.get_type_hints(kind, vars(sys.modules[kind.__module__]), include_extras=True)
    return tuple((f.metadata.get("key", f.name), f.name, hints[f.name],
                  f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                 for f in dataclasses.fields(kind))


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", type(None): "null"}


def _decode(kind: Any, value: Any, path: tuple[str, ...]) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        value = _decode(args[0], value, path)
        for check in kind.__metadata__:
            try:
                value = check(value)
            except ValueError as exc:
                problem = str(exc)
                raise Invalid(path, problem[:1].lower() + problem[1:]) from None
        return value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise Invalid(path, f"should be an object, not {_what(value)}")
        fields = _fields(kind)
        known = {key for key, *_ in fields}
        if unknown := sorted(set(value) - known):
            raise Invalid((*path, unknown[0]), "is not a known field")
        present = {}
        for key, name, hint, required in fields:
            if key in value:
                present[name] = _decode(hint, value[key], (*path, key))
            elif required:
                raise Invalid((*path, key), "is required")
        return kind(**present)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own problem is the clearer one
            return _decode(options[0], value, path)
        for option in options:
            try:
                return _decode(option, value, path)
            except Invalid:
                continue
        raise Invalid(path, f"should be {' or '.join(_describe(a) for a in args)}, not {_what(value)}")
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise Invalid(path, f"should be one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise Invalid(path, f"should be a list, not {_what(value)}")
        return tuple(_decode(args[0], item, (*path, str(i))) for i, item in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise Invalid(path, f"should be an object, not {_what(value)}")
        return {_decode(args[0], key, (*path, key)): _decode(args[1], item, (*path, key))
                for key, item in value.items()}
    if kind is float and type(value) is int:
        return float(value)
    if kind in _NAMES and type(value) is kind:
        return value
    raise Invalid(path, f"should be {_describe(kind)}, not {_what(value)}")


def _describe(kind: Any) -> str:
    kind = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
    if dataclasses.is_dataclass(kind) or typing.get_origin(kind) in (dict, Mapping):
        return "an object"
    if typing.get_origin(kind) is tuple:
        return "a list"
    return _NAMES.get(kind, str(kind))


def _what(value: Any) -> str:
    return _NAMES.get(type(value), "a list" if isinstance(value, list) else "an object")
