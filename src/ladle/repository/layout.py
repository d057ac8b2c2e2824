"""Where models and versions live on disk: `<repo>/<model>/config.yaml` and `<repo>/<model>/<N>/`.

Invariant: a name from outside (a URL, a request body) becomes a path only through `model_dir`, which
admits allow-listed names whose directory resolves inside the repository; versions are positive integers.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ladle.errors import InvalidInput

log = logging.getLogger(__name__)

MODEL_NAME_RULE = ("a model name is 1-128 characters of letters, digits, '_', '.' and '-', starts with a letter or "
                   "digit, and has no '..'")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# ASCII digits only: str.isdigit() also accepts e.g. Arabic-Indic digits, which int() would read
_VERSION = re.compile(r"[1-9][0-9]{0,17}")


def is_model_name(name: str) -> bool:
    return _MODEL_NAME.fullmatch(name) is not None and ".." not in name


def check_model_name(name: str) -> str:
    """The name itself when it is allowed (it can never leave the repository directory), else a 400."""
    if not is_model_name(name):
        raise InvalidInput(f"invalid model name {name[:64]!r}: {MODEL_NAME_RULE}", param="model")
    return name


def parse_version(raw: str) -> int:
    """A version from a URL or a directory name: a positive integer of ASCII digits, else a 400."""
    if _VERSION.fullmatch(raw) is None:
        raise InvalidInput(f"model version must be a positive integer, got {raw[:32]!r}")
    return int(raw)


def model_dir(root: Path, name: str) -> Path | None:
    """The directory of model `name`, or None when there is none. A model directory that is a symlink
    resolving outside the repository is refused (logged, then None): a repository is one tree, and a
    client-named model must never reach files the operator did not put in it."""
    path = root / check_model_name(name)
    if not (path / "config.yaml").is_file():
        return None
    resolved, real_root = path.resolve(), root.resolve()
    if resolved == real_root or not resolved.is_relative_to(real_root):
        log.warning("model directory %s resolves to %s, outside the repository %s: ignored (copy it into the "
                    "repository or mount it there)", path, resolved, real_root)
        return None
    return path


def model_names(root: Path) -> list[str]:
    """Models in a repository: sub-directories holding a config.yaml, with allowed names, sorted."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} does not exist or is not a directory")
    names = []
    for path in root.iterdir():
        if not path.is_dir() or not (path / "config.yaml").is_file():
            continue
        if not is_model_name(path.name):
            log.warning("repository directory %r is not a valid model name (%s): ignored", path.name, MODEL_NAME_RULE)
        elif model_dir(root, path.name) is not None:
            names.append(path.name)
    return sorted(names)


def version_numbers(model_path: Path) -> list[int]:
    """Positive-integer-named version directories of a model (other names are ignored), sorted."""
    return sorted(int(p.name) for p in model_path.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name))
