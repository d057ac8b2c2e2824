"""Import direction between ladle's packages (README, "Development"): every `import` anywhere in a module — module
level or inside a function — is checked against the rules below; only `if TYPE_CHECKING:` blocks are exempt."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ladle"
# shared leaves: they import nothing of ladle but each other (process: the process-wide start-up policy;
# windows: recent requests per version, which metrics record and rollout gates read; client_commands: what the
# client commands share)
LEAVES = {"ladle", "errors", "tensors", "config", "metrics", "logs", "extras", "process", "windows", "client_commands"}
# what each package (or top-level module) may import besides itself and the leaves
ALLOWED = {
    "repository": set(),
    "runtimes": {"repository"},
    "batching": {"runtimes", "repository"},
    "llm": set(),
    "serving": {"batching", "llm", "repository", "runtimes"},
    "jobs": {"serving", "repository"},
    "api": {"serving", "repository", "llm", "jobs"},
    "options": set(),
    "bench": {"options"},
    "cluster": {"api", "cli", "jobs", "repository", "serving", "server"},  # serve_app: an entry point, like cli
    "server": {"api", "serving", "cluster"},
    "cli": {"api", "bench", "jobs", "options", "repository", "rollout_cli", "server", "serving"},
    "rollout_cli": {"serving"},  # only serving.rollout_plan (pure): see ROLLOUT_CLI_MODULES
    "__main__": {"cli"},
}
# the API layer imports only llm's torch-free contracts and text handling at run time (the engine: TYPE_CHECKING)
API_LLM_MODULES = {"request", "sampling_params", "outputs", "output_processor", "tokenizer", "detokenizer",
                   "chat_template"}

# `ladle rollout` is a client: of the server side it imports only the pure plan module (parse_duration, the checks)
ROLLOUT_CLI_MODULES = {"ladle.serving.rollout_plan"}


def _imports(tree: ast.AST, top_level: bool = True) -> list[tuple[str, bool]]:
    """(module, at module level) of every ladle import outside `if TYPE_CHECKING:` blocks."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found += [m for child in node.orelse for m in _imports(ast.Module([child], []), top_level)]
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, top_level))
        nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        found += _imports(node, top_level and not nested)
    return [(m, level) for m, level in found if m == "ladle" or m.startswith("ladle.")]


def _violations(layer: str, name: str, source: str) -> list[str]:
    problems = []
    for module, top_level in _imports(ast.parse(source)):
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else "ladle"
        where = f"{name} imports {module}"
        if target in (layer, *LEAVES):
            continue
        if target not in ALLOWED.get(layer, set()):
            problems.append(f"{where}: {layer} may not import {target}")
        elif layer == "api" and target == "llm" and (len(parts) < 3 or parts[2] not in API_LLM_MODULES):
            problems.append(f"{where}: the API imports only llm's contracts at run time (engines: TYPE_CHECKING)")
        elif layer == "rollout_cli" and module not in ROLLOUT_CLI_MODULES:
            problems.append(f"{where}: the rollout client imports only {sorted(ROLLOUT_CLI_MODULES)} of serving")
        elif layer == "serving" and target == "llm" and top_level:
            problems.append(f"{where}: serving imports llm (torch) lazily, inside the function that needs it")
    return problems


def test_imports_flow_one_way() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50 and any(p.parts[-2] == "serving" for p in files)
    problems = [problem for path in files for problem in _violations(
        path.relative_to(SRC).parts[0].removesuffix(".py"), str(path.relative_to(SRC)), path.read_text())]
    assert problems == [], "\n".join(problems)


def test_only_cluster_imports_ray() -> None:
    """Ray is an optional extra: a server without it must never reach an `import ray`."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "cluster":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(SRC)} imports {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []


def test_the_checker_sees_function_level_imports_and_skips_type_checking() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ladle.cli\n"
              "def f():\n    from ladle.llm import factory\n")
    assert _imports(ast.parse(source)) == [("ladle.llm", False)]


def test_forbidden_imports_are_caught() -> None:
    assert _violations("repository", "r.py", "from ladle.batching.batcher import Batcher")
    assert _violations("bench", "b.py", "def f():\n    import ladle.cli")
    assert _violations("serving", "s.py", "from ladle.llm.factory import build_engine")  # module level: eager torch
    assert not _violations("serving", "s.py", "def f():\n    from ladle.llm.factory import build_engine")
    assert _violations("api", "a.py", "from ladle.llm.async_engine import AsyncEngine")
    assert _violations("api", "a.py", "from ladle.batching.batcher import Batcher")
    assert _violations("rollout_cli", "r.py", "from ladle.serving.rollout import RolloutManager")
    assert not _violations("rollout_cli", "r.py", "from ladle.serving.rollout_plan import parse_duration")
