"""Several servers sharing one PostgreSQL job store (--jobs-db): a batch created on one is run by both, every
line exactly once (row-lock claiming), and its files are readable from either. Needs a real PostgreSQL server
(tests/jobs/postgres.py starts one from Debian's package, or the test skips saying why)."""

from __future__ import annotations

import contextlib
import re

import httpx
import openai

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.jobs.helpers import chat_line, lines_of, upload, wait_batch
from tests.server import LadleServer

ENGINE = ["--dtype", "float32", "--num-kv-blocks", "128", "--max-model-len", "256", "--num-threads", "1",
          "--max-num-seqs", "4", "--served-model-name", "tiny"]
LINES = 48


def lines_run(server: LadleServer) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(r'^ladle_job_lines_total\{outcome="\w+"\} (\S+)$', text, re.M))


def test_two_servers_share_one_batch_and_run_each_line_once(tmp_path, postgres_dsn):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    args = ["--model", checkpoint, *ENGINE, "--jobs-db", postgres_dsn]
    rows = [chat_line(f"shared-{i:03d}", f"item {i}", max_tokens=24, ignore_eos=True) for i in range(LINES)]
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(LadleServer(args))
        b = stack.enter_context(LadleServer(args))
        client_a = openai.OpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0)
        client_b = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
        batch = client_a.batches.create(input_file_id=upload(client_a, rows), endpoint="/v1/chat/completions",
                                        completion_window="24h")
        done = wait_batch(client_b, batch.id, timeout=240)  # the other server sees the same batch
        assert done.status == "completed" and done.request_counts.completed == LINES
        output = client_b.files.content(done.output_file_id).content
        # the file, reassembled from its chunks in the database, holds exactly the results either server reports
        assert output == httpx.get(f"{a.url}/v2/jobs/{batch.id}/results").content
        ran = lines_run(a), lines_run(b)
    ids = [r["custom_id"] for r in lines_of(output)]
    assert ids == [r["custom_id"] for r in rows]  # each line exactly once, in input order
    assert sum(ran) == LINES and min(ran) > 0, ran  # both servers ran lines, none twice
