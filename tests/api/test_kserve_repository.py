"""Versions and the repository API: version policies, load/unload/reload without restart, and no
dropped requests to other models while that happens."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.repos import PROBE_SOURCE, write_model, write_probe
from tests.server import LadleServer

ADMIN = "--allow-admin-without-key"  # the load/unload API is off by default


@pytest.fixture()
def repo(tmp_path):
    write_probe(tmp_path, "latest", versions=(1, 2, 3), version_policy={"latest": 2})
    write_probe(tmp_path, "specific", versions=(1, 2, 3), version_policy={"specific": [1, 3]})
    write_probe(tmp_path, "steady")
    write_probe(tmp_path, "churn", versions=(1,))
    return tmp_path


def x(v: float) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [v]}]}


def test_version_policies_and_default_version(repo) -> None:
    with LadleServer([repo]) as server:
        c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        assert c.get_model_metadata("latest")["versions"] == ["2", "3"]
        assert not c.is_model_ready("latest", "1")
        assert c.get_model_metadata("specific")["versions"] == ["1", "3"]
        r = httpx.post(server.url + "/v2/models/specific/infer", json=x(1.0)).json()
        assert r["model_version"] == "3", "no version given: the newest ready one serves"
        r = httpx.post(server.url + "/v2/models/specific/versions/1/infer", json=x(1.0)).json()
        assert r["model_version"] == "1"
        r = httpx.post(server.url + "/v2/models/specific/versions/2/infer", json=x(1.0))
        assert r.status_code == 404


def test_load_unload_reload_during_traffic_drops_nothing(repo) -> None:
    with LadleServer([repo, "--load-model", "steady", "--load-model", "churn", ADMIN]) as server:
        c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        failures: list[str] = []
        sent = [0]
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    r = client.post("/v2/models/steady/infer", json=x(float(i)))
                    if r.status_code != 200 or r.json()["outputs"][0]["data"] != [2.0 * i]:
                        failures.append(f"{r.status_code} {r.text}")
                    sent[0] += 1

        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            assert not c.is_model_ready("latest")  # not asked for at start-up
            c.load_model("latest")
            assert c.is_model_ready("latest", "3")
            c.unload_model("churn")
            assert not c.is_model_ready("churn")
            with pytest.raises(InferenceServerException, match="not ready"):
                c.infer("churn", [_input(1.0)])
            # a new version appears on disk: reloading picks it up without a restart
            write_model(repo, "churn", {}, {2: {"model.py": PROBE_SOURCE}})
            write_probe(repo, "churn", versions=(1, 2), version_policy={"all": True})
            c.load_model("churn")
            assert c.get_model_metadata("churn")["versions"] == ["1", "2"]
            c.load_model("steady")  # reload the model under traffic
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert sent[0] > 20
        assert failures == []
        assert c.is_server_ready()


def test_request_whose_body_arrives_during_a_reload_is_served_by_the_new_instance(repo) -> None:
    """The model is looked up when the headers arrive; if a reload retires that version before the
    body is in, the request goes to its successor instead of failing with 'unloading'."""
    body = json.dumps(x(4.0)).encode()
    head = (f"POST /v2/models/steady/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with LadleServer([repo, "--load-model", "steady", ADMIN]) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head)
            time.sleep(0.2)  # the handler is now waiting for the body, holding version 1's first instance
            assert httpx.post(server.url + "/v2/repository/models/steady/load").status_code == 200
            sock.sendall(body)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        status, _, rest = reply.partition(b"\r\n")
        assert status.split()[1] == b"200", reply
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["outputs"][0]["data"] == [8.0]


def test_traffic_split_shares_unversioned_requests_between_versions(tmp_path) -> None:
    """A canary: requests that name no version are drawn by weight among the split's READY versions (the
    newest is not special); a request naming a version still gets exactly that one; a reload can move the split."""
    write_probe(tmp_path, "canary", versions=(1, 2, 3), version_policy={"all": True},
                traffic_split={1: 1, 2: 1, 3: 0})
    with LadleServer([tmp_path, ADMIN]) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        def served(path: str, n: int) -> Counter:
            return Counter(client.post(path, json=x(1.0)).json()["model_version"] for _ in range(n))

        split = served("/v2/models/canary/infer", 300)
        assert set(split) == {"1", "2"} and min(split.values()) > 100  # 50/50 over 300: each ~150
        assert served("/v2/models/canary/versions/3/infer", 5) == {"3": 5}
        write_probe(tmp_path, "canary", versions=(1, 2, 3), version_policy={"all": True}, traffic_split={9: 1})
        assert client.post("/v2/repository/models/canary/load").status_code == 200
        assert served("/v2/models/canary/infer", 20) == {"3": 20}  # no split version is loaded: the newest


def test_load_of_unknown_or_broken_model_reports_why(repo) -> None:
    write_model(repo, "broken", {"backend": "python", "max_batch_size": 2,
                                 "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
                                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]},
                {1: {"model.py": "class Nothing:\n    pass\n"}})
    with LadleServer([repo, "--load-model", "steady", ADMIN]) as server:
        r = httpx.post(server.url + "/v2/repository/models/nosuch/load")
        assert r.status_code == 404
        r = httpx.post(server.url + "/v2/repository/models/broken/load")
        assert r.status_code == 400 and "predict" in r.json()["error"]
        index = {row["name"]: row for row in httpx.post(server.url + "/v2/repository/index").json()}
        assert index["broken"]["state"] == "UNAVAILABLE" and "predict" in index["broken"]["reason"]
        assert index["latest"]["state"] == "UNAVAILABLE"  # on disk, not loaded
        ready = httpx.post(server.url + "/v2/repository/index", json={"ready": True}).json()
        assert [row["name"] for row in ready] == ["steady"]


def _input(v: float) -> httpclient.InferInput:
    import numpy as np

    inp = httpclient.InferInput("x", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([[v]], dtype=np.float32))
    return inp
