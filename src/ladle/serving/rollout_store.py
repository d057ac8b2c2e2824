"""The persisted record of each model's rollout: one JSON file per model, `<data_dir>/rollouts/<model>.json`, so a
restarted server puts the traffic split back and resumes a running rollout where it was.

Invariants: a file is replaced atomically (temporary file, fsync, os.replace, fsync of the directory), so a crash
leaves the old record or the new one, never half of one; a file that cannot be read is logged and skipped, never
fatal; nothing is created on disk until a rollout is first saved.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ladle.repository.layout import is_model_name
from ladle.serving.rollout_plan import RolloutPlan
from ladle.serving.traffic import Split

log = logging.getLogger(__name__)

State = Literal["running", "succeeded", "rolled_back", "aborted"]
STATES = ("running", "succeeded", "rolled_back", "aborted")
FORMAT = 1  # bumped when a field changes meaning; a file of another format is skipped with a message


@dataclass(frozen=True)
class StepResult:
    """How one finished step went: its window's figures and the verdict ("passed", "failed" or "aborted")."""

    step: int  # 1-based, as the status shows it
    percent: float
    requests: int
    errors: int
    error_rate: float
    p99_ms: float | None
    result: str


@dataclass(frozen=True)
class RolloutRecord:
    """One model's rollout. `baseline`: the split traffic followed when it began (READY versions but the candidate);
    `previous`: the runtime override in force before it (None: config.yaml's split applied), restored on rollback;
    `current`: the override the rollout leaves in force now (None: none). Times are wall-clock seconds, for display."""

    plan: RolloutPlan
    state: State
    step: int  # index into plan.steps
    baseline: Split
    previous: Split | None
    current: Split | None
    started_at: float
    step_started_at: float
    reason: str = ""
    failed_gate: str | None = None
    history: tuple[StepResult, ...] = ()

    @property
    def running(self) -> bool:
        return self.state == "running"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "plan": self.plan.as_dict(), "state": self.state, "step": self.step,
                "baseline": _pairs(self.baseline), "previous": _pairs(self.previous),
                "current": _pairs(self.current), "started_at": self.started_at,
                "step_started_at": self.step_started_at, "reason": self.reason, "failed_gate": self.failed_gate,
                "history": [asdict(h) for h in self.history]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutRecord:
        """KeyError/TypeError/ValueError when `data` is not a record this version wrote."""
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r} (this ladle writes {FORMAT})")
        plan = RolloutPlan.from_dict(data["plan"])
        state, step = data["state"], data["step"]
        if state not in STATES or not isinstance(step, int) or not 0 <= step < len(plan.steps):
            raise ValueError(f"state {state!r} / step {step!r} out of range")
        baseline = _split(data["baseline"])
        if baseline is None:
            raise ValueError("no baseline split")
        return cls(plan, state, step, baseline, _split(data["previous"]), _split(data["current"]),
                   float(data["started_at"]), float(data["step_started_at"]), str(data.get("reason", "")),
                   data.get("failed_gate"), tuple(StepResult(**h) for h in data.get("history", ())))


def _pairs(split: Split | None) -> list[list[float]] | None:
    return None if split is None else [[version, weight] for version, weight in split]


def _split(raw: Any) -> Split | None:
    if raw is None:
        return None
    split = tuple((int(version), float(weight)) for version, weight in raw)
    if any(version < 1 or weight < 0 for version, weight in split):
        raise ValueError(f"bad split {raw!r}")
    return split


class RolloutStore:
    """Rollout records under `<data_dir>/rollouts/`. Blocking file I/O: the manager calls it off the event loop
    (start-up reads are the exception: nothing is served yet)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.dir = Path(data_dir) / "rollouts"

    def path(self, model: str) -> Path:
        # model names cannot hold a path separator or '..' (repository/layout.py); checked again, as this is a path
        if not is_model_name(model):
            raise ValueError(f"invalid model name {model!r}")
        return self.dir / f"{model}.json"

    def save(self, record: RolloutRecord) -> None:
        target = self.path(record.plan.model)
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(record.to_json(), indent=1).encode()
        # a unique temporary name in the same directory: os.replace is atomic only within one file system
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{target.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.dir)  # the rename itself survives a power cut only once the directory is on disk

    def delete(self, model: str) -> None:
        self.path(model).unlink(missing_ok=True)

    def load_all(self) -> dict[str, RolloutRecord]:
        """Every readable record by model; unreadable ones are logged and skipped."""
        if not self.dir.is_dir():
            return {}
        records = {}
        for path in sorted(self.dir.glob("*.json")):
            if path.name.startswith("."):
                continue  # a temporary file a crash left behind
            try:
                record = RolloutRecord.from_json(json.loads(path.read_bytes()))
                if record.plan.model != path.stem:
                    raise ValueError(f"it is the record of model {record.plan.model!r}")
            except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
                log.error("rollout record %s cannot be read, skipped (fix or delete it): %s: %s", path,
                          type(exc).__name__, exc)
                continue
            records[record.plan.model] = record
        return records


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
