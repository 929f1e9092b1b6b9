"""The engine twin: iteration-level inflight batching as in vLLM and TensorRT-LLM, on a GPU twin.

Every `step` is one forward pass:
1. every running request needs room for the KV of the token it decodes now, ceil(ctx/block)
   blocks with ctx = prompt + generated; while the sum exceeds the KV capacity, the most
   recently admitted running request is preempted (recompute style: its blocks are freed and
   it goes back to the head of the queue; when re-admitted it prefills prompt + generated
   tokens again and carries on where it stopped);
2. unless something was just preempted, waiting requests are admitted first-come first-served
   (strictly: the first that does not fit stops admission) while the batch has a free slot,
   the KV cache has ceil((ctx+1)/block) free blocks beyond a small watermark, and the
   iteration's token budget (decode tokens count 1 each) has room for the prefill; the first
   prefill of an iteration may exceed the budget, so an over-long prompt is prefilled alone
   rather than never;
3. running requests decode one token each; admitted ones are prefilled and emit their next
   (for new requests: first) token at the end of the pass;
4. the pass's duration and energy come from the GPU twin at its effective clock; the energy
   is attributed to the requests in the pass by token share (a prefill counts its prompt
   tokens, a decode 1); idle energy between passes is not attributed;
5. requests that reached their true length complete.

A request generates `true_output_tokens` (the trace's truth, twin only), capped at
`max_tokens` and at the model's context window; without a true length it generates
min(max_tokens, `default_output_tokens`) — an assumption for hand-made requests.

Per-request hot state lives in numpy arrays indexed by batch slot, in admission order, so a
pass costs a few vectorized operations rather than a Python loop over the batch.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from throttllem._errors import RequestRejectedError
from throttllem._events import EngineIteration, RequestArrived, RequestCompleted
from throttllem._twin.gpu import GpuTwin
from throttllem._twin.profile import SetupProfile

DEFAULT_OUTPUT_TOKENS = 128


class IterationOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one `step` did: the pass itself and the requests it finished."""

    iteration: EngineIteration
    completed: list[RequestCompleted]


class RunningRequest(NamedTuple):
    """A running request as the controller may see it (no true length)."""

    id: str
    prompt_tokens: int
    generated_tokens: int
    admitted_s: float
    preemptions: int


class QueuedRequest(NamedTuple):
    id: str
    prompt_tokens: int
    generated_tokens: int
    arrival_s: float
    admitted_s: float


class ScheduledRequest(NamedTuple):
    """A waiting request as a pass driver sees it, true length included (see `queue_head`)."""

    id: str
    prompt_tokens: int
    generated_tokens: int
    target_tokens: int  # the length it decodes to: the trace's truth, never the controller's


class _Req:
    """A request's identity and the state kept while it is not in a batch slot."""

    __slots__ = ("admitted_s", "energy_mj", "first_token_s", "generated", "id", "last_token_s",
                 "max_gap_s", "preemptions", "prompt", "request", "target")

    def __init__(self, request: RequestArrived, target: int, admitted_s: float) -> None:
        self.request = request
        self.id = request.id
        self.prompt = request.prompt_tokens
        self.target = target
        self.admitted_s = admitted_s
        self.first_token_s = 0.0
        self.last_token_s = 0.0
        self.max_gap_s = 0.0
        self.generated = 0
        self.energy_mj = 0.0
        self.preemptions = 0


# `EngineTwin._left_min` with no request running.
_NO_REQUEST = 1 << 62


