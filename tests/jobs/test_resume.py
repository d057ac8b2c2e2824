"""Durability: SIGKILL a server in the middle of a batch, start it again on the same --data-dir, and the batch
resumes — every line answered exactly once (a checksum over custom_ids), and results stored before the kill kept
byte for byte (not run again)."""

from __future__ import annotations

import hashlib
import signal
import time

import httpx
import openai

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.jobs.helpers import chat_line, lines_of, upload, wait_batch
from tests.server import LadleServer

ENGINE = ["--dtype", "float32", "--num-kv-blocks", "128", "--max-model-len", "256", "--num-threads", "1",
          "--max-num-seqs", "4", "--served-model-name", "tiny"]
LINES = 40


def checksum(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def test_sigkill_mid_batch_then_restart_resumes_without_loss_or_duplicates(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    args = ["--model", checkpoint, *ENGINE, "--data-dir", tmp_path / "data"]
    rows = [chat_line(f"line-{i:03d}", f"tell me about {i}", max_tokens=60, ignore_eos=True) for i in range(LINES)]
    first = LadleServer(args)
    with first:
        client = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0)
        batch = client.batches.create(input_file_id=upload(client, rows), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 120
        while client.batches.retrieve(batch.id).request_counts.completed < 8:
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.05)
        before = httpx.get(f"{first.url}/v2/jobs/{batch.id}/results").content
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    kept = lines_of(before)
    assert 8 <= len(kept) < LINES, "kill the server while the batch runs"
    with LadleServer(args) as second:
        client = openai.OpenAI(base_url=second.url + "/v1", api_key="x", max_retries=0)
        done = wait_batch(client, batch.id, timeout=300)
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (LINES,
                                                                                                          LINES, 0)
        output = client.files.content(done.output_file_id).content
    records = lines_of(output)
    ids = [r["custom_id"] for r in records]
    assert checksum(ids) == checksum([r["custom_id"] for r in rows]) and len(ids) == LINES  # each once, none lost
    assert ids == sorted(ids)  # in input order
    for line in before.splitlines():  # results stored before the kill are the ones in the output (not re-run)
        assert line in output
