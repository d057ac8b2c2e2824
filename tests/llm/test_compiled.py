"""The torch.compile'd decoder (compiled.py): a server compiles in the background and answers exactly like an eager
one before, during and after; --enforce-eager keeps it eager; repository LLMs inherit the flag; a failed compile
leaves the model serving eagerly; the compiled artifacts are cached on disk; quantized linears compile too; the
compile's probe block stays out of the pool. (Greedy parity with transformers, compiled: test_engine_parity.py.)"""

from __future__ import annotations

import gc
import re
import shutil
import time
import weakref

import httpx
import openai
import pytest
import torch

from ladle.config import LLMConfig
from ladle.llm import runner as runner_module
from ladle.llm.factory import build_core
from ladle.llm.kernels.build import cache_dir
from ladle.llm.models.quant import int4_capable_cpu, resolve_scheme
from ladle.llm.outputs import ScheduledSeq, SchedulerOutput
from ladle.llm.runner import ModelRunner
from ladle.serving.builders import llm_config_from_parameters
from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.server import LadleServer

ENGINE = ["--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "256", "--served-model-name", "tiny"]
PROMPTS = ["The quick brown fox", "Numbers: 1 2 3", "print(add(1, 2))", "Once upon a time"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


def greedy(server: LadleServer) -> list[str]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    return [client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]


def compiled_gauge(server: LadleServer) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(r'^ladle_llm_decoder_compiled\{model="tiny",version="1"\} (\S+)$', text, re.M)
    assert match, "the compiled gauge is exported"
    return float(match.group(1))


def test_a_server_compiles_in_the_background_and_answers_like_an_eager_one(checkpoint, tmp_path) -> None:
    # a cold cache of its own: the compile takes seconds, so the first requests run while it is under way
    # (torch in this test process may have exported its default cache directory: unset it for the server)
    env = {"LADLE_CACHE": str(tmp_path / "cache"), "TORCHINDUCTOR_CACHE_DIR": ""}
    if cache_dir().exists():  # the kernels this host already built: their ~15 s build is not what this test is about
        shutil.copytree(cache_dir(), tmp_path / "cache" / "kernels")
    with LadleServer(["--model", checkpoint, *ENGINE, "--enforce-eager"]) as eager, \
            LadleServer(["--model", checkpoint, *ENGINE, "--no-enforce-eager"], env=env) as compiling:
        expected = greedy(eager)
        assert greedy(compiling) == expected  # served at once, eagerly or compiled, whichever is ready
        deadline = time.monotonic() + 240
        while compiled_gauge(compiling) != 1.0:
            assert time.monotonic() < deadline, f"the decoder never compiled:\n{compiling.log()}"
            assert "stays eager" not in compiling.log()
            time.sleep(0.5)
        assert greedy(compiling) == expected  # now every step runs the compiled graphs
        assert compiled_gauge(eager) == 0.0
        assert "decoder graphs compiled in" in compiling.log()
        assert "compiling the decoder" not in eager.log()
    assert len(list((tmp_path / "cache" / "compiled").glob("*.bin"))) == 2, "both graphs are kept under LADLE_CACHE"
    # a second start reads them back: no trace, no code generation; the same answers
    with LadleServer(["--model", checkpoint, *ENGINE, "--no-enforce-eager"], env=env) as warm:
        deadline = time.monotonic() + 60
        while compiled_gauge(warm) != 1.0:
            assert time.monotonic() < deadline, f"the cached graphs never loaded:\n{warm.log()}"
            time.sleep(0.2)
        assert "decoder graphs loaded from the cache" in warm.log()
        assert greedy(warm) == expected


def test_repository_llms_take_the_server_flag_unless_they_set_their_own(tmp_path) -> None:
    server = LLMConfig(enforce_eager=True)
    inherited = llm_config_from_parameters({}, tmp_path, str(tmp_path), server)
    own = llm_config_from_parameters({"enforce_eager": False}, tmp_path, str(tmp_path), server)
    assert inherited.enforce_eager is True
    assert own.enforce_eager is False


def test_a_failed_compile_leaves_the_model_serving_eagerly(checkpoint, monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(runner_module, "build", broken)
    runner = ModelRunner(checkpoint, dtype=torch.float32, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                         compile=True)
    runner.compile_decoder(background=True).join()
    assert runner.compile_state == "failed"
    assert runner.model.compiled is None
    step = SchedulerOutput([ScheduledSeq("a", [5, 6, 7], 0, [0], True)], 3)
    assert runner.execute(step).shape == (1, runner.vocab_size)


def run_steps(runner: ModelRunner, compiled: bool) -> list[torch.Tensor]:
    """A prefill and three decodes of one sequence, eagerly or on the compiled graphs; logits of each step."""
    saved = runner.model.compiled
    if not compiled:
        runner.model.compiled = None
    tokens, logits = list(range(5, 22)), []
    try:
        step = ScheduledSeq("a", tokens, 0, [0, 1], True)
        for _ in range(4):
            out = runner.execute(SchedulerOutput([step], len(step.token_ids)))
            logits.append(out)
            tokens.append(int(out[-1].argmax()))
            step = ScheduledSeq("a", tokens[-1:], len(tokens) - 1, [0, 1], True)
    finally:
        if not compiled:
            runner.model.compiled = saved
    return logits


# full width with generated Python: test_engine_parity, compiled. The C++ wrapper (the CPU's default outside tests,
# compiled.cpp_wrapper) calls the same kernels from C++: ladle's C++ operators (int4: the tiled GEMM's int4 op and
# paged attention, as full width and int8-weight-only call them) and the Python custom op (int8-dynamic's torch
# kernels) must both be callable from there. A float16 KV cache (--kv-cache-dtype): the operator rounds the new rows
# into it and widens cached context back inside the graph.
@pytest.mark.parametrize(("quantization", "cpp", "kv_cache_dtype"),
                         [("int8", False, None), ("int4", False, None), ("int8-dynamic", True, None),
                          ("int4", True, None), (None, True, torch.float16), (None, True, torch.float8_e4m3fn)])
def test_compiled_steps_compute_what_eager_steps_compute(checkpoint, quantization: str | None, cpp: bool,
                                                         kv_cache_dtype: torch.dtype | None, monkeypatch) -> None:
    if quantization == "int4" and (why := int4_capable_cpu()) is not None:
        pytest.skip(f"int4 is refused here: {why}")
    monkeypatch.setenv("LADLE_CPP_WRAPPER", str(int(cpp)))
    scheme = None if quantization is None else resolve_scheme(quantization, torch.float32, torch.device("cpu"), 32)
    runner = ModelRunner(checkpoint, dtype=torch.float32, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                         compile=True, quantization=scheme, kv_cache_dtype=kv_cache_dtype)
    runner.compile_decoder(background=False)
    assert runner.compile_state == "compiled"
    eager, compiled = run_steps(runner, False), run_steps(runner, True)
    # ladle's int8 / int4 GEMMs round x to int16 per row: inductor's float32 differences (fused norms) move roundings
    tol = 1e-3 if scheme is not None and scheme.method in ("int8-weight-only", "int4") else 1e-4
    for a, b in zip(eager, compiled, strict=True):
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_the_probe_block_is_an_extra_block_no_pool_hands_out(checkpoint) -> None:
    core = build_core(LLMConfig(model=str(checkpoint), dtype="float32", num_kv_blocks=8, max_model_len=128,
                                enforce_eager=False),
                      checkpoint)
    core.runner.compile_thread.join()
    assert core.runner.compile_state == "compiled"
    assert core.scheduler.kv.pool.num_blocks == core.runner.num_blocks == 8
    assert core.runner.kv_cache.shape[3] == core.runner.cache_blocks == 9
    eager = build_core(LLMConfig(model=str(checkpoint), dtype="float32", num_kv_blocks=8, max_model_len=128,
                                 enforce_eager=True),
                       checkpoint)
    assert eager.runner.compile_state == "off" and eager.runner.kv_cache.shape[3] == 8


def test_a_compiled_step_that_fails_is_rerun_eagerly_and_the_model_stays_eager(checkpoint) -> None:
    runner = ModelRunner(checkpoint, dtype=torch.float32, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                         compile=True)
    expected = run_steps(runner, compiled=False)

    def broken(*args):
        raise RuntimeError("a graph went wrong")

    runner.model.compiled, runner.compile_state = broken, "compiled"
    got = run_steps(runner, compiled=True)
    assert runner.model.compiled is None and runner.compile_state == "failed"
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b)


def test_a_model_of_the_same_shapes_reuses_the_graphs_and_an_unloaded_one_is_freed(checkpoint, caplog) -> None:
    """A reload or a second version compiles nothing new (handles are graph inputs, not constants); the graphs hold
    no reference to an unloaded model's weights."""
    first = ModelRunner(checkpoint, dtype=torch.float32, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                        compile=True)
    first.compile_decoder(background=False)
    model = weakref.ref(first.model)
    del first
    gc.collect()
    assert model() is None
    second = ModelRunner(checkpoint, dtype=torch.float32, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                         compile=True)
    started = time.perf_counter()
    with caplog.at_level("INFO", logger="ladle.llm.runner"):
        second.compile_decoder(background=False)
    assert second.compile_state == "compiled"
    assert "decoder graphs shared with a loaded model" in caplog.text
    assert time.perf_counter() - started < 5.0, "the graphs were reused, not traced again"


def test_a_step_that_fails_eagerly_too_raises_and_keeps_the_compiled_graphs(checkpoint) -> None:
    runner = ModelRunner(checkpoint, dtype=torch.float32, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                         compile=True)

    def broken(*args):
        raise RuntimeError("a graph went wrong")

    runner.model.compiled, runner.compile_state = broken, "compiled"
    bad = ScheduledSeq("a", [runner.vocab_size + 5], 0, [0], True)  # an id past the vocabulary fails either way
    with pytest.raises(IndexError):
        runner.execute(SchedulerOutput([bad], 1))
    assert runner.model.compiled is broken and runner.compile_state == "compiled"


@pytest.mark.parametrize("quantization", ["int8-dynamic", "int8-weight-only"])
def test_eager_steps_of_a_quantized_model_run_while_another_thread_compiles_it(checkpoint, quantization) -> None:
    # torch.compiler.is_compiling() is one process-wide flag: an eager step on the engine thread during the background
    # compile once took the traced branch of the quantized linears and recursed without end (500s while compiling)
    scheme = resolve_scheme(quantization, torch.float32, torch.device("cpu"), 32)
    runner = ModelRunner(checkpoint, dtype=torch.float32, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                         compile=True, quantization=scheme)
    reference = run_steps(runner, False)
    compiling = runner.compile_decoder(background=True)
    during = 0
    while compiling.is_alive():
        for a, b in zip(reference, run_steps(runner, False), strict=True):
            # 1e-3 as the other int8 compiled tests: in the full suite (never alone) int8-weight-only eager steps
            # during the compile differed from the reference by 1.1e-4 (not understood yet; see the issue 16 note)
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
        during += 1
    assert during >= 1 and runner.compile_state == "compiled", (during, runner.compile_state)
    torch.compiler._is_compiling_flag = True  # what every thread sees while some thread compiles
    try:
        for a, b in zip(reference, run_steps(runner, False), strict=True):  # the prefill and every decode
            torch.testing.assert_close(b, a)
    finally:
        torch.compiler._is_compiling_flag = False
