"""Sampler: greedy / temperature / top-k / top-p / min-p masks, penalties, seeded reproducibility, raw logprobs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ladle.llm import sampler_ops
from ladle.llm.sampler import (
    SamplingMetadata,
    SamplingRow,
    apply_penalties,
    make_generator,
    sample,
)
from ladle.llm.sampler_ops import apply_min_p, apply_top_k_top_p, truncate_in_window
from ladle.llm.sampling_params import SamplingParams

VOCAB = 64


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    """Unseeded rows draw from torch's global generator: fix it so statistical checks are deterministic."""
    torch.manual_seed(0)


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=make_generator(seed)) * 3


def _run(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    return sample(logits, SamplingMetadata.build(rows)).token_ids


def _repeat(params: SamplingParams, logits_row: torch.Tensor, times: int) -> list[int]:
    """Sample one distribution `times` times in one batch (unseeded rows share a batched draw)."""
    return _run(logits_row.expand(times, -1).contiguous(), [SamplingRow(params)] * times)


# ---------------------------------------------------------------- greedy and temperature


def test_greedy_is_argmax() -> None:
    logits = _logits(8)
    tokens = _run(logits, [SamplingRow(SamplingParams(temperature=0.0))] * 8)
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_1_is_greedy() -> None:
    logits = _logits(6)
    tokens = _run(logits, [SamplingRow(SamplingParams(temperature=1.5, top_k=1))] * 6)
    assert tokens == logits.argmax(-1).tolist()
    masked = apply_top_k_top_p(logits, torch.ones(6, 1, dtype=torch.long), None)
    assert (torch.isfinite(masked).sum(-1) == 1).all()
    assert masked.argmax(-1).tolist() == tokens


@pytest.mark.parametrize("temperature", [1e-3, 1e-6])
def test_temperature_to_zero_is_argmax(temperature: float) -> None:
    logits = torch.arange(VOCAB, dtype=torch.float32).flip(0).repeat(200, 1) * 0.1  # gaps of 0.1 between tokens
    logits = logits[:, torch.randperm(VOCAB, generator=make_generator(3))]
    tokens = _run(logits, [SamplingRow(SamplingParams(temperature=temperature))] * 200)
    assert set(tokens) == {int(logits[0].argmax())}


def test_mixed_greedy_and_random_rows_keep_their_row_order() -> None:
    logits = _logits(6)
    rows = [SamplingRow(SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=1 if i % 2 == 0 else 0))
            for i in range(6)]
    assert _run(logits, rows) == logits.argmax(-1).tolist()


def test_input_logits_are_not_modified() -> None:
    logits = _logits(4)
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.5, logprobs=3)
    _run(logits, [SamplingRow(params, [1, 2], [3, 3])] * 4)
    _run(logits, [SamplingRow(SamplingParams())] * 4)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- top-k / top-p / min-p


