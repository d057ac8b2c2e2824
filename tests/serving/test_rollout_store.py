"""Rollout records on disk (serving/rollout_store.py): atomic round trips, unreadable files skipped with a log line,
and nothing created until a record is saved."""

from __future__ import annotations

import json
import logging
import os

import pytest

from ladle.serving.rollout_plan import RolloutPlan
from ladle.serving.rollout_store import RolloutRecord, RolloutStore, StepResult


def record(model: str = "m", **changes) -> RolloutRecord:
    plan = RolloutPlan(model, 2, (50, 100), 5.0, 0.01, None, 20)
    fields = {"plan": plan, "state": "running", "step": 1, "baseline": ((1, 100.0),), "previous": None,
              "current": ((1, 50.0), (2, 50.0)), "started_at": 1700000000.5, "step_started_at": 1700000010.25,
              "reason": "step 2 started",
              "history": (StepResult(1, 50.0, 120, 1, 1 / 120, 12.5, "passed"),)}
    return RolloutRecord(**{**fields, **changes})


def test_round_trip(tmp_path) -> None:
    store = RolloutStore(tmp_path)
    saved = record()
    other = record("other.v1", state="rolled_back", step=0, previous=((1, 3.0), (3, 1.0)), current=((1, 3.0), (3, 1.0)),
                   failed_gate="max_error_rate", history=())
    store.save(saved)
    store.save(other)
    assert (tmp_path / "rollouts" / "m.json").is_file()
    assert store.load_all() == {"m": saved, "other.v1": other}
    assert json.loads((tmp_path / "rollouts" / "m.json").read_text())["plan"]["steps"] == [50.0, 100.0]


def test_a_save_replaces_the_file_atomically_and_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    store = RolloutStore(tmp_path)
    store.save(record())
    replaced, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store.save(record(state="succeeded"))
    assert len(replaced) == 1 and str(replaced[0][1]).endswith("m.json")
    assert len(synced) == 2  # the file, then the directory
    assert [p.name for p in (tmp_path / "rollouts").iterdir()] == ["m.json"]
    assert store.load_all()["m"].state == "succeeded"


def test_a_failed_write_keeps_the_old_record(tmp_path, monkeypatch) -> None:
    store = RolloutStore(tmp_path)
    store.save(record())

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="No space"):
        store.save(record(state="succeeded"))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "rollouts").iterdir()] == ["m.json"]  # the temporary file went too
    assert store.load_all()["m"].state == "running"


@pytest.mark.parametrize("content", [
    b"{not json", b"[]", b"{}", b'{"format": 99}',
    json.dumps({**record().to_json(), "state": "dancing"}).encode(),
    json.dumps({**record().to_json(), "step": 7}).encode(),
    json.dumps({**record().to_json(), "baseline": None}).encode(),
    json.dumps({**record().to_json(), "current": [[0, 100]]}).encode(),
    json.dumps({**record().to_json(), "plan": {**record().plan.as_dict(), "steps": [50, 10]}}).encode(),
    json.dumps({**record().to_json(), "plan": {**record().plan.as_dict(), "model": "other"}}).encode(),
    b"\xff\xfe",
])
def test_an_unreadable_file_is_logged_and_skipped(tmp_path, caplog, content) -> None:
    store = RolloutStore(tmp_path)
    store.save(record("good"))
    (tmp_path / "rollouts" / "m.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="ladle.serving.rollout_store"):
        assert list(store.load_all()) == ["good"]
    assert "rollouts/m.json cannot be read, skipped" in caplog.text


def test_leftover_temporary_files_and_other_names_are_ignored(tmp_path) -> None:
    store = RolloutStore(tmp_path)
    store.save(record())
    (tmp_path / "rollouts" / ".m.abc.tmp").write_text("{half")
    (tmp_path / "rollouts" / "notes.txt").write_text("hi")
    assert list(store.load_all()) == ["m"]


def test_nothing_is_created_until_a_record_is_saved(tmp_path) -> None:
    store = RolloutStore(tmp_path / "data")
    assert store.load_all() == {}
    store.delete("m")
    assert not (tmp_path / "data").exists()


def test_delete(tmp_path) -> None:
    store = RolloutStore(tmp_path)
    store.save(record())
    store.delete("m")
    store.delete("m")  # twice: nothing to do
    assert store.load_all() == {}


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden"])
def test_a_name_that_is_no_model_name_never_becomes_a_path(tmp_path, name) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        RolloutStore(tmp_path).path(name)
