"""Process-wide state: a model's torch thread count stays on the threads that run it.

torch keeps a per-thread count plus a process value that each thread copies at its first parallel op; a bare
`torch.set_num_threads` on one model's thread used to become the count of every thread that had not run yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.repos import ROOT, write_model
from tests.server import LadleServer

torch = pytest.importorskip("torch")

POLICY_SCRIPT = """
import threading, torch
from ladle.process import pin_torch_threads
seen, a_pinned, b_pinned, go = {}, threading.Event(), threading.Event(), threading.Event()
def model(name, count, after, done):
    if after is not None:
        after.wait()
    pin_torch_threads(count, name)  # no parallel op on this thread yet: the case that used to leak
    done.set()
    go.wait()
    seen[name] = torch.get_num_threads()
a = threading.Thread(target=model, args=("a", 1, None, a_pinned))
b = threading.Thread(target=model, args=("b", 3, a_pinned, b_pinned))
a.start(); b.start(); b_pinned.wait(); go.set()
fresh = threading.Thread(target=lambda: seen.__setitem__("fresh", torch.get_num_threads())); fresh.start()
for t in (a, b, fresh): t.join()
seen["main"] = torch.get_num_threads()
print(seen["a"], seen["b"], seen["fresh"], seen["main"])
"""

THREADS_MODEL = """
import numpy as np
import torch


class Threads:
    def load(self):
        pass

    def predict(self, batch):
        return {"threads": np.full((batch["x"].shape[0], 1), torch.get_num_threads(), dtype=np.int32)}
"""


def default_threads() -> int:
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_pinned_counts_stay_on_their_threads() -> None:
    done = subprocess.run([sys.executable, "-c", POLICY_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    a, b, fresh, main = map(int, done.stdout.split())
    default = default_threads()
    assert (a, b) == (1, 3)
    assert fresh == main == default


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _torch_model(repo: Path, name: str, threads: int) -> None:
    model_dir = write_model(repo, name, {
        "backend": "torchscript", "max_batch_size": 8, "inline_max_us": 0,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
        "parameters": {"num_threads": threads},
    })
    torch.jit.script(Doubler()).save(str(model_dir / "1" / "model.pt"))


def test_two_models_with_different_thread_counts_leave_the_others_alone(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _torch_model(repo, "a_one", 1)
    _torch_model(repo, "b_three", 3)
    write_model(repo, "z_threads", {
        "backend": "python", "max_batch_size": 8, "inline_max_us": 0,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
        "outputs": [{"name": "threads", "datatype": "INT32", "shape": [1]}],
    }, {1: {"model.py": THREADS_MODEL}})
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    with LadleServer([repo]) as server:
        for name in ("a_one", "b_three"):
            answer = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body)
            assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [2.0], answer.text
        answer = httpx.post(f"{server.url}/v2/models/z_threads/infer", json=body)
        assert answer.status_code == 200, answer.text
        # the python model's thread never asked: it runs with the process default, not the last model's count
        assert answer.json()["outputs"][0]["data"] == [default_threads()]
        log = server.log()
    assert "model a_one: 1 torch thread(s) on its own thread" in log
    assert "model b_three: 3 torch thread(s) on its own thread" in log
    if (os.cpu_count() or 1) < 3:
        assert "model b_three asks for 3 torch threads on" in log


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.skipif(_thp_mode() == "never", reason="no transparent huge pages on this host")
def test_the_kv_cache_memory_is_eligible_for_huge_pages() -> None:
    """What the runner does with its KV cache: advised before the zeroing touches it, its mapping is THP-eligible.
    (Whether the kernel then finds free 2 MiB pages depends on the host's memory fragmentation, so that is not asserted;
    a mapping that was not advised is not eligible under THP's default `madvise` mode.)"""
    from ladle.process import advise_huge_pages

    cache = torch.empty(16 << 20, dtype=torch.uint8)  # fresh, untouched memory (beyond malloc's mmap threshold)
    assert advise_huge_pages(cache.data_ptr(), cache.nbytes)
    cache.zero_()
    start, end = cache.data_ptr(), cache.data_ptr() + cache.nbytes
    eligible, region = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            region = low < end and start < high
        elif region and line.startswith("THPeligible:"):
            eligible.append(int(line.split()[1]))
    assert eligible and 1 in eligible


def test_nothing_is_advised_for_a_range_without_a_whole_huge_page() -> None:
    from ladle.process import HUGE_PAGE, advise_huge_pages

    assert not advise_huge_pages(HUGE_PAGE + 4096, HUGE_PAGE)  # ends before the next 2 MiB boundary's page is whole
