"""deploy/grafana/ladle.json against a live server: every PromQL expression of the dashboard (panel targets and
template variable queries) names only series that a real `ladle serve` exports, with labels they carry, and the JSON
has the structure Grafana imports (uid, unique panel ids, grid positions, the datasource variable everywhere)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.repos import DEMO, write_model
from tests.server import ROOT, LadleServer

DASHBOARD = ROOT / "deploy" / "grafana" / "ladle.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
KEY = "dashboard-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ("Classic", "LLM", "Rollouts", "Cluster", "Batch jobs")
# Exported only by the `--ray` front end (cluster/frontend.py): a Ray cluster is too slow to start for this test;
# tests/cluster exercise the family itself.
RAY_ONLY_METRICS = {"ladle_cluster_replicas"}
# Added to every family by the `--ray` front end's merge of its replicas' metrics (cluster/metrics_merge.py).
RAY_ONLY_LABELS = {"replica"}
LLM_PARAMS = {"dtype": "float32", "num_kv_blocks": 24, "max_model_len": 128, "max_num_seqs": 4,
              "speculative_method": "ngram"}
# A greedy continuation of this from the tiny llama falls into a loop: n-gram lookup finds drafts to verify.
LOOPING = "the the the the"
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


# ---- the dashboard's PromQL ----

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' collapsed children included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def variable_query(variable: dict) -> str:
    query = variable.get("query", "")
    return query["query"] if isinstance(query, dict) else query


def expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    exprs += [variable_query(v) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def without_strings(expr: str) -> str:
    """The expression with its quoted label values emptied: a value is never a metric or label name."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bladle_[a-zA-Z0-9_:]*", without_strings(expr)))


def label_names(expr: str) -> set[str]:
    """Labels the expression matches on ({a="x"}) or groups by (by/without/on/ignoring (a, b)); not label_values's
    argument, checked apart."""
    text = without_strings(expr)
    names = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", text))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        names.update(n.strip() for n in group.split(",") if n.strip())
    names.update(re.findall(r"label_values\([^,]*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)", text))
    return names - PROMQL_KEYWORDS


# ---- structure ----

def test_the_dashboard_is_structurally_importable() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40 and dashboard["title"]
    assert dashboard["schemaVersion"] >= 39
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert [next(r for r in rows if r.startswith(prefix)) for prefix in ROWS]
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip() and target["refId"]
    assert not overlapping(panels)


def overlapping(panels: list[dict]) -> list[tuple[str, str]]:
    cells: dict[tuple[int, int], str] = {}
    clashes = []
    for panel in panels:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    clashes.append((cells[(x, y)], panel["title"]))
                cells[(x, y)] = panel["title"]
    return clashes


def test_template_variables_pick_the_datasource_model_and_version() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "version"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
        assert variable_query(variables[name]).startswith("label_values(")
        assert variable_query(variables[name]).endswith(f", {name})")
    assert "$model" in variable_query(variables["version"])  # versions of the models chosen


def balanced(expr: str) -> bool:
    """Brackets nest and close (no PromQL parser is a dependency: this catches the usual editing slip)."""
    stack: list[str] = []
    for char in without_strings(expr):
        if char in "([{":
            stack.append(")]}"["([{".index(char)])
        elif char in ")]}" and (not stack or stack.pop() != char):
            return False
    return not stack


def test_expressions_are_balanced_use_the_rate_interval_and_quantiles_group_by_le() -> None:
    for expr in expressions(load_dashboard()):
        assert balanced(expr), expr
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", expr  # Grafana sizes it to the scrape interval and the zoom
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "le" in label_names(expr), expr


def test_the_prometheus_config_scrapes_ladle() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "ladle")
    assert job["metrics_path"] == "/metrics" and job["scrape_interval"] == "10s"
    assert job["static_configs"][0]["targets"] == ["localhost:8000"]
    text = PROMETHEUS.read_text()
    assert "--protect-metrics" in text and "--ray" in text  # the commented variants are there to uncomment


# ---- a live server exporting every family ----

