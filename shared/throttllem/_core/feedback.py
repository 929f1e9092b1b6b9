"""Online feedback on length predictions: prediction vs what the request really generated.

Keeps the last `window` finished requests and reports rolling MAE (tokens), the share within
±25% of the truth and the coverage of the upper quantile, so that drift away from the model
card's figures is visible on the health subject and logged once per crossing.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import msgspec


class FeedbackStats(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    mae_tokens: float
    within25: float
    upper_coverage: float
    drifting: bool


class LengthFeedback:
    def __init__(self, *, window: int = 1000, max_pending: int = 100_000,
                 expected_mae_tokens: float | None = None, drift_factor: float = 1.5,
                 min_count: int = 100) -> None:
        self._pending: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max_pending = max_pending
        self._abs_err: deque[float] = deque(maxlen=window)
        self._within: deque[bool] = deque(maxlen=window)
        self._covered: deque[bool] = deque(maxlen=window)
        self.expected_mae_tokens = expected_mae_tokens
        self.drift_factor = drift_factor
        self.min_count = min_count
        self.evicted = 0

    def predicted(self, request_id: str, median: float, upper: float) -> None:
        self._pending[request_id] = (median, upper)
        if len(self._pending) > self._max_pending:  # requests that never completed
            self._pending.popitem(last=False)
            self.evicted += 1

    def completed(self, request_id: str, generated_tokens: int) -> bool:
        """Record the truth; False when we never predicted this request."""
        prediction = self._pending.pop(request_id, None)
        if prediction is None:
            return False
        median, upper = prediction
        truth = max(generated_tokens, 1)
        self._abs_err.append(abs(median - truth))
        self._within.append(abs(median - truth) <= 0.25 * truth)
        self._covered.append(truth <= upper)
        return True

    def stats(self) -> FeedbackStats:
        n = len(self._abs_err)
        if n == 0:
            return FeedbackStats(count=0, mae_tokens=float("nan"), within25=float("nan"),
                                 upper_coverage=float("nan"), drifting=False)
        mae = sum(self._abs_err) / n
        drifting = (self.expected_mae_tokens is not None and n >= self.min_count
                    and mae > self.drift_factor * self.expected_mae_tokens)
        return FeedbackStats(count=n, mae_tokens=mae, within25=sum(self._within) / n,
                             upper_coverage=sum(self._covered) / n, drifting=drifting)
