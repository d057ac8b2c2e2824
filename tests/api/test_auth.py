"""Access control against real servers: bearer keys on both APIs (real `openai` and `tritonclient` clients),
open probes, the admin key on the repository API, keys never logged, start-up refusals, and per-key rate
limits (429 with Retry-After); plus the key ring, bucket table and path rules on plain objects."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ladle.api.app import create_app
from ladle.api.auth import Access, AccessControl, KeyRing, RateLimiter, Role, bearer_token, classify, is_admin_path
from ladle.config import JobsConfig, SecurityConfig, ServerConfig
from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.repos import write_probe
from tests.server import LadleServer

API_KEY = "api-key-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
ENV_KEYS = ("env-key-one-3a2b1c0d9e8f7a6b", "env-key-two-7a6b5c4d3e2f1a0b")
FILE_KEY = "file-key-55aa66bb77cc88dd99ee"
ADMIN_KEY = "admin-key-c0ffee00c0ffee00c0ffee"
WRONG_KEY = "wrong-key-deadbeefdeadbeefdead"
PROBE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A classic model (probe) and a tiny LLM behind every kind of key."""
    tmp = tmp_path_factory.mktemp("keyed")
    write_probe(tmp / "repo", "probe")
    checkpoint = save_tiny_checkpoint(tmp / "tiny", "llama")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# the team's key\n\n  {FILE_KEY}  \n")
    args = [tmp / "repo", "--model", checkpoint, "--served-model-name", "tiny", "--dtype", "float32",
            "--num-kv-blocks", "16", "--max-model-len", "64", "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
            "--api-key-file", key_file, "--log-level", "debug"]
    with LadleServer(args, env={"LADLE_API_KEY": ",".join(ENV_KEYS)}) as server:
        yield server


@pytest.mark.parametrize("headers", [{}, bearer(WRONG_KEY), {"Authorization": f"Basic {API_KEY}"}])
def test_kserve_endpoints_need_a_key(keyed, headers) -> None:
    with httpx.Client(base_url=keyed.url, headers=headers) as client:
        replies = [client.get("/v2"), client.get("/v2/models/probe"), client.get("/v2/models/probe/ready"),
                   client.post("/v2/models/probe/infer", json=PROBE), client.post("/v2/repository/index"),
                   client.get("/v2/no/such/route")]
    for r in replies:
        assert r.status_code == 401, r.request.url
        assert r.headers["www-authenticate"] == "Bearer"
        assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str)
        assert API_KEY not in r.text and WRONG_KEY not in r.text
    wrong_key = headers.get("Authorization", "").startswith("Bearer")
    expected = "invalid API key" if wrong_key else "send the header `Authorization: Bearer <key>`"
    assert all(expected in r.json()["error"] for r in replies)


def test_openai_endpoints_need_a_key_in_openai_shape(keyed) -> None:
    for headers in ({}, bearer(WRONG_KEY)):
        for r in (httpx.get(keyed.url + "/v1/models", headers=headers),
                  httpx.post(keyed.url + "/v1/completions", headers=headers, json={"model": "tiny", "prompt": "x"}),
                  httpx.post(keyed.url + "/v1/chat/completions", headers=headers, json={})):
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="tiny", prompt="ladle", max_tokens=2)