def _reference_allowed(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Allowed set by the textbook definitions, one token at a time (logits assumed distinct)."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    m = max(row)
    allowed = [i for i in order if math.exp(row[i] - m) >= min_p]
    if top_k:
        allowed = allowed[:top_k]
    z = sum(math.exp(row[i] - m) for i in allowed)
    kept, mass = [], 0.0
    for i in allowed:
        if mass >= top_p - 1e-6:
            break
        kept.append(i)
        mass += math.exp(row[i] - m) / z
    return set(kept)


CASES = [(5, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.2), (8, 0.7, 0.0), (10, 0.9, 0.05), (1, 0.3, 0.5), (0, 0.05, 0.0)]


@pytest.mark.parametrize(("top_k", "top_p", "min_p"), CASES)
def test_masks_match_reference_exactly(top_k: int, top_p: float, min_p: float) -> None:
    logits = _logits(5, seed=top_k + 7)
    masked = apply_min_p(logits, torch.full((5, 1), min_p))
    masked = apply_top_k_top_p(masked, torch.full((5, 1), top_k), torch.full((5, 1), top_p))
    for r in range(5):
        allowed = {i for i, v in enumerate(masked[r].tolist()) if v != -math.inf}
        assert allowed == _reference_allowed(logits[r].tolist(), top_k, top_p, min_p)
        kept = masked[r][torch.isfinite(masked[r])]
        assert torch.equal(kept, logits[r][torch.isfinite(masked[r])])  # survivors unchanged


@pytest.mark.parametrize(("top_k", "top_p", "min_p"), CASES)
def test_sampling_never_leaves_the_allowed_set(top_k: int, top_p: float, min_p: float) -> None:
    logits = _logits(1, seed=top_k + 11)[0]
    allowed = _reference_allowed((logits / 0.8).tolist(), top_k, top_p, min_p)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    tokens = _repeat(params, logits, 3000)
    assert set(tokens) <= allowed
    if len(allowed) > 1:
        assert len(set(tokens)) > 1  # it is sampling, not collapsing to argmax


@pytest.mark.parametrize(("top_k", "top_p", "min_p"), [*CASES, (300, 0.9, 0.0), (0, 0.99, 0.0), (0, 1.0, 0.001)])
def test_window_path_agrees_with_reference(top_k: int, top_p: float, min_p: float) -> None:
    """Rows the 256-token window resolves keep exactly the reference set; rows it cannot resolve are flagged."""
    scales = torch.tensor([[0.2], [1.0], [3.0], [8.0]])  # flat ... peaked
    logits = torch.randn(4, 1000, generator=make_generator(top_k)) * scales
    masked = apply_min_p(logits, torch.full((4, 1), min_p))
    values, ids, resolved = truncate_in_window(masked, torch.full((4, 1), top_k), torch.full((4, 1), top_p), 256)
    for r in range(4):
        reference = _reference_allowed(logits[r].tolist(), top_k, top_p, min_p)
        full = apply_top_k_top_p(masked[r:r + 1], torch.tensor([[top_k]]), torch.tensor([[top_p]]))[0]
        assert {i for i, v in enumerate(full.tolist()) if v != -math.inf} == reference
        if resolved[r]:
            assert set(ids[r][torch.isfinite(values[r])].tolist()) == reference
        else:
            assert len(reference) > 256 - 1 or top_k >= 256  # only a big kept set may need the full sort


@pytest.mark.parametrize(("top_k", "top_p", "min_p"), CASES)
def test_small_window_sampling_stays_in_the_allowed_set(top_k: int, top_p: float, min_p: float,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_ops, "TOP_WINDOW", 4)
    logits = _logits(6, seed=top_k + 21) * torch.tensor([[0.1], [0.5], [1.0], [2.0], [4.0], [8.0]])
    params = SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)
    tokens = _run(logits.repeat(300, 1), [SamplingRow(params)] * 1800)
    for r in range(6):
        assert set(tokens[r::6]) <= _reference_allowed(logits[r].tolist(), top_k, top_p, min_p)


def test_per_row_parameters_in_one_batch() -> None:
    logits = _logits(1, seed=5)[0].expand(4, -1).contiguous()
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.2), SamplingParams(min_p=0.6), SamplingParams()]
    rows = [SamplingRow(params[i % 4]) for i in range(4 * 500)]
    tokens = _run(logits.repeat(500, 1), rows)
    for i, p in enumerate(params):
        allowed = _reference_allowed(logits[0].tolist(), p.top_k, p.top_p, p.min_p)
        assert set(tokens[i::4]) <= allowed


def test_sampling_distribution_matches_softmax() -> None:
    torch.manual_seed(1234)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 30_000
    counts = torch.bincount(torch.tensor(_repeat(SamplingParams(), logits, n)), minlength=6).double()
    expected = torch.softmax(logits.double(), -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # df = 5, p = 0.001


def test_seeded_distribution_matches_softmax() -> None:
    logits = torch.tensor([[0.3, -0.2, 1.1, 0.0]])
    params = SamplingParams(temperature=1.0, seed=7)
    gen = make_generator(7)
    meta = SamplingMetadata.build([SamplingRow(params, generator=gen)])
    counts = torch.bincount(torch.tensor([sample(logits, meta).token_ids[0] for _ in range(4000)]), minlength=4)
    expected = torch.softmax(logits[0].double(), -1) * 4000
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.3  # df = 3, p = 0.001


def test_sample_probs_takes_unnormalised_weights_and_never_a_zero_one() -> None:
    torch.manual_seed(5)
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0])  # totals 4, not 1
    n = 20_000
    counts = torch.bincount(sampler_ops.sample_probs(weights.expand(n, -1).contiguous(), ()), minlength=5).double()
    assert counts[0] == counts[2] == counts[4] == 0
    assert float(((counts[[1, 3]] - torch.tensor([0.75, 0.25]) * n) ** 2 / (torch.tensor([0.75, 0.25]) * n)).sum()) \
        < 10.8  # df = 1, p = 0.001


def test_a_uniform_of_one_draws_the_last_token_of_nonzero_probability(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's uniform_ can return 1.0: u x total is then the total itself, above every running sum."""
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *args, **kwargs: self.fill_(1.0))
    probs = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0], [0.2, 0.3, 0.1, 0.1, 0.3]])
    assert sampler_ops.sample_probs(probs, ()).tolist() == [2, 4]


