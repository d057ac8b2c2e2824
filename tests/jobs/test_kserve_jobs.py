"""Bulk KServe jobs (/v2/jobs) on the demo repository's classic models, and the OpenAI batch path for embeddings:
JSONL bodies or uploaded files, results in line order, malformed lines failing alone, and clear refusals."""

from __future__ import annotations

import io

import httpx
import openai
import pytest

from tests.jobs.helpers import jsonl, lines_of, wait_batch, wait_job

IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


def iris_request(i: int) -> dict:
    return {"id": f"row-{i}", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                          "data": IRIS[i % 3]}]}


def test_a_jsonl_body_runs_as_a_job_in_line_order(demo_server):
    url = demo_server.url
    rows = [iris_request(i) for i in range(40)]
    created = httpx.post(f"{url}/v2/jobs?model=iris", content=jsonl(rows),
                         headers={"content-type": "application/jsonl"})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["object"] == "job" and job["kind"] == "kserve" and job["endpoint"] == "/v2/models/iris/infer"
    done = wait_job(url, job["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    results = lines_of(httpx.get(f"{url}/v2/jobs/{job['id']}/results").content)
    assert [r["line"] for r in results] == list(range(1, 41)) and [r["id"] for r in results] == [r["id"] for r in rows]
    live = [httpx.post(f"{url}/v2/models/iris/infer", json=iris_request(i)).json() for i in range(3)]
    for r in results:  # batched with other lines: the same answer up to float rounding
        expected = {o["name"]: o["data"] for o in live[(r["line"] - 1) % 3]["outputs"]}
        assert r["status_code"] == 200 and r["response"]["model_name"] == "iris"
        for output in r["response"]["outputs"]:
            assert output["data"] == pytest.approx(expected[output["name"]], rel=1e-4, abs=1e-6)


def test_an_uploaded_file_and_a_version_and_bad_lines(demo_server):
    url = demo_server.url
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    rows = [iris_request(0), b"[1, 2", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],
                                                    "data": [1, 2, 3]}]}, iris_request(1)]
    file_id = client.files.create(file=("iris.jsonl", io.BytesIO(jsonl(rows))), purpose="batch").id
    created = httpx.post(f"{url}/v2/jobs", json={"model": "iris", "version": "1", "input_file_id": file_id,
                                                 "metadata": {"owner": "ci"}})
    assert created.status_code == 200, created.text
    assert created.json()["endpoint"] == "/v2/models/iris/versions/1/infer"
    done = wait_job(url, created.json()["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    results = lines_of(httpx.get(f"{url}/v2/jobs/{done['id']}/results").content)
    assert [(r["line"], r["status_code"]) for r in results] == [(1, 200), (2, 400), (3, 400), (4, 200)]
    assert "not valid JSON" in results[1]["error"] and "shape" in results[2]["error"]
    # the same records, split, in the OpenAI-style output and error files
    assert len(lines_of(client.files.content(done["output_file_id"]).content)) == 2
    assert len(lines_of(client.files.content(done["error_file_id"]).content)) == 2


@pytest.mark.parametrize(("query", "status", "message"), [
    ("model=nope", 404, "unknown model 'nope'"),
    ("model=iris&version=7", 404, "has no version 7"),
    ("", 400, "name the model"),
    ("model=iris&completion_window=1y", 400, "completion_window"),
])
def test_bad_job_requests_are_refused_in_kserve_shape(demo_server, query, status, message):
    answer = httpx.post(f"{demo_server.url}/v2/jobs?{query}", content=jsonl([iris_request(0)]))
    assert answer.status_code == status and message in answer.json()["error"]


def test_an_llm_is_sent_to_the_batches_api(demo_server):
    answer = httpx.post(f"{demo_server.url}/v2/jobs?model=smollm2", content=jsonl([{"inputs": []}]))
    assert answer.status_code == 400 and "/v1/batches" in answer.json()["error"]


def test_jobs_list_and_unknown_ids(demo_server):
    url = demo_server.url
    ids = [httpx.post(f"{url}/v2/jobs?model=iris", content=jsonl([iris_request(i)])).json()["id"] for i in range(2)]
    listed = httpx.get(f"{url}/v2/jobs?limit=1&kind=kserve").json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == ids[-1] and listed["has_more"]
    assert httpx.get(f"{url}/v2/jobs/job-nope").status_code == 404
    assert httpx.get(f"{url}/v2/jobs/job-nope/results").json() == {"error": "no batch or job with id 'job-nope'"}
    for job_id in ids:
        assert wait_job(url, job_id)["status"] == "completed"


def test_an_embeddings_batch_on_minilm(demo_server):
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="x", max_retries=0)
    texts = ["the cat sat", "a dog ran", "ladle serves models", "bulk work at night"]
    rows = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "minilm", "input": t}} for i, t in enumerate(texts)]
    file_id = client.files.create(file=("emb.jsonl", io.BytesIO(jsonl(rows))), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 4
    out = lines_of(client.files.content(done.output_file_id).content)
    live = client.embeddings.create(model="minilm", input=texts[2]).data[0].embedding
    vector = out[2]["response"]["body"]["data"][0]["embedding"]
    assert out[2]["custom_id"] == "e2" and max(abs(a - b) for a, b in zip(vector, live, strict=True)) < 1e-5
    # an LLM line in an embeddings batch is a validation error
    bad = [{**rows[0], "body": {"model": "smollm2", "input": "x"}}]
    file_id = client.files.create(file=("bad.jsonl", io.BytesIO(jsonl(bad))), purpose="batch").id
    failed = wait_batch(client, client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                                      completion_window="24h").id)
    assert failed.status == "failed" and "not an embedding model" in failed.errors.data[0].message


def test_unfinished_jobs_are_bounded(demo_repository, tmp_path):
    from tests.server import LadleServer

    rows = jsonl([iris_request(i) for i in range(20000)])  # long enough to be unfinished when the next one comes
    with LadleServer([demo_repository, "--load-model", "iris", "--max-active-jobs", "1"]) as server:
        first = httpx.post(f"{server.url}/v2/jobs?model=iris", content=rows, timeout=60).json()
        refused = httpx.post(f"{server.url}/v2/jobs?model=iris", content=jsonl([iris_request(0)]))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "--max-active-jobs" in refused.json()["error"]
        assert wait_job(server.url, first["id"], timeout=240)["status"] == "completed"
        again = httpx.post(f"{server.url}/v2/jobs?model=iris", content=jsonl([iris_request(0)]))
        assert again.status_code == 200 and wait_job(server.url, again.json()["id"])["status"] == "completed"
