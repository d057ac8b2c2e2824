"""The compiled decoder's graphs as files (precompiled.py): saved by the first compile and read back by the next
start; a key names everything they depend on; a file that is corrupt, or that belongs to another model, is compiled
again rather than run; a step the graphs were not built for runs eagerly."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from ladle.llm import precompiled
from ladle.llm.kernels.build import cache_dir
from ladle.llm.outputs import ScheduledSeq, SchedulerOutput
from ladle.llm.precompiled import artifact_dir, artifact_key
from ladle.llm.runner import ModelRunner
from tests.fixtures.checkpoints import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return (save_tiny_checkpoint(root / "two-layers", "llama", num_hidden_layers=2),
            save_tiny_checkpoint(root / "three-layers", "llama", num_hidden_layers=3))


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty graph cache, and no graphs in this process (earlier tests' stay in memory otherwise)."""
    if cache_dir().exists():  # the kernels this host already built (~15 s to build again)
        shutil.copytree(cache_dir(), tmp_path / "kernels")
    monkeypatch.setenv("LADLE_CACHE", str(tmp_path))
    precompiled.forget()
    yield tmp_path
    precompiled.forget()


def runner_for(checkpoint) -> ModelRunner:
    return ModelRunner(checkpoint, dtype=torch.float32, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                       compile=True)


def steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Logits of a prefill and two decodes of one sequence (through the compiled graphs when installed)."""
    tokens, out = list(range(5, 22)), []
    step = ScheduledSeq("a", tokens, 0, [0, 1], True)
    for _ in range(3):
        logits = runner.execute(SchedulerOutput([step], len(step.token_ids)))
        out.append(logits)
        tokens.append(int(logits[-1].argmax()))
        step = ScheduledSeq("a", tokens[-1:], len(tokens) - 1, [0, 1], True)
    return out


def eager_steps(runner: ModelRunner) -> list[torch.Tensor]:
    saved, runner.model.compiled = runner.model.compiled, None
    try:
        return steps(runner)
    finally:
        runner.model.compiled = saved


def compile_logged(runner: ModelRunner, caplog) -> str:
    caplog.clear()
    with caplog.at_level("INFO", logger="ladle.llm"):
        runner.compile_decoder(background=False)
    assert runner.compile_state == "compiled", caplog.text
    return caplog.text


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_graphs_saved_by_one_start_are_read_back_by_the_next(checkpoints, own_cache, caplog) -> None:
    first = runner_for(checkpoints[0])
    assert "decoder graphs compiled in" in compile_logged(first, caplog)
    files = sorted(artifact_dir().glob("*.bin"))
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["1.bin", "2.bin"]  # the one-token graph and the other
    assert files[0].parent == own_cache / "compiled"
    precompiled.forget()  # as a new process
    long_ago = time.time() - 40 * 86400
    for path in files:
        os.utime(path, (long_ago, long_ago))
    second = runner_for(checkpoints[0])
    assert "decoder graphs loaded from the cache" in compile_logged(second, caplog)
    assert all(path.stat().st_mtime > long_ago + 86400 for path in files), "a load marks the files as in use"
    assert_same(steps(second), eager_steps(second))


def test_a_corrupt_graph_file_is_compiled_again_and_long_unused_ones_are_deleted(
        checkpoints, own_cache, caplog) -> None:
    runner_for(checkpoints[0]).compile_decoder(background=False)
    files = sorted(artifact_dir().glob("*.bin"))
    for path in files:
        path.write_bytes(path.read_bytes()[:1000])  # as a disk that filled up mid-write would leave it (if not atomic)
    unused, recent = artifact_dir() / "unused.bin", artifact_dir() / "recent.bin"
    for path, days in ((unused, 40), (recent, 10)):  # another model's, or an older ladle's
        path.write_bytes(b"graph")
        os.utime(path, (time.time() - days * 86400,) * 2)
    precompiled.forget()
    runner = runner_for(checkpoints[0])
    text = compile_logged(runner, caplog)
    assert "did not load" in text and "decoder graphs compiled in" in text
    assert all(path.stat().st_size > 100_000 for path in files), "the files were written anew"
    assert not unused.exists() and recent.exists(), "saving deletes graphs no start loaded for 30 days"
    assert_same(steps(runner), eager_steps(runner))


def test_a_graph_of_another_model_under_this_models_key_fails_its_guards_and_is_never_run(
        checkpoints, own_cache, caplog) -> None:
    # what a key collision, or a key that missed something, would hand over: the two-layer model's graphs for a
    # three-layer model. Run, they would silently skip a layer.
    runner_for(checkpoints[0]).compile_decoder(background=False)
    three = runner_for(checkpoints[1])
    key = artifact_key(three.graph_description())
    for path in list(artifact_dir().glob("*.bin")):
        shutil.copy(path, artifact_dir() / f"{key}-{path.name.rsplit('-', 1)[1]}")
    precompiled.forget()
    text = compile_logged(three, caplog)
    assert "does not fit this model" in text and "decoder graphs compiled in" in text
    assert_same(steps(three), eager_steps(three))


def test_the_key_names_the_model_torch_the_cpu_and_ladles_sources(checkpoints, monkeypatch) -> None:
    two, three = runner_for(checkpoints[0]), runner_for(checkpoints[1])
    key = artifact_key(two.graph_description())
    assert key == artifact_key(runner_for(checkpoints[0]).graph_description())  # a reload: the same files
    assert key != artifact_key(three.graph_description())
    assert key != artifact_key({**two.graph_description(), "dtype": "torch.bfloat16"})
    assert key != artifact_key({**two.graph_description(), "quantization": "int8"})
    assert key != artifact_key({**two.graph_description(), "cpp_wrapper": True})  # tests compile without it
    monkeypatch.setattr(precompiled, "sources_digest", lambda: "another ladle")
    assert key != artifact_key(two.graph_description())
    monkeypatch.undo()
    monkeypatch.setattr(precompiled, "cpu_flags", lambda: "flags : fpu sse2")
    assert key != artifact_key(two.graph_description())
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert key != artifact_key(two.graph_description())


def test_a_step_the_graphs_were_not_built_for_runs_eagerly(checkpoints, own_cache) -> None:
    runner = runner_for(checkpoints[0])
    runner.compile_decoder(background=False)
    decoder, model = runner.model.compiled, runner.model
    ids, positions = torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2])
    assert decoder.accepts(ids, positions) is False  # outside inference mode: the graphs' guards say so too
    with torch.inference_mode():
        assert decoder.accepts(ids, positions)
        assert not decoder.accepts(ids.to(torch.int32), positions)
        assert not decoder.accepts(ids, positions[:2])
        assert not decoder.accepts(ids[::2], positions[::2])  # not contiguous
        assert not decoder.accepts(ids[:0], positions[:0])
    # a step outside inference mode still answers, eagerly (a graph run there would record nothing for autograd)
    step = runner.prepare_inputs(SchedulerOutput([ScheduledSeq("a", [5, 6, 7], 0, [0], True)], 3))
    with precompiled.step_metadata(step.meta), torch.no_grad():
        got = model(step.input_ids, step.positions, step.meta)
        model.compiled = None
        want = model(step.input_ids, step.positions, step.meta)
    torch.testing.assert_close(got, want)


def test_a_torch_without_ahead_of_time_compilation_compiles_just_in_time_and_saves_nothing(
        checkpoints, own_cache, monkeypatch, caplog) -> None:
    """torch 2.11 (the CUDA machine's) has no `aot_compile`: the decoder is still compiled, in this process."""
    monkeypatch.setattr(precompiled, "aot_available", lambda compiled: False)
    runner = runner_for(checkpoints[1])
    text = compile_logged(runner, caplog)
    assert "cannot compile ahead of time" in text and "decoder graphs compiled in" in text
    assert not list(artifact_dir().glob("*.bin"))
    assert isinstance(runner.model.compiled.one, precompiled.JitGraph)
    assert_same(steps(runner), eager_steps(runner))
