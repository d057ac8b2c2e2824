"""Command-line options built from frozen config dataclasses: one flag per field, so every option has one
definition (its field, default and help). Used by `ladle serve` (cli.py) and `ladle bench` (bench/).

Invariant: a leaf module (stdlib only); nothing here knows which command it serves.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field of `cls` (`max_request_bytes` -> `--max-request-bytes`)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        meta = f.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "dest": f.name}
        default = f.default
        if meta.get("positional"):
            group.add_argument(f.name, nargs="?", type=kind, default=default, help=kwargs["help"],
                               metavar=f.name.upper())
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(action="append", metavar=f.name.upper())
            default = None
        else:
            kwargs.update(type=kind, choices=meta.get("choices"))
            for extra in ("nargs", "const", "metavar"):  # e.g. `--ray` alone means `--ray auto`
                if extra in meta:
                    kwargs[extra] = meta[extra]
        if kind is not tuple and default is not None:
            kwargs["help"] += " (default: %(default)s)"
        group.add_argument(flag, default=default, **kwargs)


def _base_type(hint: Any) -> type:
    """int | None -> int; tuple[str, ...] -> tuple; Path -> Path."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def build_dataclass(cls: type, args: argparse.Namespace) -> Any:
    """An instance of `cls` from the parsed options `add_dataclass_options` added (repeated flags -> tuple)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if isinstance(f.default, tuple):
            value = tuple(value or ())
        values[f.name] = value
    return cls(**values)
