"""Prometheus metrics for the whole server, one registry per server instance.

Owns the metric families; hot paths record through pre-bound label children (VersionMetrics),
so recording a request costs a few attribute lookups, not label resolution.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ladle.windows import RequestWindow

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL_STATES = ("LOADING", "READY", "UNAVAILABLE", "UNLOADING")


class Metrics:
    """All metric families of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        r = self.registry
        self.requests = Counter(
            "ladle_model_requests", "Inference requests by outcome", (*labels, "outcome"), registry=r
        )
        self.request_duration = Histogram(
            "ladle_model_request_duration_seconds", "End-to-end request time inside the server",
            labels, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_duration = Histogram(
            "ladle_model_queue_duration_seconds", "Time a request waited in the batch queue",
            labels, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compute_duration = Histogram(
            "ladle_model_compute_duration_seconds", "Time each executed batch took to run (once per batch)",
            labels, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "ladle_model_batch_size", "Rows per executed batch", labels, buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("ladle_model_queue_depth", "Requests waiting in the queue", labels, registry=r)
        self.inflight = Gauge(
            "ladle_model_inflight_requests", "Requests queued or running in the batcher", labels, registry=r
        )
        self.load_duration = Gauge(
            "ladle_model_load_duration_seconds", "How long the last load of a version took", labels, registry=r
        )
        self.state = Gauge(
            "ladle_model_state", "1 for the version's current state, 0 for the others", (*labels, "state"), registry=r
        )
        self.refused = Counter(
            "ladle_requests_refused", "Requests answered before reaching a model: unauthorized (401), forbidden "
            "(403), rate_limited (429), over_concurrency (503, --max-concurrent-requests), llm_queue_full (503)",
            ("reason",), registry=r,
        )
        self.llm = LLMMetricFamilies(r, self.refused)

    def for_version(self, model: str, version: int | str) -> VersionMetrics:
        return VersionMetrics(self, model, str(version))

    def set_state(self, model: str, version: int | str, state: str) -> None:
        for candidate in MODEL_STATES:
            self.state.labels(model, str(version), candidate).set(1 if candidate == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class VersionMetrics:
    """The label-bound children of one model version; also the batcher's BatchObserver."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._metrics = metrics
        self._labels = (model, version)
        self._outcomes: dict[str, Counter] = {}
        self.request_duration = metrics.request_duration.labels(model, version)
        self.queue_duration = metrics.queue_duration.labels(model, version)
        self.compute_duration = metrics.compute_duration.labels(model, version)
        self.batch_size = metrics.batch_size.labels(model, version)
        self.queue_depth = metrics.queue_depth.labels(model, version)
        self.inflight = metrics.inflight.labels(model, version)
        self.load_duration = metrics.load_duration.labels(model, version)
        self.window = RequestWindow()  # recent requests, for rollout gates (serving/rollout.py)
        self.stats = VersionStats()  # Triton's statistics extension (api/stats.py): exact sums, plain ints

    def outcome(self, outcome: str) -> None:
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self._metrics.requests.labels(*self._labels, outcome)
        counter.inc()

    def on_batch(self, rows: int, requests: int, compute_s: float, phases: tuple[int, int, int] | None = None) -> None:
        """`phases`: the batch's (gather inputs, model call, split outputs) in ns when it succeeded, else None."""
        self.batch_size.observe(rows)
        self.compute_duration.observe(compute_s)
        if phases is not None:
            self.stats.batch(rows, requests, phases)

    def watch(self, queue_depth, inflight) -> None:
        """Gauges read at scrape time from the batcher itself: nothing to update per request."""
        self.queue_depth.set_function(queue_depth)
        self.inflight.set_function(inflight)


class VersionStats:
    """Triton's statistics of one version as plain ints (ns, counts), all updated on the event loop: a request's
    outcome (success/fail with its whole duration), its queue wait, and each successful batch's phases — added once
    per batch to its batch size's row and once per request to the request totals (every request of a batch is charged
    the batch's full phase times, as Triton does). A batch of one request costs one dict lookup and four int adds."""

    __slots__ = ("fail_count", "fail_ns", "last_inference", "queue_count", "queue_ns", "rows", "success_count",
                 "success_ns")

    def __init__(self) -> None:
        self.success_count = self.success_ns = 0
        self.fail_count = self.fail_ns = 0
        self.queue_count = self.queue_ns = 0
        self.last_inference = 0.0  # time.monotonic() of the last request's end
        # batch size (rows) -> [batches, input ns, infer ns, output ns, then what the requests beyond the first of
        # each batch add: requests, input ns, infer ns, output ns]
        self.rows: dict[int, list[int]] = {}

    def request(self, ok: bool, elapsed_s: float, now: float) -> None:
        """`now`: time.monotonic() at the request's end (turned into wall-clock time only when read)."""
        if ok:
            self.success_count += 1
            self.success_ns += int(elapsed_s * 1e9)
        else:
            self.fail_count += 1
            self.fail_ns += int(elapsed_s * 1e9)
        self.last_inference = now

    def batch(self, rows: int, requests: int, phases: tuple[int, int, int]) -> None:
        row = self.rows.get(rows)
        if row is None:
            row = self.rows[rows] = [0] * 8
        gather, infer, split = phases
        row[0] += 1
        row[1] += gather
        row[2] += infer
        row[3] += split
        if requests > 1:
            more = requests - 1
            row[4] += more
            row[5] += gather * more
            row[6] += infer * more
            row[7] += split * more

    @property
    def last_inference_ms(self) -> int:
        """The last request's end in ms since the epoch (0: none yet), as Triton reports `last_inference`."""
        if not self.last_inference:
            return 0
        return int((time.time() - time.monotonic() + self.last_inference) * 1000)


TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
REQUEST_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class LLMMetricFamilies:
    """The LLM engine's metric families (one set per server; each engine binds its model and version labels, so
    the arms of an A/B test or a rollout are separate series)."""

    def __init__(self, registry: CollectorRegistry, refused: Counter | None = None) -> None:
        m = ("model", "version")
        r = registry
        self.refused = refused  # the server-wide refusal counter: engines count their queue-full refusals there
        self.ttft = Histogram("ladle_llm_time_to_first_token_seconds", "Time to first token", m,
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ladle_llm_inter_token_latency_seconds", "Time between consecutive output tokens", m,
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("ladle_llm_e2e_request_latency_seconds", "Arrival to last token", m,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("ladle_llm_queue_time_seconds", "Arrival to first scheduled step", m,
                               buckets=(*TOKEN_LATENCY_BUCKETS, 20.0, 60.0), registry=r)
        self.running = Gauge("ladle_llm_requests_running", "Requests in the running batch", m, registry=r)
        self.waiting = Gauge("ladle_llm_requests_waiting", "Requests waiting to be scheduled", m, registry=r)
        self.kv_usage = Gauge("ladle_llm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", m, registry=r)
        self.compiled = Gauge("ladle_llm_decoder_compiled", "1 once the engine's steps run the torch.compile'd "
                              "decoder; 0 while eager (--enforce-eager, still compiling, or the compile failed)", m,
                              registry=r)
        self.prompt_tokens = Counter("ladle_llm_prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter("ladle_llm_generation_tokens", "Tokens generated", m, registry=r)
        self.preemptions = Counter("ladle_llm_preemptions", "Requests preempted to free KV blocks", m, registry=r)
        self.prefix_hits = Counter("ladle_llm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                   m, registry=r)
        self.prefix_queries = Counter("ladle_llm_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                                      "cache", m, registry=r)
        self.finished = Counter("ladle_llm_requests", "Finished requests by reason", (*m, "finish_reason"),
                                registry=r)
        self.step_failures = Counter("ladle_llm_engine_step_failures", "Engine steps that raised; their requests "
                                     "failed and the engine started over with an empty KV cache", m, registry=r)
        self.spec_draft = Counter("ladle_llm_spec_decode_draft_tokens", "Draft tokens verified (speculative "
                                  "decoding)", m, registry=r)
        self.spec_accepted = Counter("ladle_llm_spec_decode_accepted_tokens", "Draft tokens accepted (speculative "
                                     "decoding)", m, registry=r)
        pos = (*m, "position")
        self.spec_draft_pos = Counter("ladle_llm_spec_decode_draft_tokens_per_pos", "Draft tokens verified at each "
                                      "draft position (0 = the first after the last known token)", pos, registry=r)
        self.spec_accepted_pos = Counter("ladle_llm_spec_decode_accepted_tokens_per_pos", "Draft tokens accepted at "
                                         "each draft position: / draft tokens per position = acceptance rate", pos,
                                         registry=r)
        self.batch_tokens = Histogram("ladle_llm_step_tokens", "Tokens per engine step", m,
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                                      registry=r)


class LLMMetrics:
    """One engine's label-bound children; recorded from the engine thread (prometheus_client is thread-safe).
    `window`: the version's recent finished requests, which a rollout's gates read."""

    def __init__(self, families: LLMMetricFamilies, model: str, version: str = "1",
                 window: RequestWindow | None = None) -> None:
        self.families = families
        self.model = model
        self.version = version
        self.window = window if window is not None else RequestWindow()
        for name in ("ttft", "itl", "e2e", "queue", "running", "waiting", "kv_usage", "prompt_tokens",
                     "generation_tokens", "preemptions", "prefix_hits", "prefix_queries", "batch_tokens",
                     "step_failures", "compiled"):
            setattr(self, name, getattr(families, name).labels(model, version))

        self.queue_full = families.refused.labels("llm_queue_full") if families.refused is not None else None

    def finished(self, reason: str) -> None:
        self.families.finished.labels(self.model, self.version, reason).inc()

    def speculation(self, drafted: list[int], accepted: list[int]) -> None:
        """Add per-position draft and accepted token counts (increments since the last call)."""
        f = self.families
        for position, (d, a) in enumerate(zip(drafted, accepted, strict=True)):
            if d:
                f.spec_draft_pos.labels(self.model, self.version, str(position)).inc(d)
            if a:
                f.spec_accepted_pos.labels(self.model, self.version, str(position)).inc(a)
        # bound on first use: a server without speculation shows no spec-decode series at all
        if total := sum(drafted):
            f.spec_draft.labels(self.model, self.version).inc(total)
        if total := sum(accepted):
            f.spec_accepted.labels(self.model, self.version).inc(total)