# ---------------------------------------------------------------- penalties


def test_penalties_match_hand_computed_reference() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    prompt, output = [0, 1], [2, 2, 3, 0]
    meta = SamplingMetadata.build([SamplingRow(params, prompt, output)])
    got = apply_penalties(logits.clone(), meta)[0].tolist()
    # repetition over prompt+output {0,1,2,3}: positive / 2, negative * 2
    rep = [1.0, -2.0, 0.25, -6.0, 1.0, 0.0]
    # then output counts {2: 2, 3: 1, 0: 1}: - 0.25 * count - 0.5 * present
    expected = [rep[0] - 0.25 - 0.5, rep[1], rep[2] - 0.5 - 0.5, rep[3] - 0.25 - 0.5, rep[4], rep[5]]
    assert got == pytest.approx(expected)


def test_presence_and_frequency_ignore_the_prompt() -> None:
    logits = torch.zeros(1, 4)
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)
    meta = SamplingMetadata.build([SamplingRow(params, [1, 2], [3])])
    assert apply_penalties(logits.clone(), meta)[0].tolist() == [0.0, 0.0, 0.0, -2.0]


def test_penalties_are_per_row() -> None:
    logits = torch.tensor([[1.0, -1.0, 0.5], [1.0, -1.0, 0.5], [1.0, -1.0, 0.5]])
    rows = [
        SamplingRow(SamplingParams(repetition_penalty=0.5), [0], [1]),
        SamplingRow(SamplingParams(), [0], [1, 2]),
        SamplingRow(SamplingParams(frequency_penalty=-1.0), [0], [2, 2]),
    ]
    got = apply_penalties(logits.clone(), SamplingMetadata.build(rows)).tolist()
    assert got == [[2.0, -0.5, 0.5], [1.0, -1.0, 0.5], [1.0, -1.0, 2.5]]


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5)
    assert _run(logits, [SamplingRow(params, [5], [0])]) == [1]
    assert _run(logits, [SamplingRow(SamplingParams(temperature=0.0), [5], [0])]) == [0]


def test_min_tokens_bans_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(1,))
    assert _run(logits, [SamplingRow(params, [3], [3], eos_token_id=0)]) == [2]
    assert _run(logits, [SamplingRow(params, [3], [3, 3], eos_token_id=0)]) == [0]  # min_tokens reached
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert _run(logits, [SamplingRow(ignore, [3], [], eos_token_id=0)]) == [0]


def test_logit_bias_is_added_per_row_after_penalties() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]] * 3)
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logit_bias=((3, 100.0),))),  # forces token 3
        SamplingRow(SamplingParams(temperature=0.0, logit_bias=((0, -100.0), (2, 1.5)))),  # bans 0; 1 still best
        SamplingRow(SamplingParams(temperature=0.0)),  # a neighbour without bias is untouched
    ]
    meta = SamplingMetadata.build(rows)
    assert apply_penalties(logits.clone(), meta).tolist() == [
        [3.0, 2.0, 0.0, 99.0], [-97.0, 2.0, 1.5, -1.0], [3.0, 2.0, 0.0, -1.0]]
    assert _run(logits, rows) == [3, 1, 0]
    penalised = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias=((0, 0.5),)), [0], [])
    assert apply_penalties(logits[:1].clone(), SamplingMetadata.build([penalised]))[0, 0].item() == 2.0  # 3/2 + 0.5
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 100.5),))


def test_logit_bias_steers_random_rows_and_leaves_logprobs_raw() -> None:
    logits = _logits(1)
    banned = int(logits[0].argmax())
    params = SamplingParams(logit_bias=((banned, -100.0),), logprobs=1, seed=3)
    rows = [SamplingRow(params, generator=make_generator(3)) for _ in range(64)]
    out = sample(logits.repeat(64, 1), SamplingMetadata.build(rows))
    assert banned not in out.token_ids
    assert out.logprobs[0].top[0][0] == banned  # logprobs are the model's, before any bias


# ---------------------------------------------------------------- seeded reproducibility


def _random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(temperature=rng.choice([0.0, 0.5, 1.0, 2.0]), top_p=rng.choice([1.0, 0.5, 0.9]),
                          top_k=rng.choice([0, 0, 3, 20]), min_p=rng.choice([0.0, 0.0, 0.1]))


