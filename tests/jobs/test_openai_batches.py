"""The OpenAI Files + Batches API against a real server with a tiny LLM, through the official `openai` client:
files round trip and paginate; a batch's output matches the real-time answers line for line; malformed lines fail
alone; validation failures, cancellation, expiry and upload limits behave as OpenAI's do."""

from __future__ import annotations

import io
import re
import time

import httpx
import openai
import pytest

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.jobs.helpers import chat_line, jsonl, lines_of, upload, wait_batch
from tests.server import LadleServer

ENGINE = ["--dtype", "float32", "--num-kv-blocks", "128", "--max-model-len", "256", "--num-threads", "1",
          "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")
    args = ["--model", checkpoint, "--served-model-name", "tiny", *ENGINE, "--max-batch-lines", "500",
            "--max-batch-file-bytes", "200000"]
    with LadleServer(args) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_files_round_trip_list_and_delete(client):
    rows = [chat_line(f"r{i}", f"hello {i}") for i in range(3)]
    ids = [upload(client, rows, f"f{i}.jsonl") for i in range(3)]
    f = client.files.retrieve(ids[0])
    assert (f.id, f.object, f.purpose, f.filename, f.bytes) == (ids[0], "file", "batch", "f0.jsonl", len(jsonl(rows)))
    assert client.files.content(ids[1]).content == jsonl(rows)
    newest_first = [f.id for f in client.files.list(purpose="batch", limit=2)]  # the client pages on its own
    assert newest_first[:3] == ids[::-1]
    first = client.files.list(limit=2, order="asc")
    assert len(first.data) == 2 and first.has_more
    after = client.files.list(limit=100, order="asc", after=first.data[-1].id)
    assert first.data[-1].id not in [f.id for f in after.data]
    deleted = client.files.delete(ids[2])
    assert deleted.deleted and deleted.id == ids[2]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[2])