@pytest.mark.parametrize("key", [API_KEY, *ENV_KEYS, FILE_KEY, ADMIN_KEY])
def test_openai_client_with_any_configured_key(keyed, key) -> None:
    """--api-key, both LADLE_API_KEY entries, the --api-key-file line and the admin key all work."""
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="ladle", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_tritonclient_with_bearer_header(keyed) -> None:
    client = httpclient.InferenceServerClient(keyed.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()  # probes need no key
    data = httpclient.InferInput("x", [1, 1], "FP32")
    data.set_data_from_numpy(np.array([[1.5]], dtype=np.float32))
    result = client.infer("probe", [data], headers=bearer(API_KEY))
    assert result.as_numpy("y").tolist() == [[3.0]]
    assert client.get_model_metadata("probe", headers=bearer(FILE_KEY))["name"] == "probe"
    with pytest.raises(InferenceServerException, match="needs an API key"):
        client.infer("probe", [data])  # binary body, no key: refused before the body is read
    with pytest.raises(InferenceServerException, match="invalid API key"):
        client.infer("probe", [data], headers=bearer(WRONG_KEY))


def test_probes_and_metrics_stay_open(keyed) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/health", "/metrics"):
        assert httpx.get(keyed.url + path).status_code == 200, path


def test_admin_endpoints_need_the_admin_key(keyed) -> None:
    load = keyed.url + "/v2/repository/models/probe/load"
    assert httpx.post(load).status_code == 401
    assert httpx.post(load, headers=bearer(WRONG_KEY)).status_code == 401
    r = httpx.post(load, headers=bearer(API_KEY))
    assert r.status_code == 403 and "admin key" in r.json()["error"]
    assert httpx.post(keyed.url + "/v2/repository/models/probe/unload", headers=bearer(ENV_KEYS[0])).status_code == 403
    assert httpx.post(load, headers=bearer(ADMIN_KEY)).status_code == 200
    index = httpx.post(keyed.url + "/v2/repository/index", headers=bearer(API_KEY))  # metadata: an API key
    # the --model LLM is a (pinned) entry of the host, listed with the repository's models
    assert index.status_code == 200 and [row["name"] for row in index.json()] == ["probe", "tiny"]
    r = httpx.post(keyed.url + "/v2/models/probe/infer", json=PROBE, headers=bearer(ADMIN_KEY))
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0]


def test_the_command_line_llm_is_listed_and_cannot_be_unloaded(keyed) -> None:
    """--model is pinned in the host: READY in the index, and the repository API refuses to load or unload it."""
    index = httpx.post(keyed.url + "/v2/repository/index", headers=bearer(API_KEY)).json()
    assert {"name": "tiny", "version": "1", "state": "READY", "reason": ""} in index
    for action in ("unload", "load"):
        r = httpx.post(f"{keyed.url}/v2/repository/models/tiny/{action}", headers=bearer(ADMIN_KEY))
        assert r.status_code == 400 and "given with --model" in r.json()["error"], r.text
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="ladle", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2
    assert httpx.get(keyed.url + "/v2/health/ready").status_code == 200


def test_keys_never_appear_in_the_log(keyed) -> None:
    for key in (API_KEY, ADMIN_KEY, WRONG_KEY, *ENV_KEYS, FILE_KEY):
        httpx.get(keyed.url + "/v2/models/probe", headers=bearer(key))
        httpx.post(keyed.url + "/v2/repository/models/nosuch/load", headers=bearer(key))
    log = keyed.log()
    assert "access control: 4 API key(s), 1 admin key(s)" in log
    for key in (API_KEY, ADMIN_KEY, WRONG_KEY, *ENV_KEYS, FILE_KEY):
        assert key not in log


def test_admin_endpoints_are_off_without_an_admin_key(demo_server) -> None:
    """No key of any kind configured: the API is open as before, but load/unload answer 403 saying how to
    turn them on, and nothing is reloaded or unloaded."""
    for action in ("load", "unload"):
        r = httpx.post(f"{demo_server.url}/v2/repository/models/iris/{action}")
        assert r.status_code == 403
        assert "--admin-key" in r.json()["error"] and "--allow-admin-without-key" in r.json()["error"]
    assert httpx.get(demo_server.url + "/v2/models/iris/ready").status_code == 200
    assert httpx.post(demo_server.url + "/v2/repository/index").status_code == 200


def test_no_middleware_without_keys_or_rate_limit() -> None:
    def access_control(security: SecurityConfig) -> list:
        app = create_app(ServerConfig(security=security))
        return [m for m in app.user_middleware if m.cls is AccessControl]

    assert access_control(SecurityConfig()) == []
    assert access_control(SecurityConfig(allow_admin_without_key=True)) == []
    assert len(access_control(SecurityConfig(api_key=(API_KEY,)))) == 1
    assert len(access_control(SecurityConfig(rate_limit=5.0))) == 1


