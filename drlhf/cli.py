"""Command-line flags from an `Args` dataclass, shared by the scripts (CleanRL style).

Every dataclass field becomes `--field-name`; the string literal under a field is its help text; a field typed
`Literal[...]` accepts only those values; `--exp NAME` selects a preset (drlhf.presets), a plain dict that only
overrides defaults. Precedence: default < preset < command line.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import types
import typing


def field_docs(args_cls) -> dict:
    """The string literal under each field of a dataclass, by field name."""
    body = ast.parse(inspect.getsource(args_cls)).body[0].body
    return {node.target.id: nxt.value.value.strip() for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def _field_type(hint):
    """(base type, optional, choices) of a field annotation such as `float | None` or `Literal["a", "b"]`."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(parts) < len(typing.get_args(hint)), parts[0]
    if typing.get_origin(hint) is typing.Literal:
        return str, optional, typing.get_args(hint)
    return hint, optional, None


def _parser_of(kind, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return kind(text)
    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in "invalid int value" errors
    return parse


def choices(args_cls) -> dict:
    """The allowed values of every Literal-typed field, by field name."""
    hints = typing.get_type_hints(args_cls, vars(sys.modules[args_cls.__module__]))
    return {name: c for name, c in ((n, _field_type(h)[2]) for n, h in hints.items()) if c}


def build_parser(args_cls, suppress_defaults: bool = False, presets: dict | None = None) -> argparse.ArgumentParser:
    """One --flag per field, help from the field's docstring, choices from its type, defaults shown."""
    doc = field_docs(args_cls)
    hints = typing.get_type_hints(args_cls, vars(sys.modules[args_cls.__module__]))
    parser = argparse.ArgumentParser(description=(sys.modules[args_cls.__module__].__doc__ or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for f in dataclasses.fields(args_cls):
        kind, optional, options = _field_type(hints[f.name])
        if f.name == "exp" and presets:
            options = None
        kwargs = {} if suppress_defaults else {"default": f.default}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, choices=options,
                            metavar=None if options else f.name.upper(), type=_parser_of(kind, optional),
                            help=doc.get(f.name, "").replace("%", "%%"), **kwargs)
    return parser


def parse_args(args_cls, presets: dict, argv=None):
    """default < preset < command line. Returns the Args and the set of fields given on the command line."""
    parser = build_parser(args_cls, presets=presets)
    ns = parser.parse_args(argv)
    given = set(vars(build_parser(args_cls, suppress_defaults=True, presets=presets).parse_args(argv)))
    values = {f.name: f.default for f in dataclasses.fields(args_cls)}
    if ns.exp is not None:
        if ns.exp not in presets:
            parser.error(f"unknown --exp {ns.exp!r}; choose one of: {', '.join(presets)}")
        unknown = set(presets[ns.exp]) - set(values)
        if unknown:  # a preset may only override existing fields
            raise KeyError(f"preset {ns.exp!r} has unknown keys {sorted(unknown)}")
        values.update(presets[ns.exp])
    values.update({k: getattr(ns, k) for k in given})
    return args_cls(**values), given
