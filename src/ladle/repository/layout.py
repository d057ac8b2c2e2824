"""Where models and versions live on disk: `<repo>/<model>/config.yaml` and `<repo>/<model>/<N>/`.

Pure directory listing; no parsing beyond "is this an integer version directory".
"""

from __future__ import annotations

from pathlib import Path


def model_names(root: Path) -> list[str]:
    """Models in a repository: sub-directories holding a config.yaml, sorted."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} does not exist or is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.yaml").is_file())


def version_numbers(model_dir: Path) -> list[int]:
    """Integer-named version directories of a model (0 and non-numeric names are ignored), sorted."""
    versions = []
    for path in model_dir.iterdir():
        if path.is_dir() and path.name.isdigit() and int(path.name) > 0:
            versions.append(int(path.name))
    return sorted(versions)
