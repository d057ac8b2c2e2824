"""Gated rollouts: move a model's traffic to a candidate version step by step (a runtime override of its traffic
split), judging each step by the candidate's own request window, and roll back on its own when a gate fails.

Invariants: every state change is saved (serving/rollout_store.py) before it is reported; a rollback puts the
traffic back before anything else, even when the disk fails; one rollout per model runs at a time, and every
transition (begin, a tick's advance or rollback, abort) holds one lock, so an abort never races a step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ladle.errors import Conflict, InvalidInput, NotFound, Unavailable
from ladle.serving import traffic
from ladle.serving.host import ModelHost
from ladle.serving.rollout_plan import Decision, RolloutPlan, decide
from ladle.serving.rollout_store import RolloutRecord, RolloutStore, State, StepResult
from ladle.windows import WindowStats

log = logging.getLogger(__name__)

NO_REQUESTS = WindowStats(0, 0, None)


def tick_s(plan: RolloutPlan) -> float:
    """How often a rollout looks at its window: about once a second, at most every_s/10 but at least 0.2 s."""
    return max(0.2, min(1.0, plan.every_s / 10.0))


class RolloutManager:
    def __init__(self, host: ModelHost, data_dir: Path | str) -> None:
        self.host = host
        self.store = RolloutStore(data_dir)
        self.records: dict[str, RolloutRecord] = {}  # the last rollout of each model, as saved
        self._tasks: dict[str, asyncio.Task] = {}
        self._window_start: dict[str, float] = {}  # time.monotonic() at which each running step's window began
        self._resumed: set[str] = set()
        self._lock = asyncio.Lock()

    # -- start-up and shutdown ----------------------------------------------------------------------
    def restore(self) -> None:
        """Read the saved rollouts and put the splits they reached back in force (before the models load, so the
        first request already follows them)."""
        self.records = self.store.load_all()
        for model, record in self.records.items():
            self.host.set_override(model, record.current)
            log.info("rollout of %s to version %d: %s, split %s", model, record.plan.to, record.state.replace("_", " "),
                     _split_text(record.current) if record.current is not None else "from config.yaml")

    def resume(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start driving the rollouts a previous process left running. Each one's step starts over: the window of
        requests it was judged on died with that process."""
        for model, record in self.records.items():
            if record.running:
                self._resumed.add(model)
                self.records[model] = replace(record, step_started_at=time.time())
                self._start(model, loop)
                log.info("rollout of %s to version %d resumed at step %d/%d (%g%%); the step's window starts over",
                         model, record.plan.to, record.step + 1, len(record.plan.steps), _percent(record))

    async def close(self) -> None:
        """Stop driving (running rollouts stay running on disk: the next start resumes them)."""
        async with self._lock:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the admin API ------------------------------------------------------------------------------
    async def begin(self, plan: RolloutPlan) -> dict[str, Any]:
        async with self._lock:
            model = plan.model
            running = self.records.get(model)
            if running is not None and running.running:
                raise Conflict(f"a rollout of model '{model}' to version {running.plan.to} is already running "
                               f"(step {running.step + 1}/{len(running.plan.steps)}); DELETE it first")
            baseline = self._baseline(plan)
            first = traffic.step_split(baseline, plan.to, plan.steps[0])
            now = time.time()
            record = RolloutRecord(plan, "running", 0, baseline, self.host.overrides.get(model), first, now, now,
                                   reason="step 1 started")
            await self._save(record)
            self.host.set_override(model, first)
            self._resumed.discard(model)
            self._start(model, asyncio.get_running_loop())
            log.info("rollout of %s to version %d began: steps %s every %gs; split %s", model, plan.to,
                     "/".join(f"{s:g}" for s in plan.steps), plan.every_s, _split_text(first))
            return self.status(model)

    def _baseline(self, plan: RolloutPlan) -> traffic.Split:
        """The split traffic follows now, on the READY versions other than the candidate; else the newest of those."""
        record = self.host.models.get(plan.model)
        if record is None or record.config is None:
            raise NotFound(f"unknown model '{plan.model}': it is not loaded (POST /v2/repository/index lists models)")
        ready = self.host.ready_versions(plan.model)
        if not ready:
            raise Unavailable(f"model '{plan.model}' is not ready (state {record.state}); load it first")
        if plan.to not in ready:
            raise InvalidInput(f"version {plan.to} of model '{plan.model}' is not ready; ready versions: "
                               f"{', '.join(map(str, ready))}", param="to")
        split, _ = self.host.split_of(plan.model)
        baseline = tuple((v, w) for v, w in split if v in ready and v != plan.to and w > 0)
        if baseline:
            return baseline
        others = [v for v in ready if v != plan.to]
        if not others:
            raise InvalidInput(f"model '{plan.model}' has no READY version besides {plan.to} to roll out from; "
                               "load the current version too (version_policy)", param="to")
        return ((others[-1], 100.0),)

    async def abort(self, model: str) -> dict[str, Any]:
        """A running rollout: roll it back (state "aborted"). A finished one: forget it — its file and its override
        go, and config.yaml's traffic_split applies again."""
        async with self._lock:
            record = self._record(model)
            if record.running:
                task = self._tasks.pop(model, None)
                if task is not None:
                    task.cancel()  # it is asleep or waiting for the lock: never mid-transition
                    await asyncio.gather(task, return_exceptions=True)
                await self._roll_back(record, "aborted", None, self._stats(record), "aborted by an admin")
                return self.status(model)
            await asyncio.to_thread(self.store.delete, model)
            self.host.set_override(model, None)
            answer = self.status(model)
            del self.records[model]
            log.info("rollout of %s forgotten; the traffic follows config.yaml again", model)
            return {**answer, "forgotten": True}

    def status(self, model: str) -> dict[str, Any]:
        record = self._record(model)
        plan = record.plan
        split, source = self.host.split_of(model)
        return {
            "model": model, "to": plan.to, "state": record.state, "step": record.step + 1, "steps": list(plan.steps),
            "percent": self._share(model, plan.to, split), "split": _percents(split), "split_source": source,
            "gates": {"max_error_rate": plan.max_error_rate, "max_p99_ms": plan.max_p99_ms,
                      "min_requests": plan.min_requests, "every_s": plan.every_s},
            "window": _window(self._stats(record), self._elapsed(record)) if record.running else None,
            "reason": record.reason, "failed_gate": record.failed_gate,
            "history": [_step_json(h) for h in record.history],
            "started_at": _iso(record.started_at), "step_started_at": _iso(record.step_started_at),
            "resumed": model in self._resumed,
        }

    def _record(self, model: str) -> RolloutRecord:
        record = self.records.get(model)
        if record is None:
            raise NotFound(f"model '{model}' has no rollout; start one with POST /v2/models/{model}/rollout")
        return record

    def _share(self, model: str, to: int, split: traffic.Split) -> float:
        if split:
            return round(dict(traffic.normalized(split)).get(to, 0.0), 4)
        ready = self.host.ready_versions(model)  # no split: the newest READY version takes everything
        return 100.0 if ready and ready[-1] == to else 0.0

    # -- driving one rollout --------------------------------------------------------------------------
    def _start(self, model: str, loop: asyncio.AbstractEventLoop) -> None:
        self._window_start[model] = time.monotonic()
        self._tasks[model] = loop.create_task(self._drive(model), name=f"rollout:{model}")

    async def _drive(self, model: str) -> None:
        try:
            while True:
                await asyncio.sleep(tick_s(self.records[model].plan))
                async with self._lock:
                    record = self.records[model]
                    if not record.running:
                        return
                    await self._tick(record)
                    if not self.records[model].running:
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a disk that cannot take the record, say: never leave traffic on a half-step
            log.exception("rollout of %s failed; rolling back", model)
            async with self._lock:
                await self._give_up(model, exc)
        finally:
            if self._tasks.get(model) is asyncio.current_task():
                del self._tasks[model]

    async def _give_up(self, model: str, exc: Exception) -> None:
        """Roll back after the rollout itself failed; when even that cannot be saved, the traffic and the status
        still roll back (in memory: the next start reads the last record that was saved)."""
        record = self.records[model]
        if not record.running:
            return
        reason = f"the rollout itself failed ({type(exc).__name__}: {exc})"
        try:
            await self._roll_back(record, "rolled_back", None, self._stats(record), reason)
        except Exception as again:
            log.error("rollout of %s: the rollback could not be saved: %s", model, again)
            restored = self._restored(record)[0]
            self.host.set_override(model, restored)
            self.records[model] = replace(record, state="rolled_back", current=restored,
                                          reason=f"{reason}; not saved: {again}")

    async def _tick(self, record: RolloutRecord) -> None:
        plan = record.plan
        stats = self._stats(record)
        if self.host.version(plan.model, plan.to) is None:
            decision = Decision("rollback", f"candidate version {plan.to} is not ready", "candidate_ready")
        else:
            decision = decide(plan, stats, self._elapsed(record))
        if decision.kind == "rollback":
            where = f" at step {record.step + 1}/{len(plan.steps)} ({_percent(record):g}%)"
            await self._roll_back(record, "rolled_back", decision.gate, stats, decision.reason + where)
        elif decision.kind == "advance":
            await self._advance(record, stats, decision.reason)
        elif decision.reason != record.reason:
            self.records[plan.model] = replace(record, reason=decision.reason)  # progress: memory only

    async def _advance(self, record: RolloutRecord, stats: WindowStats, reason: str) -> None:
        plan = record.plan
        history = (*record.history, _result(record, stats, "passed"))
        done = f"step {record.step + 1}/{len(plan.steps)} ({_percent(record):g}%) {reason}"
        if record.step + 1 == len(plan.steps):
            final = f"succeeded: version {plan.to} takes {_percent(record):g}% of the traffic; last {done}"
            await self._save(replace(record, state="succeeded", reason=final, history=history))
            log.info("rollout of %s to version %d %s", plan.model, plan.to, final)
            return
        step = record.step + 1
        split = traffic.step_split(record.baseline, plan.to, plan.steps[step])
        await self._save(replace(record, step=step, current=split, step_started_at=time.time(), history=history,
                                 reason=f"{done}; step {step + 1} started"))
        self.host.set_override(plan.model, split)
        self._window_start[plan.model] = time.monotonic()
        log.info("rollout of %s to version %d: %s; now step %d/%d, split %s", plan.model, plan.to, done, step + 1,
                 len(plan.steps), _split_text(split))

    async def _roll_back(self, record: RolloutRecord, state: State, gate: str | None, stats: WindowStats,
                         reason: str) -> None:
        model = record.plan.model
        restored, note = self._restored(record)
        reason += note
        self.host.set_override(model, restored)  # traffic first: it must not wait on the disk
        result = "aborted" if state == "aborted" else "failed"
        history = (*record.history, _result(record, stats, result))
        await self._save(replace(record, state=state, current=restored, reason=reason, failed_gate=gate,
                                 history=history))
        level = logging.INFO if state == "aborted" else logging.WARNING
        log.log(level, "rollout of %s to version %d %s: %s", model, record.plan.to, state.replace("_", " "), reason)

    def _restored(self, record: RolloutRecord) -> tuple[traffic.Split | None, str]:
        """The override a rollback leaves in force, and a note for the reason when it is not the previous one."""
        model = record.plan.model
        config = self.host.models.get(model)
        if record.previous is None and (config is None or config.config is None or not config.config.traffic_split):
            # no split before: the newest version (maybe the candidate) would take everything; pin the baseline
            return record.baseline, (f"; the baseline split {_split_text(record.baseline)} stays pinned "
                                     "(DELETE the rollout to unpin it)")
        return record.previous, ""

    async def _save(self, record: RolloutRecord) -> None:
        await asyncio.to_thread(self.store.save, record)
        self.records[record.plan.model] = record

    def _stats(self, record: RolloutRecord) -> WindowStats:
        mv = self.host.version(record.plan.model, record.plan.to)
        start = self._window_start.get(record.plan.model)
        return NO_REQUESTS if mv is None or start is None else mv.metrics.window.since(start)

    def _elapsed(self, record: RolloutRecord) -> float:
        return time.monotonic() - self._window_start.get(record.plan.model, time.monotonic())


