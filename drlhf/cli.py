"""Command-line flags from an `Args` dataclass, shared by the scripts (CleanRL style).

Every dataclass field becomes `--field-name`; the string literal under a field is its help text; a field typed
`Literal[...]` accepts only those values, one typed `PosInt`, `Fraction`... (an `Annotated` `Range`) only values in
its range, and a float only a finite value, checked when the arguments are parsed, before anything is written;
`--exp NAME` selects a preset (drlhf.presets), a plain dict that only overrides defaults. Precedence: default <
preset < command line. `--help` prints the options in the groups the `Args` source marks with `# --- TITLE ---`
comments, and the presets the script takes, from their table.

Errors a user can cause are `UserError`s (or the file and value errors of bad input): `run(main)` prints them as
one line and exits with 1; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated

from drlhf import presets as table
from drlhf.distributed import exit_process
from drlhf.files import WriteError, release_folders


class UserError(Exception):
    """Bad input: the message names the flag or file and what to do."""


class ModelLoadError(UserError):
    """A model could not be loaded; the message says which flag or file to fix."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric flag: low <= value (< if low_open), value <= high (< if high_open)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def violation(self, value) -> str | None:
        """What is wrong with value ('must be >= 1'), or None when it is in range (None values always are)."""
        if value is not None and self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        if value is not None and self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {'<' if self.high_open else '<='} {self.high:g}"
        return None

    def check(self, flag: str, value):
        if (problem := self.violation(value)) is not None:
            raise UserError(f"--{flag} {value}: {problem}")


PosInt = Annotated[int, Range(1)]
NonNegInt = Annotated[int, Range(0)]
PosFloat = Annotated[float, Range(0, low_open=True)]
NonNegFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]         # 0 <= x <= 1 (probabilities, GAE gamma and lambda)
OpenFraction = Annotated[float, Range(0, 1, high_open=True)]  # 0 <= x < 1 (Adam betas)
Seed = Annotated[int, Range(0, 2 ** 32 - 1)]     # what numpy's and torch's generators accept from every script


def bounded(kind, low, high=None):
    """An argparse type for scripts without an Args dataclass (label.py): kind(text) in Range(low, high), high open."""
    limits = Range(low, high, high_open=True)

    def parse(text):
        value = kind(text)
        if (problem := limits.violation(value) or not_finite(value)) is not None:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value
    parse.__name__ = kind.__name__
    return parse


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported once under torchrun: by rank 0 (every rank parses the same command line;
    the others exit with the same code silently)."""

    def error(self, message):
        if int(os.environ.get("RANK", "0")) > 0:
            sys.exit(2)
        super().error(message)


def not_finite(value) -> str | None:
    """'must be a finite number' for a float NaN or infinity (which pass every range check), else None."""
    return "must be a finite number" if isinstance(value, float) and not math.isfinite(value) else None


def run(main, expected: tuple = ()):
    """Run a script's main(): a UserError, a missing or unreadable file, a bad value (and `expected`) is printed
    as one line `error: ...` with exit code 1; Ctrl-C exits with 130; other exceptions keep their traceback.
    The output folders the process held are let go (drlhf.files.hold_folder); the process then ends through
    drlhf.distributed.exit_process (a torchrun worker skips the interpreter's teardown)."""
    code = 0
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except (UserError, WriteError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
            FloatingPointError, *expected) as e:
        rank = int(os.environ.get("RANK", "0"))  # torchrun: one whole line per rank, never two ranks' glued together
        sys.stderr.write(f"{f'[rank {rank}] ' if rank else ''}error: {e}\n")
        sys.stderr.flush()
        code = 1
    finally:
        release_folders()
    exit_process(code)


def field_docs(args_cls) -> dict:
    """The string literal under each field of a dataclass, by field name."""
    body = ast.parse(inspect.getsource(args_cls)).body[0].body
    return {node.target.id: nxt.value.value.strip() for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def _field_type(hint):
    """(base type, optional, choices, range) of a field annotation such as `float | None`, `Literal["a", "b"]`
    or `Annotated[int, Range(1)]`."""
    optional, limits = False, None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(parts) < len(typing.get_args(hint)), parts[0]
    if typing.get_origin(hint) is Annotated:
        hint, *meta = typing.get_args(hint)
        limits = next((m for m in meta if isinstance(m, Range)), None)
    if typing.get_origin(hint) is typing.Literal:
        return str, optional, typing.get_args(hint), limits
    return hint, optional, None, limits


def _hints(args_cls) -> dict:
    return typing.get_type_hints(args_cls, vars(sys.modules[args_cls.__module__]), include_extras=True)


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
    return {name: c for name, c in ((n, _field_type(h)[2]) for n, h in _hints(args_cls).items()) if c}


def field_groups(args_cls) -> dict:
    """The group title of each field, by field name: the `# --- TITLE ---` comment above it in the class source
    (fields before the first such comment: "the experiment")."""
    groups, title = {}, "the experiment"
    for line in inspect.getsource(args_cls).splitlines():
        if (m := re.match(r"\s*# -+ (.+?) -*$", line)):
            title = m.group(1)
        elif (m := re.match(r"\s+(\w+): ", line)):
            groups[m.group(1)] = title
    return groups


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; the description and the presets' table printed as written."""


def presets_epilog(presets: dict) -> str:
    """The presets a script takes, one line each: its name and what it is (from drlhf.presets' table)."""
    width = max(map(len, presets))
    return "presets (--exp NAME, drlhf/presets.py; default < preset < command line):\n" + "\n".join(
        f"  {name:<{width}}  {table.about(name)}" for name in presets) + "\n"


def build_parser(args_cls, suppress_defaults: bool = False, presets: dict | None = None) -> argparse.ArgumentParser:
    """One --flag per field, help from the field's docstring, choices from its type, defaults shown, in the
    field's group (field_groups); `--exp` lists the names of `presets`, each described after the options."""
    doc, groups = field_docs(args_cls), field_groups(args_cls)
    hints = _hints(args_cls)
    parser = Parser(description=(sys.modules[args_cls.__module__].__doc__ or "").split("\n")[0],
                    usage=f"%(prog)s{' [--exp NAME]' if presets else ''} [--FLAG VALUE ...]", formatter_class=HelpFormatter,
                    epilog=presets_epilog(presets) if presets else None,
                    argument_default=argparse.SUPPRESS if suppress_defaults else None)
    sections = {}
    for f in dataclasses.fields(args_cls):
        kind, optional, options, _ = _field_type(hints[f.name])
        text = doc.get(f.name, "")
        if f.name == "exp" and presets:
            options, text = None, f"{text}: {', '.join(presets)}"
        title = groups.get(f.name, "the experiment")
        section = sections.get(title) or sections.setdefault(title, parser.add_argument_group(title))
        kwargs = {} if suppress_defaults else {"default": f.default}
        section.add_argument("--" + f.name.replace("_", "-"), dest=f.name, choices=options,
                             metavar=None if options else f.name.upper(), type=_parser_of(kind, optional),
                             help=text.replace("%", "%%"), **kwargs)
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
    args = args_cls(**values)
    check_ranges(args)
    return args, given


def check_ranges(args):
    """Every Range-typed field of an Args instance (after presets and resume merges) and every float (NaN and
    infinity pass any range) -> UserError naming the flag."""
    for name, hint in _hints(type(args)).items():
        limits, value = _field_type(hint)[3], getattr(args, name)
        if limits is not None:
            limits.check(name.replace("_", "-"), value)
        if (problem := not_finite(value)) is not None:
            raise UserError(f"--{name.replace('_', '-')} {value}: {problem}")
