"""Hardware targets as data files (``*.toml`` beside this module), each number with its source.

A user adds a target by writing a file in the same format (see ``schema.py`` and docs/targets.md)
and passing its path; no code changes.
"""
from __future__ import annotations

import os

import tomli

from sfn_deploy.errors import UserError

from .schema import Target, TargetError, parse

HERE = os.path.dirname(__file__)


def available() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(HERE) if f.endswith(".toml"))


def expand(names) -> list[str]:
    """Target names as given, with ``all`` standing for every shipped target; duplicates dropped."""
    out: list[str] = []
    for n in names:
        out += available() if n == "all" else [n]
    return list(dict.fromkeys(out))


def load_target(name_or_path: str) -> Target:
    """Read and check a target by name (shipped file) or path; a malformed file is a UserError naming the field."""
    path = name_or_path if name_or_path.endswith(".toml") else os.path.join(HERE, f"{name_or_path}.toml")
    if not os.path.exists(path):
        raise UserError(f"unknown target {name_or_path!r}; available: {', '.join(available())} (or a .toml path)")
    try:
        with open(path, "rb") as f:
            raw = tomli.load(f)
    except tomli.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from e
    try:
        return parse(raw, path)
    except TargetError as e:
        raise UserError(str(e)) from e


__all__ = ["Target", "available", "expand", "load_target"]
