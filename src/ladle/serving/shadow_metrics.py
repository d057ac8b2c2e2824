"""The shadow-traffic metric families (one set per server, on its registry), bound by model and shadow version."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

#: max absolute / relative differences span many decades; 0 is its own bucket (an identical copy)
DIFFERENCE_BUCKETS = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
#: token positions and length differences
TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "version")  # version: the shadow (candidate) version
        r = registry
        self.requests = Counter(
            "ladle_shadow_requests", "Requests copied to a shadow version, by outcome: compared, failed (the shadow "
            "raised; never seen by the caller), dropped (shed: too many copies in flight, the primary busy, or the "
            "shadow's queue full)", (*labels, "outcome"), registry=r)
        self.mismatches = Counter(
            "ladle_shadow_mismatches", "Compared requests whose shadow answer differed from the primary's (tensors: "
            "outside atol/rtol or another argmax; LLMs: other tokens)", labels, registry=r)
        self.tensor_difference = Histogram(
            "ladle_shadow_tensor_difference", "Per output of each compared request: max_abs or max_rel difference "
            "between the shadow's tensor and the primary's", (*labels, "measure"), buckets=DIFFERENCE_BUCKETS,
            registry=r)
        self.token_difference = Histogram(
            "ladle_shadow_token_difference", "Per choice of each compared LLM request that differed: first_difference "
            "(the first differing token's position) and length_difference (|shadow - primary| tokens)",
            (*labels, "measure"), buckets=TOKEN_BUCKETS, registry=r)
