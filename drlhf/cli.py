"""Command-line flags from an `Args` dataclass, shared by the scripts (CleanRL style, STYLE.md 2).

Every dataclass field becomes `--field-name`; the string literal under a field is its help text; `--exp NAME`
selects a preset, a plain dict that only overrides defaults. Precedence: default < preset < command line.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys


def _parse_value(text: str, kind):
    """Parse one flag value by the field's annotation (a string under `from __future__ import annotations`)."""
    kind = str(kind)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if "bool" in kind:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    for cast in (int, float):
        if cast.__name__ in kind:
            return cast(text)
    return text


def field_docs(args_cls) -> dict:
    """The string literal under each field of a dataclass, by field name."""
    body = ast.parse(inspect.getsource(args_cls)).body[0].body
    return {node.target.id: nxt.value.value.strip() for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def build_parser(args_cls, choices: dict | None = None, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One --flag per field, help from the field's docstring, defaults shown."""
    doc = field_docs(args_cls)
    parser = argparse.ArgumentParser(description=(sys.modules[args_cls.__module__].__doc__ or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for f in dataclasses.fields(args_cls):
        options = (choices or {}).get(f.name)
        kwargs = {} if suppress_defaults else {"default": f.default}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, choices=options,
                            metavar=None if options else f.name.upper(), type=lambda s, k=f.type: _parse_value(s, k),
                            help=doc.get(f.name, "").replace("%", "%%"), **kwargs)
    return parser


def parse_args(args_cls, presets: dict, argv=None, choices: dict | None = None):
    """default < preset < command line. Returns the Args and the set of fields given on the command line."""
    parser = build_parser(args_cls, choices)
    ns = parser.parse_args(argv)
    given = set(vars(build_parser(args_cls, choices, suppress_defaults=True).parse_args(argv)))
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