def build_repository(repo: Path) -> Path:
    """The demo's iris shadowed by its v2, and a tiny LLM with n-gram speculation shadowed by a differently trained
    v2, so classic, LLM, spec-decode and both shadow families all exist. iris's v1 becomes a copy of its ONNX v2:
    importing scikit-learn for the skops v1 took 8-10 s of a loaded 2-core machine, and the test needs only two
    versions to compare."""
    shutil.copytree(DEMO / "iris", repo / "iris", ignore=shutil.ignore_patterns("1"))
    shutil.copytree(repo / "iris" / "2", repo / "iris" / "1")
    iris = yaml.safe_load((repo / "iris" / "config.yaml").read_text())
    iris["shadow"] = {"version": 2, "fraction": 1.0}
    (repo / "iris" / "config.yaml").write_text(yaml.safe_dump(iris))
    write_model(repo, "chat", {"backend": "llm", "parameters": LLM_PARAMS, "version_policy": {"all": True},
                               "traffic_split": {1: 100}, "shadow": {"version": 2, "fraction": 1.0}}, {1: {}, 2: {}})
    save_tiny_checkpoint(repo / "chat" / "1", "llama")
    save_tiny_checkpoint(repo / "chat" / "2", "llama", seed=1)
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (DEMO / "iris" / "2" / "model.onnx").exists():
        pytest.skip("the demo models are not built: run `make install` (examples/build_demo.py)")
    repo = build_repository(tmp_path_factory.mktemp("dashboard"))
    # LADLE_SPEC_COST=flat: the speculation policy always drafts, whatever this machine's start-up timings
    with LadleServer([repo, "--api-key", KEY], env={"LADLE_SPEC_COST": "flat"}) as s:
        yield s


def exercise(server: LadleServer) -> None:
    """One request of each kind: families with labelled series show none until something is counted."""
    infer = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
    assert httpx.post(server.url + "/v2/models/iris/infer", json=infer, headers=AUTH).status_code == 200
    assert httpx.post(server.url + "/v2/models/iris/infer", json=infer).status_code == 401  # a refusal
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    answer = client.completions.create(model="chat", prompt=LOOPING, max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 40
    job = httpx.post(server.url + "/v2/jobs?model=iris", content=json.dumps(infer) + "\n", headers=AUTH)
    assert job.status_code == 200, job.text
    wait_for(lambda: get(server, f"/v2/jobs/{job.json()['id']}")["status"] == "completed", "the batch job")
    for model in ("iris", "chat"):
        wait_for(lambda m=model: get(server, f"/v2/models/{m}/shadow")["counts"]["compared"] >= 1, f"{model}'s shadow")
    wait_for(lambda: 'ladle_jobs{status="completed"} 1.0' in scrape(server), "the job gauges")


def get(server: LadleServer, path: str) -> dict:
    return httpx.get(server.url + path, headers=AUTH).json()


def scrape(server: LadleServer) -> str:
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200
    return response.text


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not there after {timeout}s")
        time.sleep(0.1)


def exported_series(text: str) -> dict[str, set[str]]:
    """Sample name (as PromQL selects it: ..._total, ..._bucket, ..._sum) -> the label names its samples carry;
    only names with at least one sample: a family declared but never observed selects nothing."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_every_metric_and_label_of_the_dashboard_is_exported(server) -> None:
    exercise(server)
    series = exported_series(scrape(server))
    unknown, bad_labels = [], []
    for expr in expressions(load_dashboard()):
        names = metric_names(expr)
        assert names, f"no ladle metric in {expr!r}"
        missing = names - series.keys() - RAY_ONLY_METRICS
        unknown += [(name, expr) for name in missing]
        carried = set().union(*(series.get(name, set()) for name in names)) | {"le"}
        if names <= RAY_ONLY_METRICS:
            continue
        bad_labels += [(label, expr) for label in label_names(expr) - carried - RAY_ONLY_LABELS]
    assert not unknown, "metrics the server does not export:\n" + "\n".join(f"{n}: {e}" for n, e in unknown)
    assert not bad_labels, "labels those metrics do not carry:\n" + "\n".join(f"{n}: {e}" for n, e in bad_labels)


def test_every_model_and_version_reaches_the_template_variables(server) -> None:
    """label_values(ladle_model_state, model|version) lists the LLM's versions beside the classic model's."""
    ready = {(s.labels["model"], s.labels["version"]) for family in text_string_to_metric_families(scrape(server))
             for s in family.samples if s.name == "ladle_model_state" and s.labels["state"] == "READY" and s.value}
    assert ready == {("iris", "1"), ("iris", "2"), ("chat", "1"), ("chat", "2")}
