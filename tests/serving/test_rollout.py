"""The rollout manager (serving/rollout.py) over a real ModelHost holding stand-in versions whose request windows the
tests fill directly: the checks of begin, advancing, every way back (gates, an unready candidate, abort, a disk
that fails), what a rollback restores, and restore/resume from the saved records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ladle.errors import Conflict, InvalidInput, NotFound, Unavailable
from ladle.metrics import Metrics
from ladle.repository.model_config import ModelConfig
from ladle.serving import rollout
from ladle.serving.host import ModelHost
from ladle.serving.rollout import RolloutManager, tick_s
from ladle.serving.rollout_plan import RolloutPlan
from ladle.serving.versions import ModelRecord, ModelVersion, VersionStatus


@pytest.fixture(autouse=True)
def fast_ticks(monkeypatch):
    monkeypatch.setattr(rollout, "tick_s", lambda plan: 0.01)


def make_host(versions=(1, 2), split: dict | None = None) -> ModelHost:
    host = ModelHost(None, Metrics())
    config = ModelConfig(name="m", backend="python", traffic_split=split or {})
    ready = {v: ModelVersion("m", v, config, (), (), None, host.metrics.for_version("m", v), 0.0) for v in versions}
    host.models["m"] = ModelRecord("m", config, ready, {v: VersionStatus("READY") for v in versions}, "READY")
    return host


def plan(**changes) -> RolloutPlan:
    fields = {"model": "m", "to": 2, "steps": (50, 100), "every_s": 1.0, "max_error_rate": 0.1, "max_p99_ms": 100.0,
              "min_requests": 5}
    return RolloutPlan(**{**fields, **changes})


def feed(host: ModelHost, version: int, n: int, failed: bool = False, latency_s: float = 0.005) -> None:
    for _ in range(n):
        host.models["m"].ready[version].metrics.window.record(latency_s, failed)


async def until(manager: RolloutManager, predicate, timeout: float = 5.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = manager.status("m")
        if predicate(status):
            return status
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.01)


def saved(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "rollouts" / "m.json").read_text())


def test_tick_is_about_a_second_within_bounds() -> None:
    assert (tick_s(plan(every_s=300)), tick_s(plan(every_s=5)), tick_s(plan(every_s=1))) == (1.0, 0.5, 0.2)


def test_a_healthy_candidate_goes_all_the_way(tmp_path) -> None:
    async def scenario() -> None:
        host = make_host(split={1: 100})
        manager = RolloutManager(host, tmp_path)
        status = await manager.begin(plan())
        assert (status["state"], status["step"], status["percent"], status["split"]) == \
            ("running", 1, 50.0, {"1": 50.0, "2": 50.0})
        assert status["split_source"] == "rollout" and saved(tmp_path)["state"] == "running"
        status = await until(manager, lambda s: s["window"] is not None and s["window"]["elapsed_s"] > 0)
        assert "waiting for requests: 0 of 5" in status["reason"]
        feed(host, 2, 5)
        await until(manager, lambda s: s["step"] == 2)
        assert host.overrides["m"] == ((2, 100.0),) and saved(tmp_path)["step"] == 1
        feed(host, 2, 5)
        status = await until(manager, lambda s: s["state"] == "succeeded")
        assert [h["result"] for h in status["history"]] == ["passed", "passed"]
        assert status["history"][0]["requests"] == 5 and status["history"][1]["requests"] == 5  # a window per step
        assert status["percent"] == 100.0 and host.split_of("m") == (((2, 100.0),), "rollout")
        assert saved(tmp_path)["state"] == "succeeded" and status["window"] is None
        await manager.close()

    asyncio.run(scenario())


def test_a_failing_candidate_rolls_back_to_the_config_split(tmp_path) -> None:
    async def scenario() -> None:
        host = make_host(split={1: 100})
        manager = RolloutManager(host, tmp_path)
        await manager.begin(plan(every_s=600))
        feed(host, 2, 4)
        feed(host, 2, 2, failed=True)  # 2/6 = 0.333 > 0.1, mid-step
        status = await until(manager, lambda s: s["state"] != "running")
        assert status["state"] == "rolled_back" and status["failed_gate"] == "max_error_rate"
        assert status["reason"] == "error rate 0.333 > max 0.100 over 6 requests at step 1/2 (50%)"
        assert status["history"] == [{"step": 1, "percent": 50.0, "requests": 6, "errors": 2,
                                      "error_rate": 0.333333, "p99_ms": 5.0, "result": "failed"}]
        assert "m" not in host.overrides and status["split"] == {"1": 100.0} and status["split_source"] == "config"
        assert saved(tmp_path)["current"] is None
        await manager.close()

    asyncio.run(scenario())


def test_a_slow_candidate_rolls_back_to_the_previous_override(tmp_path) -> None:
    async def scenario() -> None:
        host = make_host(versions=(1, 2, 3))
        host.set_override("m", ((1, 3.0), (3, 1.0)))  # an earlier rollout's split
        manager = RolloutManager(host, tmp_path)
        status = await manager.begin(plan(every_s=600))
        assert status["split"] == {"1": 37.5, "2": 50.0, "3": 12.5}  # the rest keeps its proportions
        feed(host, 2, 5, latency_s=0.25)
        status = await until(manager, lambda s: s["state"] != "running")
        assert status["failed_gate"] == "max_p99_ms" and status["reason"].startswith("p99 250 ms > max 100 ms")
        assert host.overrides["m"] == ((1, 3.0), (3, 1.0))
        await manager.close()

    asyncio.run(scenario())


def test_a_rollback_with_no_split_before_pins_the_baseline(tmp_path) -> None:
    """No split: the newest version (the candidate) would take all the traffic back; the baseline stays pinned."""
    async def scenario() -> None:
        host = make_host()
        manager = RolloutManager(host, tmp_path)
        status = await manager.begin(plan(every_s=600))
        assert status["split"] == {"1": 50.0, "2": 50.0}
        feed(host, 2, 5, failed=True)
        status = await until(manager, lambda s: s["state"] != "running")
        assert host.overrides["m"] == ((1, 100.0),) and status["split_source"] == "rollout"
        assert "stays pinned" in status["reason"] and status["percent"] == 0.0
        forgotten = await manager.abort("m")  # forgetting unpins: the newest version takes everything again
        assert forgotten["forgotten"] is True and "m" not in host.overrides
        assert not (tmp_path / "rollouts" / "m.json").exists()
        with pytest.raises(NotFound, match="has no rollout"):
            manager.status("m")
        await manager.close()

    asyncio.run(scenario())


def test_an_unready_candidate_rolls_back(tmp_path) -> None:
    async def scenario() -> None:
        host = make_host(split={1: 1})
        manager = RolloutManager(host, tmp_path)
        await manager.begin(plan(every_s=600))
        del host.models["m"].ready[2]  # an unload or a failed reload
        status = await until(manager, lambda s: s["state"] != "running")
        assert status["reason"] == "candidate version 2 is not ready at step 1/2 (50%)"
        assert status["failed_gate"] == "candidate_ready" and "m" not in host.overrides
        await manager.close()

    asyncio.run(scenario())


def test_abort_a_running_rollout(tmp_path) -> None:
    async def scenario() -> None:
        host = make_host(split={1: 100})
        manager = RolloutManager(host, tmp_path)
        await manager.begin(plan(every_s=600))
        feed(host, 2, 3)
        status = await manager.abort("m")
        assert status["state"] == "aborted" and status["reason"] == "aborted by an admin"
        assert status["history"][0]["result"] == "aborted" and status["history"][0]["requests"] == 3
        assert "m" not in host.overrides and saved(tmp_path)["state"] == "aborted"
        assert manager._tasks == {}
        again = await manager.begin(plan(every_s=600))  # a finished rollout does not block a new one
        assert again["state"] == "running" and again["history"] == []
        await manager.close()

    asyncio.run(scenario())


def test_begin_refuses(tmp_path) -> None:
    async def scenario() -> None:
        host = make_host(versions=(1, 2, 3), split={1: 100})
        manager = RolloutManager(host, tmp_path)
        with pytest.raises(NotFound, match="unknown model 'nope'"):
            await manager.begin(plan(model="nope"))
        with pytest.raises(InvalidInput, match="version 7 of model 'm' is not ready; ready versions: 1, 2, 3"):
            await manager.begin(plan(to=7))
        await manager.begin(plan(every_s=600))
        with pytest.raises(Conflict, match="already running"):
            await manager.begin(plan(to=3))
        await manager.close()
        host.models["m"].ready = {}
        host.models["m"].state = "UNAVAILABLE"
        manager = RolloutManager(make_host(versions=(2,)), tmp_path / "b")
        with pytest.raises(InvalidInput, match="no READY version besides 2"):
            await manager.begin(plan())
        with pytest.raises(Unavailable, match="not ready"):
            await RolloutManager(host, tmp_path / "c").begin(plan())
        assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()

    asyncio.run(scenario())


def test_the_baseline_is_the_split_on_ready_versions_or_the_newest_other(tmp_path) -> None:
    async def scenario() -> None:
        host = make_host(versions=(1, 2, 3), split={1: 1, 2: 1, 4: 2})  # 4 is not loaded; 2 is the candidate
        status = await RolloutManager(host, tmp_path / "a").begin(plan(steps=(10, 100), every_s=600))
        assert status["split"] == {"1": 90.0, "2": 10.0}
        host = make_host(versions=(1, 2, 3))
        status = await RolloutManager(host, tmp_path / "b").begin(plan(steps=(10, 100), every_s=600))
        assert status["split"] == {"2": 10.0, "3": 90.0}  # no split: the newest other version

    asyncio.run(scenario())


def test_restore_and_resume_after_a_restart(tmp_path) -> None:
    async def first() -> None:
        host = make_host(split={1: 100})
        manager = RolloutManager(host, tmp_path)
        await manager.begin(plan(steps=(25, 50, 100), every_s=1))
        feed(host, 2, 5)
        await until(manager, lambda s: s["step"] == 2)
        await manager.close()  # a shutdown: still running on disk

    async def second() -> None:
        host = make_host(split={1: 100})
        manager = RolloutManager(host, tmp_path)
        manager.restore()
        assert host.overrides["m"] == ((1, 50.0), (2, 50.0))  # before any model loads
        manager.resume(asyncio.get_running_loop())
        status = manager.status("m")
        assert (status["state"], status["step"], status["resumed"]) == ("running", 2, True)
        assert status["window"]["requests"] == 0 and status["history"][0]["result"] == "passed"
        feed(host, 2, 5)
        await until(manager, lambda s: s["step"] == 3)
        feed(host, 2, 5)
        status = await until(manager, lambda s: s["state"] == "succeeded")
        assert len(status["history"]) == 3
        await manager.close()

    asyncio.run(first())
    asyncio.run(second())
    host = make_host(split={1: 100})
    manager = RolloutManager(host, tmp_path)
    manager.restore()  # finished: its split stays in force, nothing to drive
    assert host.overrides["m"] == ((2, 100.0),) and manager.status("m")["resumed"] is False


def test_a_disk_that_fails_mid_rollout_still_rolls_the_traffic_back(tmp_path, monkeypatch) -> None:
    async def scenario() -> None:
        host = make_host(split={1: 100})
        manager = RolloutManager(host, tmp_path)
        await manager.begin(plan())

        def full(record) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(manager.store, "save", full)
        feed(host, 2, 5)
        status = await until(manager, lambda s: s["state"] != "running")
        assert status["state"] == "rolled_back" and "No space left" in status["reason"]
        assert "not saved" in status["reason"] and "m" not in host.overrides
        await manager.close()

    asyncio.run(scenario())
