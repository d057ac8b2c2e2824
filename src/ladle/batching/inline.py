"""When to run a batch on the event loop itself instead of handing it to the instance's thread.

For a model that answers in microseconds (a small scikit-learn or ONNX model), the thread hand-off costs
more than the model — and more event-loop time, too (queue put, wake-up, callback). Invariant: a batch runs
inline only after `warmup` consecutive batches each took under the threshold (measured on whichever thread
ran them), and a single slower batch sends the model back to its thread; so the loop is never blocked
longer than one unexpectedly slow batch of a model proven fast.
"""

from __future__ import annotations


class InlinePolicy:
    def __init__(self, threshold_s: float, warmup: int = 50) -> None:
        self.threshold_s = threshold_s
        self.warmup = warmup
        self._fast_streak = 0

    @property
    def allowed(self) -> bool:
        return self._fast_streak >= self.warmup

    def record(self, seconds: float) -> None:
        self._fast_streak = self._fast_streak + 1 if seconds < self.threshold_s else 0