# -- how a rollout reads in a status -------------------------------------------------------------------
def _percent(record: RolloutRecord) -> float:
    return record.plan.steps[record.step]


def _result(record: RolloutRecord, stats: WindowStats, result: str) -> StepResult:
    p99 = None if stats.p99_s is None else round(stats.p99_s * 1000.0, 3)
    return StepResult(record.step + 1, _percent(record), stats.requests, stats.errors, round(stats.error_rate, 6),
                      p99, result)


def _window(stats: WindowStats, elapsed_s: float) -> dict[str, Any]:
    p99 = None if stats.p99_s is None else round(stats.p99_s * 1000.0, 3)
    return {"requests": stats.requests, "errors": stats.errors, "error_rate": round(stats.error_rate, 6),
            "p99_ms": p99, "elapsed_s": round(elapsed_s, 1), "truncated": stats.truncated}


def _step_json(step: StepResult) -> dict[str, Any]:
    return {"step": step.step, "percent": step.percent, "requests": step.requests, "errors": step.errors,
            "error_rate": step.error_rate, "p99_ms": step.p99_ms, "result": step.result}


def _percents(split: traffic.Split) -> dict[str, float]:
    return {str(version): round(weight, 4) for version, weight in traffic.normalized(split)}


def _split_text(split: traffic.Split) -> str:
    return ", ".join(f"v{version} {weight:g}%" for version, weight in _percents(split).items()) or "none"


def _iso(wall_s: float) -> str:
    return datetime.fromtimestamp(wall_s, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")

