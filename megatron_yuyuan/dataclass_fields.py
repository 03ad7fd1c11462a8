"""What the typed config dataclasses say about their fields, read at run time: whether a value has
the field's annotated type (YAML and config.json are untyped), and the docstring under each field
(the ``--help`` text of its flag)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal

from megatron_yuyuan.errors import ConfigError


def union_members(tp: Any) -> tuple[Any, ...]:
    """The members of ``Optional[X]`` / ``X | None`` / ``Union[...]``; ``(tp,)`` otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def type_name(tp: Any) -> str:
    """How an error names a type: ``int``, ``null``, ``one of 'full', 'selective'``."""
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return tp.__name__


def check_field_types(obj: Any, section: str) -> None:
    """Every field holds a value of its annotated type: ``int`` fields take integers (not
    booleans), ``float`` fields numbers, ``Optional`` ones None, ``Literal`` ones a listed value.

    Raises:
        ConfigError: naming ``section.field``, its flag, the type wanted and the value given.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, allowed = getattr(obj, f.name), union_members(hints[f.name])
        ok = False
        for a in allowed:
            if a is type(None):
                ok |= value is None
            elif typing.get_origin(a) is Literal:
                ok |= value in typing.get_args(a)
            elif a is float:
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            elif a is int:
                ok |= isinstance(value, int) and not isinstance(value, bool)
            else:
                ok |= isinstance(value, a)
        if not ok:
            want = " or ".join(type_name(a) for a in allowed)
            raise ConfigError(
                f"{section}.{f.name} (--{f.name.replace('_', '-')}) must be {want}, got {value!r}"
            )


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (a string literal right after it), whitespace
    folded: the source is the documentation, so ``--help`` cannot drift from it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