# -- rate limits --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """Three keys, /metrics protected, a burst of 3 then one request per 20 s per key."""
    repo = tmp_path_factory.mktemp("limited")
    write_probe(repo, "probe")
    args = [repo, "--api-key", "key-a-0123456789abcdef", "--api-key", "key-b-0123456789abcdef",
            "--api-key", "key-c-0123456789abcdef", "--protect-metrics", "--rate-limit", "0.05",
            "--rate-limit-burst", "3"]
    with LadleServer(args) as server:
        yield server


def test_protect_metrics_needs_a_key(limited) -> None:
    r = httpx.get(limited.url + "/metrics")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(limited.url + "/metrics", headers=bearer("key-c-0123456789abcdef")).status_code == 200
    assert httpx.get(limited.url + "/v2/health/ready").status_code == 200


def test_rate_limit_burst_then_429_per_key(limited) -> None:
    key_a, key_b = bearer("key-a-0123456789abcdef"), bearer("key-b-0123456789abcdef")
    with httpx.Client(base_url=limited.url) as client:
        assert [client.post("/v2/models/probe/infer", json=PROBE, headers=key_a).status_code
                for _ in range(3)] == [200, 200, 200]
        r = client.post("/v2/models/probe/infer", json=PROBE, headers=key_a)
        assert r.status_code == 429 and "rate limit" in r.json()["error"]
        assert 1 <= int(r.headers["retry-after"]) <= 20
        r = client.get("/v1/models", headers=key_a)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 20
        # key A spent its burst; key B has its own bucket, and probes are never limited
        assert [client.get("/v2", headers=key_b).status_code for _ in range(3)] == [200, 200, 200]
        assert client.get("/v2", headers=key_b).status_code == 429
        assert all(client.get("/v2/health/live").status_code == 200 for _ in range(20))
        key_c = bearer("key-c-0123456789abcdef")  # --protect-metrics: reading them takes a key (and its tokens)

        def refused() -> dict[str, float]:
            text = client.get("/metrics", headers=key_c).text
            return {m[0]: float(m[1]) for m in re.findall(r'^ladle_requests_refused_total\{reason="(\w+)"\} (\S+)$',
                                                            text, re.M)}

        before = refused()
        assert before["rate_limited"] == 3.0  # key A twice, key B once
        assert client.post("/v2/models/probe/infer", json=PROBE, headers=bearer("wrong")).status_code == 401
        assert refused()["unauthorized"] == before.get("unauthorized", 0.0) + 1


def test_rate_limit_per_client_ip_without_keys(tmp_path) -> None:
    """No keys: one bucket per client IP, which a made-up bearer token does not escape."""
    write_probe(tmp_path, "probe")
    args = [tmp_path, "--rate-limit", "0.05", "--rate-limit-burst", "2"]
    with LadleServer(args) as server, httpx.Client(base_url=server.url) as client:
        assert [client.get("/v2").status_code for _ in range(2)] == [200, 200]
        assert client.get("/v2", headers=bearer("made-up")).status_code == 429
        assert client.get("/v2/health/ready").status_code == 200


# -- start-up refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "env", "message"), [
    (["--api-key", ""], {}, "--api-key: key 1 is empty"),
    (["--api-key", "ok-key-0123456789abcdef", "--admin-key", "  "], {}, "--admin-key: key 1 is empty"),
    ([], {"LADLE_API_KEY": "ok-key-0123456789abcdef,,"}, "LADLE_API_KEY: key 2 is empty"),
    (["--api-key", "secret with space"], {}, "printable ASCII"),
    (["--api-key-file", "/nonexistent/keys.txt"], {}, "cannot read it"),
    (["--protect-metrics"], {}, "--protect-metrics needs a key"),
    (["--rate-limit", "-1"], {}, "--rate-limit must be"),
])
def test_bad_security_settings_stop_start_up(tmp_path, args, env, message) -> None:
    result = subprocess.run([sys.executable, "-m", "ladle", "serve", str(tmp_path), *args, "--port", "1"],
                            capture_output=True, text=True, timeout=120, env={**_environ(), **env})
    assert result.returncode == 2 and message in result.stderr
    assert "secret with space" not in result.stderr and "ok-key" not in result.stderr