class EngineTwin:
    """One simulated engine instance serving the profile's model on `gpu`."""

    def __init__(self, profile: SetupProfile, instance: str, gpu: GpuTwin, *,
                 gpu_indices: Iterable[int] | None = None,
                 default_output_tokens: int = DEFAULT_OUTPUT_TOKENS) -> None:
        e = profile.engine
        idx = tuple(range(e.tp_degree)) if gpu_indices is None else tuple(gpu_indices)
        if not idx or any(not 0 <= i < gpu.gpu_count() for i in idx):
            raise ValueError(f"engine {instance!r} needs GPUs {idx}, the twin has "
                             f"{gpu.gpu_count()}")
        if default_output_tokens < 1:
            raise ValueError("default_output_tokens must be at least 1")
        self.profile = profile
        self.instance = instance
        self.gpu = gpu
        self.default_output_tokens = default_output_tokens
        self._gpu_indices = idx
        self._block = e.block_tokens
        self._kv_total = e.kv_blocks
        self._watermark = int(e.kv_watermark * e.kv_blocks)
        self._max_batch = e.max_batch
        self._max_batched_tokens = e.max_batched_tokens
        cap = e.max_batch
        # Batch slots 0..n-1, in admission order: rows of one integer and one float matrix,
        # so that a pass updates and a completion compacts each with one operation.
        self._slot_ints = np.zeros((3, cap), dtype=np.int64)
        self._ctx: npt.NDArray[np.int64] = self._slot_ints[0]  # prompt + generated
        self._gen: npt.NDArray[np.int64] = self._slot_ints[1]
        self._target: npt.NDArray[np.int64] = self._slot_ints[2]
        self._slot_floats = np.zeros((3, cap), dtype=np.float64)
        self._last: npt.NDArray[np.float64] = self._slot_floats[0]  # time of the latest token
        # largest gap between tokens so far
        self._gap: npt.NDArray[np.float64] = self._slot_floats[1]
        self._energy: npt.NDArray[np.float64] = self._slot_floats[2]
        self._reqs: list[_Req] = []
        self._req_ids: list[str] = []  # their ids, in slot order
        self._n = 0
        # A lower bound on the tokens any running request still has to generate: while it
        # is positive, no request completes and the pass need not look.
        self._left_min = _NO_REQUEST
        self._ctx_sum = 0  # Σ context tokens of the running requests (their KV tokens)
        self._queue: deque[_Req] = deque()
        self._ids: set[str] = set()
        self._now_s = gpu.now_s(idx[0])
        self._seq = 0
        self.preemptions_total = 0

    # ------------------------------------------------------------------ read-only state

    @property
    def now_s(self) -> float:
        """End of the latest pass (the engine is busy until then)."""
        return self._now_s

    @property
    def kv_blocks_total(self) -> int:
        return self._kv_total

    @property
    def kv_blocks_used(self) -> int:
        """Blocks holding the running requests' KV now, between passes. The next pass needs
        room for one more token each (the one it decodes), and preempts if that does not fit;
        `EngineIteration.kv_blocks_used` is that in-pass figure."""
        n = self._n
        return int(((self._ctx[:n] + (self._block - 2)) // self._block).sum()) if n else 0

    @property
    def running_count(self) -> int:
        return self._n

    @property
    def queue_len(self) -> int:
        return len(self._queue)

    @property
    def iterations(self) -> int:
        return self._seq

    def has_work(self) -> bool:
        return self._n > 0 or bool(self._queue)

    def running(self) -> tuple[RunningRequest, ...]:
        n = self._n
        gen = self._gen[:n].tolist()
        return tuple(RunningRequest(r.id, r.prompt, g, r.admitted_s, r.preemptions)
                     for r, g in zip(self._reqs, gen, strict=True))

    def running_prompt_tokens(self) -> npt.NDArray[np.int64]:
        """Prompt lengths of the running requests, in admission order (a copy)."""
        n = self._n
        return np.asarray(self._ctx[:n] - self._gen[:n], dtype=np.int64)

    def running_generated_tokens(self) -> npt.NDArray[np.int64]:
        """Tokens generated so far by the running requests, in admission order (a copy)."""
        return self._gen[: self._n].copy()

    # A driver that runs the passes itself (the GPU lab's decode loop: `run_iteration` only
    # gets a pass's totals) reads which requests a pass holds through these, never through
    # the slots. They expose the true lengths, which the controller must never read.

    def running_ids(self) -> list[str]:
        """Ids of the running requests, in batch-slot order (the order of a pass's decode
        rows, and of `running_prompt_tokens`)."""
        return [r.id for r in self._reqs[: self._n]]

    def running_context_tokens(self) -> npt.NDArray[np.int64]:
        """KV tokens each running request holds (prompt + generated), in slot order (a copy):
        what its next decode attends over."""
        return self._ctx[: self._n].copy()

    def running_target_tokens(self) -> npt.NDArray[np.int64]:
        """The true lengths the running requests decode to, in slot order (a copy)."""
        return self._target[: self._n].copy()

    def queue_head(self, limit: int | None = None) -> tuple[ScheduledRequest, ...]:
        """The first `limit` waiting requests (all when None), FCFS order, true lengths
        included: a pass admits a prefix of this queue."""
        queue = self._queue if limit is None else itertools.islice(self._queue, max(limit, 0))
        return tuple(ScheduledRequest(r.id, r.prompt, r.generated, r.target) for r in queue)

    def queued(self) -> tuple[QueuedRequest, ...]:
        return tuple(QueuedRequest(r.id, r.prompt, r.generated, r.request.arrival_s,
                                   r.admitted_s) for r in self._queue)

    # ------------------------------------------------------------------ admission

    def admit(self, request: RequestArrived, admitted_s: float) -> None:
        """Queue a request (FCFS); it may start in the first pass that begins at or after
        `admitted_s`."""
        if request.id in self._ids:
            raise RequestRejectedError(f"request {request.id!r} is already in engine "
                                       f"{self.instance!r}")
        prompt = request.prompt_tokens
        max_len = self.profile.model.max_model_len
        if prompt >= max_len:
            raise RequestRejectedError(
                f"request {request.id!r}: prompt of {prompt} tokens leaves no room in the "
                f"{max_len}-token context window of {self.profile.model.name}")
        wanted = (request.true_output_tokens if request.true_output_tokens is not None
                  else min(request.max_tokens, self.default_output_tokens))
        target = min(wanted, request.max_tokens, max_len - prompt)
        peak_blocks = -(-(prompt + target) // self._block)
        if peak_blocks > self._kv_total:
            raise RequestRejectedError(
                f"request {request.id!r} needs {peak_blocks} KV blocks at its longest but "
                f"{self.profile.name} has {self._kv_total}")
        self._queue.append(_Req(request, target, admitted_s))
        self._ids.add(request.id)

    def abort(self, request_id: str) -> bool:
        """Forget a request whose client went away: it leaves the queue or its batch slot,
        its KV blocks are free for the next pass, and it never completes. False when this
        engine does not hold it (never admitted, already finished or already aborted)."""
        if request_id not in self._ids:
            return False
        self._ids.discard(request_id)
        for r in self._queue:
            if r.id == request_id:
                self._queue.remove(r)
                return True
        keep = np.array([rid != request_id for rid in self._req_ids], dtype=bool)
        self._keep_slots(keep)
        return True

    # ------------------------------------------------------------------ one pass

    def step(self, now_s: float) -> IterationOutcome | None:
        """Run one pass starting at the latest of `now_s`, the end of the previous pass and
        the GPUs' own time (a sampler may have idled them further); None when there is nothing
        to run (the GPUs then idle up to `now_s`)."""
        start = max(now_s, self._now_s)
        for i in self._gpu_indices:
            start = max(start, self.gpu.now_s(i))
        block = self._block
        n = self._n
        used = 0
        preempted = False
        if n:
            blocks = (self._ctx[:n] + (block - 1)) // block
            used = int(blocks.sum())
            while used > self._kv_total and n > 1:
                n -= 1
                used -= int(blocks[n])
                self._preempt_slot(n)
                preempted = True
            self._n = n

        admitted: list[_Req] = []
        prefill_tokens = 0
        attn_tokens2 = 0
        if self._queue and (not preempted or n == 0):
            free = self._kv_total - used
            budget = self._max_batched_tokens - n
            slots = self._max_batch - n
            queue = self._queue
            while queue and slots > 0:
                r = queue[0]
                if r.admitted_s > start:
                    break
                ctx = r.prompt + r.generated
                need = (ctx + block) // block  # ceil((ctx + 1) / block)
                reserve = self._watermark if (n or admitted) else 0
                if need > free - reserve or (ctx > budget and admitted):
                    break
                queue.popleft()
                admitted.append(r)
                free -= need
                used += need
                budget -= ctx
                slots -= 1
                prefill_tokens += ctx
                attn_tokens2 += ctx * ctx

        if n == 0 and not admitted:
            self.gpu.idle_until(now_s, self._gpu_indices)
            self._now_s = start
            return None

        kv_tokens = self._ctx_sum
        res = self.gpu.run_iteration(start, batch=n, kv_tokens=kv_tokens,
                                     prefill_tokens=prefill_tokens,
                                     prefill_attn_tokens2=float(attn_tokens2),
                                     indices=self._gpu_indices)
        end = start + res.duration_s
        per_token_mj = res.energy_mj / (n + prefill_tokens)
        if n:
            gap = self._gap[:n]
            np.maximum(gap, end - self._last[:n], out=gap)
            self._last[:n] = end
            self._slot_ints[0:2, :n] += 1  # context and generated tokens
            self._ctx_sum += n
            self._energy[:n] += per_token_mj
            self._left_min -= 1
        request_tokens = [1] * n
        for k, r in enumerate(admitted, start=n):
            ctx = r.prompt + r.generated
            if r.generated == 0:
                r.first_token_s = end
                self._gap[k] = 0.0
            else:
                self._gap[k] = max(r.max_gap_s, end - r.last_token_s)
            self._ctx[k] = ctx + 1
            self._ctx_sum += ctx + 1
            self._gen[k] = r.generated + 1
            self._target[k] = r.target
            self._last[k] = end
            self._energy[k] = r.energy_mj + per_token_mj * ctx
            self._reqs.append(r)
            self._req_ids.append(r.id)
            self._left_min = min(self._left_min, r.target - (r.generated + 1))
            request_tokens.append(ctx)
        m = n + len(admitted)
        self._n = m
        self._now_s = end

        iteration = EngineIteration(
            instance=self.instance, seq=self._seq, start_s=start,
            duration_ms=res.duration_s * 1e3, batch_size=m, decode_tokens=n,
            prefill_tokens=prefill_tokens, kv_blocks_used=used, kv_blocks_total=self._kv_total,
            queue_len=len(self._queue), clock_mhz=res.clock_mhz, energy_mj=res.energy_mj,
            power_w=res.power_w, request_ids=self._req_ids.copy(),
            request_tokens=request_tokens)
        self._seq += 1
        return IterationOutcome(iteration=iteration, completed=self._complete(end))

    # ------------------------------------------------------------------ helpers

    def _preempt_slot(self, k: int) -> None:
        """Move the request in the last slot `k` back to the head of the queue."""
        r = self._reqs.pop()
        self._req_ids.pop()
        self._ctx_sum -= int(self._ctx[k])
        r.generated = int(self._gen[k])
        r.last_token_s = float(self._last[k])
        r.max_gap_s = float(self._gap[k])
        r.energy_mj = float(self._energy[k])
        r.preemptions += 1
        self._queue.appendleft(r)
        self.preemptions_total += 1

    def _complete(self, end: float) -> list[RequestCompleted]:
        if self._left_min > 0:  # nothing can be done yet
            return []
        m = self._n
        left = self._target[:m] - self._gen[:m]
        done = left <= 0
        if not done.any():
            self._left_min = int(left.min()) if m else _NO_REQUEST
            return []
        out: list[RequestCompleted] = []
        for k in np.flatnonzero(done).tolist():
            r = self._reqs[k]
            req = r.request
            gen = int(self._gen[k])
            out.append(RequestCompleted(
                id=req.id, instance=self.instance, tenant=req.tenant, slo_class=req.slo_class,
                arrival_s=req.arrival_s, admitted_s=r.admitted_s, first_token_s=r.first_token_s,
                completed_s=end, prompt_tokens=r.prompt, generated_tokens=gen,
                ttft_ms=(r.first_token_s - req.arrival_s) * 1e3,
                tbt_mean_ms=(end - r.first_token_s) / (gen - 1) * 1e3 if gen > 1 else 0.0,
                tbt_max_ms=float(self._gap[k]) * 1e3, e2e_ms=(end - req.arrival_s) * 1e3,
                preemptions=r.preemptions, energy_mj=float(self._energy[k])))
            self._ids.discard(req.id)
        self._keep_slots(~done)
        return out

    def _keep_slots(self, keep: npt.NDArray[np.bool_]) -> None:
        """Compact the batch slots to those marked in `keep` (one flag per running request),
        keeping admission order."""
        m = self._n
        kept = int(keep.sum())
        self._slot_ints[:, :kept] = self._slot_ints[:, :m][:, keep]
        self._slot_floats[:, :kept] = self._slot_floats[:, :m][:, keep]
        flags = keep.tolist()
        self._reqs = list(itertools.compress(self._reqs, flags))
        self._req_ids = list(itertools.compress(self._req_ids, flags))
        self._n = kept
        self._ctx_sum = int(self._ctx[:kept].sum())
        self._left_min = (int((self._target[:kept] - self._gen[:kept]).min()) if kept
                          else _NO_REQUEST)
