"""The web console's server side (issue 15): the page and its files from the package (fixed names, security headers,
open without a key), the models view's JSON (every model and version, states and reasons, signatures, splits,
rollouts, the admin mode), --no-console, and the keys the JSON views need. The page itself is driven in a real
browser in test_console_browser.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from ladle.api.app import create_app
from ladle.api.console import load_static
from ladle.config import HTTPConfig, JobsConfig, RepositoryConfig, SecurityConfig, ServerConfig
from tests.repos import write_model, write_probe

STATIC = Path(__file__).resolve().parents[2] / "src" / "ladle" / "api" / "console_static"


def _config(repo: Path, data: Path, **security) -> ServerConfig:
    return ServerConfig(repository=RepositoryConfig(repository=repo), security=SecurityConfig(**security),
                        jobs=JobsConfig(data_dir=data), http=HTTPConfig(grpc_port=0))


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    write_probe(root, versions=(1, 2), version_policy={"all": True}, traffic_split={1: 75, 2: 25})
    tensor = [{"name": "x", "datatype": "FP32", "shape": [1]}]
    write_model(root, "broken", {"backend": "python", "inputs": tensor, "outputs": tensor},
                {1: {"model.py": "raise RuntimeError('no such weights here')\n"}})
    return root


def test_the_page_and_its_files_are_served_from_the_package(repo, tmp_path) -> None:
    with TestClient(create_app(_config(repo, tmp_path / "data"))) as client:
        for path in ("/", "/console", "/console/"):
            page = client.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert '<script type="module" src="/console/app.js">' in page.text
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert page.headers["x-frame-options"] == "DENY"
        for name in ("app.js", "api.js", "chart.js", "chat.js", "dom.js", "infer.js", "live.js", "models.js",
                     "snippets.js"):
            answer = client.get(f"/console/{name}")
            assert answer.status_code == 200, name
            assert answer.headers["content-type"].startswith("text/javascript")
            assert answer.content == (STATIC / name).read_bytes()
        assert client.get("/console/console.css").headers["content-type"].startswith("text/css")
        for bad in ("/console/nope.js", "/console/..%2fconsole.py", "/console/%2e%2e%2f%2e%2e%2fconfig.py"):
            missing = client.get(bad)
            assert missing.status_code == 404 and "error" in missing.json(), bad


def test_every_file_the_page_imports_is_shipped() -> None:
    files = load_static()
    for name, (body, _type) in files.items():
        if name.endswith(".js"):
            for line in body.decode().splitlines():
                if line.startswith("import ") and " from " in line:
                    target = line.rsplit('"', 2)[1].removeprefix("./")
                    assert target in files, f"{name} imports {target}, which is not shipped"
    assert {"index.html", "app.js", "console.css"} <= set(files)


def test_the_models_view_lists_versions_states_splits_and_signatures(repo, tmp_path) -> None:
    with TestClient(create_app(_config(repo, tmp_path / "data", allow_admin_without_key=True))) as client:
        assert client.post("/v2/models/probe/rollout", json={"to": 2, "steps": [50, 100], "every": "1h"}).is_success
        answer = client.get("/console/api/models")
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        view = answer.json()
    assert view["admin"] == "open" and view["rollouts"] is True
    models = {m["name"]: m for m in view["models"]}
    assert set(models) == {"probe", "broken"}
    probe = models["probe"]
    assert probe["kind"] == "classic" and probe["backend"] == "python" and probe["state"] == "READY"
    assert [v["version"] for v in probe["versions"]] == ["1", "2"]
    assert all(v["state"] == "READY" for v in probe["versions"])
    assert probe["versions"][0]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}]
    assert [o["name"] for o in probe["versions"][1]["outputs"]] == ["y", "pid"]
    # the rollout's first step overrides the config's 75/25
    assert probe["split_source"] == "rollout" and probe["traffic_split"] == {"1": 50.0, "2": 50.0}
    assert probe["rollout"]["to"] == 2 and probe["rollout"]["state"] == "running"
    assert probe["rollout"]["steps"] == [50, 100] and probe["rollout"]["step"] == 1
    broken = models["broken"]
    assert broken["state"] != "READY"
    assert any("no such weights here" in v["reason"] for v in broken["versions"])


def test_an_unloaded_model_shows_unavailable_with_its_reason(repo, tmp_path) -> None:
    with TestClient(create_app(_config(repo, tmp_path / "data", allow_admin_without_key=True))) as client:
        assert client.post("/v2/repository/models/probe/unload").status_code == 200
        probe = next(m for m in client.get("/console/api/models").json()["models"] if m["name"] == "probe")
        assert probe["state"] == "UNAVAILABLE" and probe["traffic_split"] == {"1": 75.0, "2": 25.0}
        assert {(v["state"], v["reason"]) for v in probe["versions"]} == {("UNAVAILABLE", "unloaded")}
        assert "inputs" not in probe["versions"][0]  # no signature for a version that is not loaded
        assert client.post("/v2/repository/models/probe/load").status_code == 200
        probe = next(m for m in client.get("/console/api/models").json()["models"] if m["name"] == "probe")
        assert probe["state"] == "READY"


@pytest.mark.parametrize(("security", "mode"), [
    ({}, "off"), ({"allow_admin_without_key": True}, "open"), ({"admin_key": ("admin-key-123456",)}, "key"),
])
def test_the_console_says_how_the_admin_api_is_reached(repo, tmp_path, security, mode) -> None:
    with TestClient(create_app(_config(repo, tmp_path / "data", **security))) as client:
        key = security.get("admin_key", ("",))[0]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert client.get("/console/api/models", headers=headers).json()["admin"] == mode


def test_with_an_api_key_the_page_is_open_and_its_data_is_not(repo, tmp_path) -> None:
    config = _config(repo, tmp_path / "data", api_key=("console-key-0123456789",))
    with TestClient(create_app(config)) as client:
        assert client.get("/").status_code == 200  # the page must load to ask for the key
        assert client.get("/console/app.js").status_code == 200
        for path in ("/console/api/models", "/console/api/live"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert "API key" in refused.json()["error"]
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            good = client.get(path, headers={"Authorization": "Bearer console-key-0123456789"})
            assert good.status_code == 200, path


def test_no_console_turns_the_page_and_its_data_off(repo, tmp_path) -> None:
    config = _config(repo, tmp_path / "data")
    config = dataclasses.replace(config, http=dataclasses.replace(config.http, console=False))
    with TestClient(create_app(config)) as client:
        for path in ("/", "/console", "/console/app.js", "/console/api/models", "/console/api/live"):
            assert client.get(path).status_code == 404, path
        assert client.get("/v2/models/probe").status_code == 200  # the APIs are untouched


def test_the_page_files_stay_small() -> None:
    # the console ships without a build step: readable modules, each a concept (DESIGN.md, rule 7)
    for path in STATIC.iterdir():
        assert len(path.read_text().splitlines()) <= 400, path.name