def test_key_file_with_only_comments_is_refused(tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# nothing yet\n\n")
    result = subprocess.run([sys.executable, "-m", "ladle", "serve", str(tmp_path), "--api-key-file", str(keys)],
                            capture_output=True, text=True, timeout=120, env=_environ())
    assert result.returncode == 2 and "holds no key" in result.stderr


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("LADLE_API_KEY", "LADLE_ADMIN_KEY")}


# -- the parts on plain objects ---------------------------------------------------------------------
def test_key_ring_roles() -> None:
    ring = KeyRing(("api-1", "both"), ("admin-1", "both"))
    assert ring.match(b"api-1")[0] is Role.INFERENCE
    assert ring.match(b"admin-1")[0] is Role.ADMIN
    assert ring.match(b"both")[0] is Role.ADMIN  # a key given as both is an admin key
    assert ring.match(b"api-")[0] is Role.NONE and ring.match(b"api-12")[0] is Role.NONE
    assert ring.match(None) == (Role.NONE, -1)
    assert ring.match(b"api-1")[1] != ring.match(b"admin-1")[1]  # each key its own rate-limit bucket


def test_bearer_token_parsing() -> None:
    assert bearer_token([(b"host", b"x"), (b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer_token([(b"authorization", b"bearer   abc ")]) == b"abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([(b"authorization", b"Bearer")]) is None
    assert bearer_token([]) is None


def test_rate_limiter_refills_and_its_table_is_bounded() -> None:
    limiter = RateLimiter(rate=2.0, burst=2.0, max_buckets=100)
    assert [limiter.wait("a", now=0.0) for _ in range(2)] == [0.0, 0.0]
    assert limiter.wait("a", now=0.0) == pytest.approx(0.5)
    assert limiter.wait("b", now=0.0) == 0.0  # another identity, another bucket
    assert limiter.wait("a", now=0.6) == 0.0  # 0.6 s at 2/s refilled one token
    for i in range(10_000):
        limiter.wait(f"10.0.{i // 256}.{i % 256}", now=1.0)
    assert len(limiter) == 100


def test_admin_paths() -> None:
    assert is_admin_path("/v2/repository/models/m/load") and is_admin_path("/v2/repository/models/m/unload")
    assert is_admin_path("/reset_prefix_cache") and is_admin_path("/v1/reset_prefix_cache")
    assert not is_admin_path("/v2/repository/index")
    assert not is_admin_path("/v2/models/reset_me/infer") and not is_admin_path("/v2/models/reset")
    assert not is_admin_path("/v2/models/m/infer")


def test_starting_or_aborting_a_rollout_is_admin_reading_it_is_not() -> None:
    path = "/v2/models/m/rollout"
    assert is_admin_path(path, "POST") and is_admin_path(path, "DELETE")
    assert not is_admin_path(path, "GET") and not is_admin_path(path, "HEAD") and not is_admin_path(path)
    assert classify(path, "POST") is Access.ADMIN and classify(path, "DELETE") is Access.ADMIN
    assert classify(path, "GET") is Access.API
    assert not is_admin_path("/v2/models/m/versions/2/rollout", "POST")  # no such route: not the rollout API
    assert not is_admin_path("/v2/models/rollout", "POST") and not is_admin_path("/v2/models/m/infer", "POST")
    assert classify("/v2/repository/models/m/load", "POST") is Access.ADMIN
    assert classify("/v2/health/ready", "GET") is Access.OPEN and classify("/metrics", "GET") is Access.METRICS


def test_rollout_changes_are_off_without_an_admin_key(tmp_path) -> None:
    """No admin key and no --allow-admin-without-key: POST and DELETE of a rollout answer 403; GET still reads."""
    from starlette.testclient import TestClient

    app = create_app(ServerConfig(security=SecurityConfig(), jobs=JobsConfig(data_dir=tmp_path)))
    with TestClient(app) as client:  # no repository: nothing loads, the routes are all there is
        for method in ("POST", "DELETE"):
            r = client.request(method, "/v2/models/m/rollout", json={"to": 2, "steps": [100], "every": 1})
            assert r.status_code == 403 and "--allow-admin-without-key" in r.json()["error"]
        r = client.get("/v2/models/m/rollout")
        assert r.status_code == 404 and "has no rollout" in r.json()["error"]
