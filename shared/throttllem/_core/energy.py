"""Per-request energy attribution: each iteration's energy split by token share.

A request that prefills 1,000 tokens in an iteration where 31 others decode one token each
gets 1000/1031 of that iteration's energy. Energy drawn while no request runs (idle) is
kept apart, so totals always add up: attributed + idle == what the GPU counter says.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def split_energy_mj(energy_mj: float, tokens: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Split one iteration's energy across its requests in proportion to tokens processed."""
    share = np.asarray(tokens, dtype=np.float64)
    total = share.sum()
    if total <= 0:
        return np.zeros_like(share)
    out: npt.NDArray[np.float64] = share * (energy_mj / total)
    return out


# Requests with energy on the books at once, at most: ids that never complete (aborted,
# refused, or forged) must not grow the ledger for ever.
MAX_OPEN_REQUESTS = 100_000


class EnergyLedger:
    """Running per-request energy totals, fed by engine iterations, emptied on completion.

    Bounded: past `max_requests` open ids the one idle longest is dropped (its energy counted as
    unattributed, the drop counted in `evicted`)."""

    def __init__(self, max_requests: int = MAX_OPEN_REQUESTS) -> None:
        if max_requests < 1:
            raise ValueError("an EnergyLedger needs room for at least one request")
        self._by_request: dict[str, float] = {}
        self.max_requests = max_requests
        self.attributed_mj = 0.0
        self.unattributed_mj = 0.0
        self.evicted = 0

    def add_iteration(self, request_ids: Sequence[str], request_tokens: Sequence[int],
                      energy_mj: float) -> None:
        if len(request_ids) != len(request_tokens):
            raise ValueError(
                f"{len(request_ids)} request ids but {len(request_tokens)} token counts"
            )
        if not request_ids or sum(request_tokens) <= 0:
            self.unattributed_mj += energy_mj
            return
        parts = split_energy_mj(energy_mj, request_tokens)
        for request_id, part in zip(request_ids, parts.tolist(), strict=True):
            # Re-inserted so that the order is of last activity: the idlest id goes first.
            self._by_request[request_id] = self._by_request.pop(request_id, 0.0) + part
        self.attributed_mj += energy_mj
        while len(self._by_request) > self.max_requests:
            oldest = next(iter(self._by_request))
            dropped_mj = self._by_request.pop(oldest)
            self.attributed_mj -= dropped_mj
            self.unattributed_mj += dropped_mj
            self.evicted += 1

    def pop(self, request_id: str) -> float:
        """The request's total so far (0.0 if it never ran), forgetting it."""
        return self._by_request.pop(request_id, 0.0)

    def __len__(self) -> int:
        return len(self._by_request)
