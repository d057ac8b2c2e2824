"""Shared by the batch-path tests: a tiny LLM server, JSONL building, and waiting for a job to settle."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai

FINAL = ("completed", "failed", "cancelled", "expired")


def jsonl(rows: list[object]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def chat_line(custom_id: str, content: str, model: str = "tiny", **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                     "temperature": 0, **body}}


def upload(client: openai.OpenAI, rows: list[object], name: str = "batch.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(jsonl(rows))), purpose="batch").id


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 120.0, until: tuple[str, ...] = FINAL):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout}s")


def wait_job(url: str, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v2/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")


def lines_of(content: bytes) -> list[dict]:
    return [json.loads(line) for line in content.splitlines() if line.strip()]