def test_batch_output_matches_the_real_time_answers(client):
    rows = [chat_line(f"req-{i}", f"count to {i}") for i in range(6)]
    batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"team": "search"})
    assert batch.status == "validating" and batch.metadata == {"team": "search"}
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 6, 0)
    assert done.error_file_id is None and done.completed_at >= done.in_progress_at >= done.created_at
    out = lines_of(client.files.content(done.output_file_id).content)
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]  # in input order
    for row, o in zip(rows, out, strict=True):
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
        live = client.chat.completions.create(**row["body"])
        assert o["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
        assert o["response"]["body"]["usage"]["completion_tokens"] == live.usage.completion_tokens


def test_a_malformed_line_fails_only_itself(client):
    rows = [chat_line("ok-1", "hi"), b"{not json", chat_line("bad-body", "hi", max_tokens=-3),
            {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"}, chat_line("ok-2", "yo"),
            chat_line("stream", "hey", stream=True)]
    batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 3, 3)
    out = lines_of(client.files.content(done.output_file_id).content)
    assert [o["custom_id"] for o in out] == ["ok-1", "ok-2", "stream"]  # a stream line answers as one body
    errors = {e["custom_id"]: e for e in lines_of(client.files.content(done.error_file_id).content)}
    assert set(errors) == {None, "bad-body", "no-body"}
    assert errors[None]["error"]["code"] == "invalid_request" and "not valid JSON" in errors[None]["error"]["message"]
    assert errors["bad-body"]["response"]["status_code"] == 400
    assert errors["bad-body"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert "body must be a JSON object" in errors["no-body"]["error"]["message"]


@pytest.mark.parametrize(("rows", "code"), [
    ([chat_line("a", "hi", model="nope")], "model_not_found"),
    ([{**chat_line("a", "hi"), "url": "/v1/completions"}], "invalid_url"),
    ([chat_line("a", "hi"), chat_line("a", "again")], "duplicate_custom_id"),
])
def test_validation_failures_fail_the_batch_with_a_clear_message(client, rows, code):
    batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "failed" and done.failed_at is not None and done.output_file_id is None
    assert [e.code for e in done.errors.data] == [code]
    assert done.errors.data[0].line == len(rows)
    if code == "model_not_found":
        assert "'nope' is not served here (served: tiny)" in done.errors.data[0].message


def test_create_refuses_bad_requests(client, server):
    file_id = upload(client, [chat_line("a", "hi")])
    with pytest.raises(openai.BadRequestError, match="endpoint must be one of"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/images", completion_window="24h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="soon")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="metadata"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"k": "v" * 600})
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_upload_limits_are_400s(client, server):
    with pytest.raises(openai.BadRequestError, match="lines, over the server's limit of 500"):
        upload(client, [chat_line(f"r{i}", "x") for i in range(501)])
    with pytest.raises(openai.BadRequestError, match="limit of 200000 bytes"):
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 300_000)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose must be 'batch'"):
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    raw = httpx.post(server.url + "/v1/files", content=b"{}", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "multipart/form-data" in raw.json()["error"]["message"]
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def long_rows(count: int, prefix: str) -> list[dict]:
    return [chat_line(f"{prefix}{i}", f"story {i}", max_tokens=200, ignore_eos=True) for i in range(count)]


def test_cancel_stops_the_batch_and_keeps_what_finished(client, server):
    batch = client.batches.create(input_file_id=upload(client, long_rows(60, "c")), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_batch(client, batch.id, until=("in_progress",))
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    counts = done.request_counts
    assert counts.total == 60 and counts.completed < 60
    finished = lines_of(client.files.content(done.output_file_id).content) if done.output_file_id else []
    assert len(finished) == counts.completed
    # the engine is free again: a real-time request is answered at once
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling a final batch changes nothing


def test_expiry_lists_the_lines_that_did_not_run(client):
    batch = client.batches.create(input_file_id=upload(client, long_rows(60, "e")), endpoint="/v1/chat/completions",
                                  completion_window="2s")  # type: ignore[arg-type]
    done = wait_batch(client, batch.id)
    assert done.status == "expired" and done.expired_at is not None
    errors = lines_of(client.files.content(done.error_file_id).content)
    expired = [e for e in errors if e["error"] and e["error"]["code"] == "batch_expired"]
    assert len(expired) == 60 - done.request_counts.completed - done.request_counts.failed > 0
    ran = lines_of(client.files.content(done.output_file_id).content) if done.output_file_id else []
    assert sorted(e["custom_id"] for e in expired + ran) == sorted(f"e{i}" for i in range(60))


def test_batches_list_pages_newest_first(client):
    ids = [client.batches.create(input_file_id=upload(client, [chat_line("a", "hi")]),
                                 endpoint="/v1/chat/completions", completion_window="24h").id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == ids[0]
    for batch_id in ids:
        wait_batch(client, batch_id)


def test_metrics_count_jobs_and_lines(server, client):
    ok = upload(client, [chat_line("m1", "hi"), b"not json"])
    wait_batch(client, client.batches.create(input_file_id=ok, endpoint="/v1/chat/completions",
                                             completion_window="24h").id)
    batches = [wait_batch(client, b.id) for b in client.batches.list(limit=1000).data]
    time.sleep(2.5)  # the by-status gauges refresh every 2 s
    text = httpx.get(server.url + "/metrics").text
    for status in ("completed", "failed", "cancelled", "expired"):
        count = sum(b.status == status for b in batches)
        assert f'ladle_jobs{{status="{status}"}} {float(count)}' in text
    completed = sum(b.request_counts.completed for b in batches)
    failed = sum(b.request_counts.failed for b in batches)
    assert f'ladle_job_lines_total{{outcome="completed"}} {float(completed)}' in text
    # malformed lines fail at validation, counted on the job but never run by this server
    assert re.search(r'ladle_job_lines_total\{outcome="failed"\} ([0-9.]+)', text)
    assert failed > 0 and "ladle_job_queue_depth 0.0" in text and "ladle_job_lines_in_flight 0.0" in text


def test_a_long_filename_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="at most 255"):
        client.files.create(file=("n" * 300 + ".jsonl", io.BytesIO(jsonl([chat_line("a", "hi")]))), purpose="batch")