def _seeded_steps(params: SamplingParams, steps: list[torch.Tensor], neighbours: int, shuffle_seed: int
                  ) -> list[int]:
    """Sample the seeded row for several steps, each time in a fresh batch of unseeded neighbours with random
    parameters, at a random position; return the seeded row's tokens."""
    gen = make_generator(params.seed or 0)
    rng = random.Random(shuffle_seed)
    out = []
    for step_logits in steps:
        others = _logits(neighbours, seed=rng.randrange(10**6))
        pos = rng.randrange(neighbours + 1)
        batch = torch.cat([others[:pos], step_logits[None], others[pos:]])
        rows = [SamplingRow(_random_params(rng)) for _ in range(neighbours)]
        rows.insert(pos, SamplingRow(params, generator=gen))
        out.append(_run(batch, rows)[pos])
    return out


SEEDED = [
    SamplingParams(temperature=1.3, top_p=0.95, top_k=40, seed=1234),
    SamplingParams(temperature=0.9, seed=5),  # no truncation, while neighbours truncate
    SamplingParams(min_p=0.02, seed=6),
    SamplingParams(top_p=0.9, seed=7),
]


@pytest.mark.parametrize("params", SEEDED)
def test_seeded_rows_are_reproducible_whatever_the_batch(params: SamplingParams, monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(sampler_ops, "TOP_WINDOW", 8)  # both the window and the full-sort path get used
    steps = [_logits(1, seed=100 + t)[0] * (0.3 + t % 4) for t in range(12)]
    alone = _seeded_steps(params, steps, neighbours=0, shuffle_seed=0)
    assert _seeded_steps(params, steps, neighbours=0, shuffle_seed=0) == alone
    for trial in range(4):
        torch.manual_seed(trial)  # the unseeded neighbours' draws differ from run to run
        assert _seeded_steps(params, steps, neighbours=1 + 3 * trial, shuffle_seed=trial) == alone
    assert len(set(alone)) > 1


def test_two_seeded_rows_with_different_neighbours() -> None:
    a, b = SamplingParams(seed=1), SamplingParams(seed=2, min_p=0.05)
    logits = _logits(2, seed=9)

    def run(order: list[int]) -> dict[int, int]:
        gens = {0: make_generator(1), 1: make_generator(2)}
        rows = {0: SamplingRow(a, generator=gens[0]), 1: SamplingRow(b, generator=gens[1]),
                2: SamplingRow(SamplingParams()), 3: SamplingRow(SamplingParams(temperature=0.0))}
        batch = torch.cat([logits, _logits(2, seed=77)])[order]
        tokens = _run(batch, [rows[i] for i in order])
        return {i: t for i, t in zip(order, tokens, strict=True) if i < 2}

    assert run([0, 1]) == run([1, 3, 2, 0]) == run([2, 0, 3, 1])


def test_child_seeds_differ() -> None:
    params = SamplingParams(n=3, seed=10)
    assert [params.child(i).seed for i in range(3)] == [10, 11, 12]
    assert all(params.child(i).n == 1 for i in range(3))
    assert SamplingParams(n=2).child(1).seed is None


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_and_sorted() -> None:
    logits = _logits(4)
    params = [
        SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.5, top_k=3),
        SamplingParams(),
        SamplingParams(logprobs=0, temperature=0.0, presence_penalty=1.0),
        SamplingParams(logprobs=2, top_p=0.5),
    ]
    out = sample(logits, SamplingMetadata.build([SamplingRow(p, [1, 2], [3]) for p in params]))
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    for row, k in [(0, 5), (2, 0), (3, 2)]:
        lp = out.logprobs[row]
        assert lp is not None and lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(float(ref[row, lp.token_id]), abs=1e-6)
        assert len(lp.top) == k
        expected = torch.topk(ref[row], k)
        assert [t for t, _ in lp.top] == expected.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(expected.values.tolist(), abs=1e-6)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_no_logprobs_requested_gives_none() -> None:
    out = sample(_logits(3), SamplingMetadata.build([SamplingRow(SamplingParams())] * 3))
    assert out.logprobs == [None, None, None] and len(out.token_ids) == 3


def test_metadata_flags_skip_unused_work() -> None:
    meta = SamplingMetadata.build([SamplingRow(SamplingParams(temperature=0.0))] * 3)
    assert meta.all_greedy and meta.penalties is None and meta.logprob_rows is None and meta.banned_rows is None
    meta = SamplingMetadata.build([SamplingRow(SamplingParams(top_p=0.5)), SamplingRow(SamplingParams())])
    plain, truncated = meta.random_groups
    assert plain.rows.tolist() == [1] and plain.top_p is None and plain.temperature is None
    assert truncated.rows.tolist() == [0] and truncated.top_p is not None and truncated.top_k is None
