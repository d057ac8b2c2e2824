"""Input lines to requests and outcomes to records (jobs/lines.py), on plain bytes: JSONL splitting, the per-line
bound, and the OpenAI and KServe record shapes."""

from __future__ import annotations

import orjson

from ladle.jobs import lines
from ladle.jobs.records import KSERVE, OPENAI, VALIDATING, JobRecord, LineRecord


def job(kind: str = OPENAI, endpoint: str = "/v1/chat/completions") -> JobRecord:
    return JobRecord("batch_x", kind, endpoint, "file-x", "24h", VALIDATING, 0, 86400)


def ok(endpoint: str, model: str) -> str | None:
    return None if model == "m" else f"model {model!r} is not served"


def test_split_lines_across_chunks_skips_blank_lines():
    chunks = [b'{"a": 1}\n\n  \n{"b"', b': 2}\r\n{"c": 3}']
    assert list(lines.split_lines(chunks)) == [(0, b'{"a": 1}'), (1, b'{"b": 2}'), (2, b'{"c": 3}')]


def test_an_oversized_line_fails_alone_unparsed(monkeypatch):
    monkeypatch.setitem(lines.MAX_LINE_BYTES, OPENAI, 200)
    small = orjson.dumps({"custom_id": "s", "url": "/v1/chat/completions", "body": {"model": "m"}})
    big = orjson.dumps({"custom_id": "b", "url": "/v1/chat/completions", "body": {"model": "m", "x": "y" * 300}})
    parsed = lines.parse_job(job(), [small + b"\n" + big + b"\n"], ok)
    assert [line.custom_id for line in parsed.lines] == ["s"] and not parsed.errors
    (failed,) = parsed.failed
    record = orjson.loads(failed.record)
    assert failed.line_no == 1 and record["custom_id"] is None and "over the 200 a request may have" in (
        record["error"]["message"])


def test_records_embed_the_response_body_as_json():
    line = LineRecord("batch_x", 4, "c", "/v1/chat/completions", b"{}")
    result = lines.line_result(job(), line, 200, b'{"choices": []}')
    record = orjson.loads(result.record)
    assert result.ok and record["response"] == {"status_code": 200, "request_id": record["response"]["request_id"],
                                                "body": {"choices": []}} and record["custom_id"] == "c"
    kjob = job(KSERVE, "/v2/models/iris/infer")
    failed = lines.line_result(kjob, LineRecord("job-x", 4, "r", kjob.endpoint, b"{}"), 400, b'{"error": "bad"}')
    assert not failed.ok and orjson.loads(failed.record) == {"line": 5, "id": "r", "status_code": 400,
                                                             "error": "bad"}
