"""Large KServe bodies are decoded off the event loop: health and other requests keep answering meanwhile."""

from __future__ import annotations

import threading
import time

import httpx
import orjson


def test_a_large_body_does_not_stall_the_event_loop(demo_server) -> None:
    rows = 1_000_000  # ~25 MB of JSON; decoding it takes far longer than a health check may
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [rows, 4], "datatype": "FP32",
                                     "data": [5.1, 3.5, 1.4, 0.2] * rows}]})
    answer: list[httpx.Response] = []

    def send() -> None:
        answer.append(httpx.post(f"{demo_server.url}/v2/models/iris/versions/2/infer", content=body, timeout=120))

    sender = threading.Thread(target=send)
    with httpx.Client(base_url=demo_server.url, timeout=10) as probe:
        probe.get("/v2/health/live")  # the connection is open before the load arrives
        sender.start()
        latencies = []
        while sender.is_alive():
            started = time.perf_counter()
            assert probe.get("/v2/health/live").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        sender.join()
    assert answer[0].status_code == 400  # more rows than max_batch_size: refused after decoding
    assert "64" in answer[0].json()["error"]
    assert len(latencies) >= 5, "the large request finished too fast to observe the loop"
    assert max(latencies) < 0.25, f"health stalled {max(latencies) * 1e3:.0f} ms while a large body decoded"
