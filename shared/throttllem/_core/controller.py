"""The controller: one state machine without I/O, events and ticks in, decisions out.

Both shells drive this one object: the live forecaster service (decode an event, call, publish
the decisions) and the evaluator (call, apply the decisions to the simulation). Whatever the
two do differently is the shell's business (the bus, the simulated engines); every decision
about where a request runs and at what clock is made here, once.

Inputs: `offer` (a request, with its predicted lengths where the admission rule needs them),
`iteration` (an engine pass), `completed`, `forget` (refused by its engine, aborted by its
client or gateway), `tick` (the passage of time), and the instance set (`add_instance`,
`remove_instance`, `set_serving` for the scaler's phases). Outputs: `Admit`, `Defer`,
`Refuse` and `SetClock`, in the order the shell must act on them (a clock a new request needs
is raised before the request is admitted).

Rules (the policy is a `ControllerConfig`; see `POLICIES`):
- admission `place`: the instance that can then run every request within its SLOs at the
  lowest clock (`placement.place`; ties to the emptiest instance, or with `pack` to the
  busiest), FCFS: nothing jumps ahead of a deferred request;
  admission `jsq`: join the shortest queue at once;
- a request of an SLO class the controller does not know, or one no instance can ever hold,
  is refused for good at once: guessing a class could break the SLO the client asked for, and
  deferred, an unservable request would hold up every request behind it;
- clocks `predictive`: every tick, each instance's lowest feasible clock (`placement.retune`)
  through hysteresis (`clock_search.next_clock`: raise at once, lower after a dwell and by a
  margin); `reactive`: the governor (`governor.reactive_clock`); `static`: one clock;
  `top`: the GPU's default, never touched; `agft` and `voltana`: published peers' rules
  (`peers.py`: AGFT's contextual bandit, VoltanaLLM's EcoFreq), fed by engine passes;
- clock costs (`switching.py`, `predictive` only, when the config gives them): an idle
  instance's lock is released (`SetClock(clock_mhz=None)`: the GPU's default) once it has
  idled the break-even time; the dwell before a lowering step is at least one switch
  latency, and doubles after each lowering undone within one switch latency (it saved
  nothing: its switch never completed), back to normal once a lowering holds;
- a clock target is a lease: re-sent every `lease_s / 3` so that an actuator whose controller
  died falls back to default clocks, and sent at once when it changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from throttllem._core.clock_search import next_clock
from throttllem._core.forecast import Candidate
from throttllem._core.governor import Measured, ReactiveGovernor, reactive_clock
from throttllem._core.peers import AgftBandit, AgftConfig, PassSeen, VoltanaConfig, VoltanaEcoFreq
from throttllem._core.placement import (
    EngineShape,
    InstanceTracker,
    Policy,
    never_fits,
    place,
    planned_lengths,
    retune,
)
from throttllem._core.routing import least_loaded
from throttllem._core.slo import DEFAULT_SLO_CLASSES, SloClass, require_slo_class, tightened
from throttllem._core.slo_check import RequestSlo
from throttllem._core.switching import IdlePower, lowering_dwell_s, next_backoff
from throttllem._errors import ConfigError
from throttllem._events import (
    EngineIteration,
    RequestAborted,
    RequestAdmitted,
    RequestArrived,
    RequestCompleted,
    RequestDeferred,
    RequestEvent,
    RequestPredicted,
)

AdmissionRule = Literal["jsq", "place"]
ClockRule = Literal["top", "predictive", "reactive", "static", "agft", "voltana"]
PEER_RULES: Final = ("agft", "voltana")


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """Every knob of the controller, with its default written once."""

    admission: AdmissionRule = "place"
    clocks: ClockRule = "predictive"
    # Seconds a clock target holds at the actuator unless renewed.
    lease_s: float = 3.0
    # Hysteresis: lower a clock only this long after the last change, by at least this many
    # supported steps (raising is always at once).
    min_dwell_s: float = 1.0
    down_margin_steps: int = 2
    governor: ReactiveGovernor = field(default_factory=ReactiveGovernor)
    static_clock_mhz: int | None = None
    # Overload control. A request arriving while this many wait is shed at once (a final
    # refusal with a retry hint; the gateway answers 429 with Retry-After): a bounded queue
    # keeps memory flat and latency meaningful under a burst. None: unbounded.
    max_pending: int | None = 4096
    # A deferred request still waiting after this many seconds is shed (None: never).
    max_wait_s: float | None = None
    # Per-tenant admission rate limit (token bucket: `tenant_rps` requests/s, bursts of up
    # to `tenant_burst`); None: no limit.
    tenant_rps: float | None = None
    tenant_burst: float = 100.0
    # Idle power of the setup's GPUs, unlocked and locked (`switching.IdlePower`): with it, a
    # `predictive` controller releases an idle instance's lock once that pays. None: it never
    # releases a lock (it cannot tell whether that saves anything).
    idle_power: IdlePower | None = None
    # Seconds a clock change takes on the GPU (the old clock holds meanwhile); it sets the
    # break-even of releasing a lock, the least dwell before lowering, and skips lowering
    # steps that could not pay off. 0: changes are instant (the older twin's assumption).
    switch_latency_s: float = 0.0
    # Admission `place` breaks ties toward the busiest instance instead of the emptiest
    # (`placement.admission_order`): batches grow where every SLO still holds.
    pack: bool = False
    # The peers' clock rules' own knobs (`clocks="agft"` / `"voltana"`).
    agft: AgftConfig = field(default_factory=AgftConfig)
    voltana: VoltanaConfig = field(default_factory=VoltanaConfig)

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise ConfigError(f"lease_s must be > 0, not {self.lease_s}")
        if self.min_dwell_s < 0 or self.down_margin_steps < 1:
            raise ConfigError("min_dwell_s must be >= 0 and down_margin_steps >= 1")
        if self.clocks == "static" and self.static_clock_mhz is None:
            raise ConfigError("a static clock rule needs static_clock_mhz")
        if self.max_pending is not None and self.max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1 or None, not {self.max_pending}")
        if self.max_wait_s is not None and not self.max_wait_s > 0:
            raise ConfigError(f"max_wait_s must be > 0 or None, not {self.max_wait_s}")
        if self.tenant_rps is not None and not (self.tenant_rps > 0 and self.tenant_burst >= 1):
            raise ConfigError("tenant_rps must be > 0 and tenant_burst >= 1")
        if not (self.switch_latency_s >= 0 and math.isfinite(self.switch_latency_s)):
            raise ConfigError(f"switch_latency_s must be >= 0, not {self.switch_latency_s}")

    @property
    def tracks_requests(self) -> bool:
        """Whether the controller projects each instance's requests (needs predictions)."""
        return self.admission == "place" or self.clocks == "predictive"

    @property
    def needs_predictions(self) -> bool:
        return self.admission == "place"

    @property
    def needs_clocks(self) -> bool:
        """Whether the controller needs the setup's clock policy (supported clocks, floor)."""
        return self.tracks_requests or self.clocks in ("reactive", *PEER_RULES)

    @property
    def needs_perf(self) -> bool:
        """Whether the controller queries a performance model."""
        return self.tracks_requests or self.clocks == "voltana"


# The policies a live forecaster runs (`throttllem run forecaster --policy NAME`).
POLICIES: Final[Mapping[str, ControllerConfig]] = {
    # What an engine does without throttLL'eM: admit at once, leave clocks alone.
    "default": ControllerConfig(admission="jsq", clocks="top"),
    # The paper's controller: admission and clocks from the forecast.
    "throttllem": ControllerConfig(admission="place", clocks="predictive"),
    # The same, packing admissions onto the busiest instance that meets every SLO.
    "throttllem-pack": ControllerConfig(admission="place", clocks="predictive", pack=True),
    # A reactive, utilization-driven DVFS governor (no prediction).
    "retail": ControllerConfig(admission="jsq", clocks="reactive"),
    # Published peers (`peers.py`), on our engines: AGFT's bandit, VoltanaLLM's EcoFreq.
    "agft": ControllerConfig(admission="jsq", clocks="agft"),
    "voltana": ControllerConfig(admission="jsq", clocks="voltana"),
}


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Admit:
    """Hand `request` to `instance` now."""

    request: RequestArrived
    instance: str
    reason: str
    predicted_tokens: float | None = None
    upper_tokens: float | None = None


@dataclass(frozen=True, slots=True)
class Defer:
    """No instance can take the request within every SLO now; it waits (FCFS) and is retried
    as requests complete and on every tick."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refused for good; `cause` names the counter ("unknown_slo_class", "never_fits",
    "shed", "queue_timeout", "rate_limited"); `retry_after_s` > 0 where a retry later may
    succeed (overload), 0 where it never will."""

    request_id: str
    reason: str
    cause: str
    retry_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SetClock:
    """Lock every GPU of `instance` at `clock_mhz` (a lease of the config's `lease_s`), or
    release the lock (`clock_mhz=None`: the GPU's default clocks); `changed` is False for a
    renewal of the current target."""

    instance: str
    clock_mhz: int | None
    reason: str
    changed: bool


Decision = Admit | Defer | Refuse | SetClock

DEFER_REASON: Final = "no instance meets every SLO with it; retried as requests complete"
# How many ids forgotten before their offer arrived are remembered.
FORGOTTEN_IDS: Final = 65_536


@dataclass(frozen=True, slots=True)
class _Waiting:
    request: RequestArrived
    lengths: tuple[float, float] | None  # (median, upper), clipped to what the engine can do


# --------------------------------------------------------------------------- the machine


class Controller:
    """The admission and clock state of one forecaster: per-instance trackers, what each
    instance holds, the FCFS queue of deferred requests, clock hysteresis and lease timing."""

    def __init__(self, config: ControllerConfig, *, shape: EngineShape,
                 policy: Policy | None = None,
                 slo_classes: Mapping[str, SloClass] | None = None) -> None:
        if config.needs_clocks and policy is None:
            raise ConfigError("this policy needs the setup's clock policy (clocks, floor, "
                              "performance model)")
        if config.clocks == "static" and policy is not None:
            policy.clocks.index(config.static_clock_mhz or 0)  # refuses unsupported clocks
        self.config = config
        self.shape = shape
        if config.pack and policy is not None and not policy.pack:
            policy = dataclasses.replace(policy, pack=True)
        self.policy = policy
        self.slo_classes: dict[str, SloClass] = dict(slo_classes or DEFAULT_SLO_CLASSES)
        self.trackers: dict[str, InstanceTracker] = {}
        self.outstanding: dict[str, int] = {}  # requests admitted and not done, per instance
        self.placed: dict[str, str] = {}  # request id -> instance, admitted and not done
        self.clock_mhz: dict[str, int] = {}  # each instance's target (not `top` policies)
        self.changed_s: dict[str, float] = {}
        self.sent_s: dict[str, float] = {}
        self.measured: dict[str, Measured] = {}
        self.pending: deque[_Waiting] = deque()
        self.serving: list[str] | None = None  # None: every instance takes new requests
        self.deferred = 0  # requests deferred on arrival (each counted once)
        self._governed_s = 0.0
        # The governor honours the tightest TBT bound of the classes it has served.
        self._governed_tbt_ms = math.inf
        # tenant -> (tokens, when last refilled), for the per-tenant rate limit.
        self._buckets: dict[str, tuple[float, float]] = {}
        # Ids forgotten before they were offered (an abort can overtake its own arrival on the
        # bus): an offer of one is dropped. Bounded: the oldest are let go first.
        self._forgotten: dict[str, None] = {}
        # Instances whose lock is released (their GPUs at default clocks); when each became
        # idle; how often lowering steps were undone within one switch (the dwell back-off).
        self.unlocked: set[str] = set()
        self._idle_since: dict[str, float] = {}
        self._lower_backoff: dict[str, int] = {}
        self._lowered: set[str] = set()  # the last change on the instance lowered its clock
        self._agft: dict[str, AgftBandit] = {}
        self._voltana: dict[str, VoltanaEcoFreq] = {}

    # ------------------------------------------------------------------ instances

    @property
    def instances(self) -> list[str]:
        return list(self.outstanding)

    def add_instance(self, name: str) -> list[Decision]:
        if name in self.outstanding:
            raise ConfigError(f"instance {name!r} is known already")
        self.outstanding[name] = 0
        self.measured[name] = Measured()
        if self.config.tracks_requests:
            self.trackers[name] = InstanceTracker(name, self.shape)
        if self.config.clocks == "static":
            clock = self.config.static_clock_mhz
            assert clock is not None
            self.clock_mhz[name] = clock
            return [SetClock(name, clock, "static clock", changed=True)]
        if self.config.clocks != "top":
            assert self.policy is not None
            self.clock_mhz[name] = self.policy.clocks.mhz[-1]
            self.changed_s[name] = -math.inf
            self.sent_s[name] = -math.inf
        if self.config.clocks == "agft":  # starts unlocked: its EDP baseline
            assert self.policy is not None
            self._agft[name] = AgftBandit(self.config.agft, self.policy.clocks.mhz,
                                          self.policy.floor_mhz)
            self.unlocked.add(name)
        elif self.config.clocks == "voltana":  # starts at its lowest frequency
            assert self.policy is not None
            eco = VoltanaEcoFreq(self.config.voltana,
                                 (self.policy.floor_mhz, self.policy.clocks.mhz[-1]))
            self._voltana[name] = eco
            self.clock_mhz[name] = eco.freqs[0]
            return [SetClock(name, eco.freqs[0], "EcoFreq: start at the lowest frequency",
                             changed=True)]
        return []

    def remove_instance(self, name: str) -> None:
        """Forget an instance (it was drained: it holds no request)."""
        for table in (self.outstanding, self.measured, self.trackers, self.clock_mhz,
                      self.changed_s, self.sent_s, self._idle_since, self._lower_backoff,
                      self._agft, self._voltana):
            table.pop(name, None)
        self.unlocked.discard(name)
        self._lowered.discard(name)
        for request_id in [r for r, i in self.placed.items() if i == name]:
            del self.placed[request_id]

    def set_serving(self, names: Collection[str] | None) -> None:
        """Which instances take new requests (the scaler's active ones); None: all."""
        self.serving = None if names is None else [n for n in names if n in self.outstanding]

    def _serving(self) -> list[str]:
        return list(self.outstanding) if self.serving is None else self.serving

    # ------------------------------------------------------------------ requests

    def offer(self, request: RequestArrived, lengths: tuple[float, float] | None,
              now_s: float) -> list[Decision]:
        """A new request, with (median, upper) predicted generation lengths where the
        admission rule needs them."""
        if self._forgotten.pop(request.id, False) is None:  # aborted before it got here
            return []
        refusal = self._refusal(request) or self._overload(request, now_s)
        if refusal is not None:
            return [refusal]
        if lengths is None and self.config.needs_predictions:
            raise ConfigError(f"policy with {self.config.admission!r} admission needs length "
                              "predictions")
        if self.config.clocks == "reactive":
            self._governed_tbt_ms = min(self._governed_tbt_ms,
                                        self._slo(request).tbt_ms)
        waiting = _Waiting(request, None if lengths is None else planned_lengths(
            self.shape, prompt_tokens=request.prompt_tokens, max_tokens=request.max_tokens,
            predicted_tokens=lengths[0], upper_tokens=lengths[1]))
        out: list[Decision] = []
        if self.pending:  # FCFS: nothing jumps ahead of a deferred request
            self.pending.append(waiting)
            self._drain(now_s, out)
        elif not self._try(waiting, now_s, out):
            self.pending.append(waiting)
            self.deferred += 1
            out.append(Defer(request.id, DEFER_REASON))
        return out

    def _refusal(self, request: RequestArrived) -> Refuse | None:
        try:
            require_slo_class(request.slo_class, self.slo_classes)
        except ConfigError as e:
            return Refuse(request.id, f"controller: {e}", "unknown_slo_class")
        why = never_fits(self.shape, request.prompt_tokens)
        if why is not None:
            return Refuse(request.id, f"controller: {why}", "never_fits")
        return None

    def _slo(self, request: RequestArrived) -> SloClass:
        """The request's class, tightened by its own bounds where it carries them."""
        return tightened(self.slo_classes[request.slo_class],
                         prompt_tokens=request.prompt_tokens, ttft_ms=request.ttft_slo_ms,
                         tbt_ms=request.tbt_slo_ms)

    def _overload(self, request: RequestArrived, now_s: float) -> Refuse | None:
        cfg = self.config
        if cfg.max_pending is not None and len(self.pending) >= cfg.max_pending:
            return Refuse(request.id, f"controller: overloaded, {len(self.pending)} requests "
                          "waiting already; retry later", "shed", retry_after_s=1.0)
        if cfg.tenant_rps is None:
            return None
        tokens, last_s = self._buckets.get(request.tenant, (cfg.tenant_burst, now_s))
        tokens = min(cfg.tenant_burst, tokens + max(now_s - last_s, 0.0) * cfg.tenant_rps)
        if tokens < 1.0:
            self._buckets[request.tenant] = (tokens, now_s)
            return Refuse(request.id, f"controller: tenant {request.tenant!r} is over its "
                          f"rate limit of {cfg.tenant_rps:g} requests/s", "rate_limited",
                          retry_after_s=(1.0 - tokens) / cfg.tenant_rps)
        self._buckets[request.tenant] = (tokens - 1.0, now_s)
        return None

    def _try(self, waiting: _Waiting, now_s: float, out: list[Decision]) -> bool:
        """Admit now (True, decisions appended) or leave it waiting (False, nothing changed)."""
        serving = self._serving()
        if not serving:
            return False
        request = waiting.request
        if self.config.admission == "jsq":
            instance = least_loaded({n: self.outstanding[n] for n in serving})
            self._admit(waiting, instance, "join the shortest queue", out)
            return True
        assert self.policy is not None
        assert waiting.lengths is not None
        median, upper = waiting.lengths
        slo = self._slo(request)
        candidate = Candidate(prompt_tokens=request.prompt_tokens, predicted_tokens=median,
                              upper_tokens=upper)
        candidate_slo = RequestSlo.for_request(slo, prompt_tokens=request.prompt_tokens,
                                               arrival_s=request.arrival_s)
        placement = place({n: self.trackers[n] for n in serving}, candidate, candidate_slo,
                          self.policy, now_s=now_s)
        if placement is None:
            return False
        self._set_clock(placement.instance, placement.clock_mhz, now_s,
                        f"admit {request.id}", out)
        self._admit(waiting, placement.instance, placement.reason, out)
        return True

    def _admit(self, waiting: _Waiting, instance: str, reason: str,
               out: list[Decision]) -> None:
        request = waiting.request
        tracker = self.trackers.get(instance)
        if tracker is not None and waiting.lengths is not None:
            median, upper = waiting.lengths
            tracker.admitted(request.id, prompt_tokens=request.prompt_tokens,
                             predicted_tokens=median, upper_tokens=upper,
                             arrival_s=request.arrival_s,
                             slo=self._slo(request))
        self.outstanding[instance] += 1
        self.placed[request.id] = instance
        median_or_none, upper_or_none = waiting.lengths or (None, None)
        out.append(Admit(request, instance, reason, median_or_none, upper_or_none))

    def _drain(self, now_s: float, out: list[Decision]) -> None:
        while self.pending and self._try(self.pending[0], now_s, out):
            self.pending.popleft()

    def iteration(self, instance: str, request_ids: list[str], end_s: float,
                  duration_ms: float, *, engine: EngineIteration | None = None) -> None:
        """One engine pass ended: every request in it emitted a token. `engine`: the whole
        `engine.iteration` event, which the peers' clock rules read (batch, queue, energy)."""
        tracker = self.trackers.get(instance)
        if tracker is not None:
            tracker.iteration(request_ids, end_s)
        seen = self.measured.get(instance)
        if seen is not None:
            seen.add_pass(duration_ms)
        peer = self._agft.get(instance) or self._voltana.get(instance)
        if peer is not None and engine is not None:
            total = engine.kv_blocks_total
            peer.observe(PassSeen(
                end_s=end_s, duration_ms=duration_ms, batch_size=engine.batch_size,
                decode_tokens=engine.decode_tokens, prefill_tokens=engine.prefill_tokens,
                kv_tokens=engine.kv_blocks_used * self.shape.kv_block_tokens,
                kv_fraction=engine.kv_blocks_used / total if total else 0.0,
                queue_len=engine.queue_len, energy_mj=engine.energy_mj))

    def completed(self, request_id: str, instance: str, now_s: float) -> list[Decision]:
        """A request finished on `instance`: its capacity frees, deferred requests retry."""
        if instance not in self.outstanding:
            return []
        self.placed.pop(request_id, None)
        self._release(instance, request_id)
        out: list[Decision] = []
        self._drain(now_s, out)
        return out

    def forget(self, request_id: str, now_s: float) -> list[Decision]:
        """A request ended without completing (its engine refused it, its client went away,
        it waited too long): drop it from the projections and the queue, or it would pin
        its instance's clock up for ever."""
        instance = self.placed.pop(request_id, None)
        if instance is None:
            before = len(self.pending)
            self.pending = deque(w for w in self.pending if w.request.id != request_id)
            out: list[Decision] = []
            if len(self.pending) != before:  # the head may have been the one blocking
                self._drain(now_s, out)
            else:  # not seen yet: drop it when it comes
                self._forgotten[request_id] = None
                if len(self._forgotten) > FORGOTTEN_IDS:
                    del self._forgotten[next(iter(self._forgotten))]
            return out
        self._release(instance, request_id)
        out = []
        self._drain(now_s, out)
        return out

    def _release(self, instance: str, request_id: str) -> None:
        self.outstanding[instance] = max(self.outstanding[instance] - 1, 0)
        tracker = self.trackers.get(instance)
        if tracker is not None:
            tracker.completed(request_id)

    # ------------------------------------------------------------------ time

    def tick(self, now_s: float) -> list[Decision]:
        """Retune clocks (predictive), let the governor act (reactive), retry deferrals."""
        out: list[Decision] = []
        if self.config.clocks == "predictive":
            assert self.policy is not None
            for instance, tracker in self.trackers.items():
                if self._released_when_idle(instance, now_s, out):
                    continue
                self._set_clock(instance, retune(tracker, self.policy, now_s=now_s), now_s,
                                "retune", out)
        elif self.config.clocks == "reactive":
            self._govern(now_s, out)
        elif self.config.clocks in PEER_RULES:
            self._peers(now_s, out)
        if self.config.max_wait_s is not None:  # first: a stale request is not admitted late
            self._shed_stale(now_s, self.config.max_wait_s, out)
        self._drain(now_s, out)
        return out

    def _shed_stale(self, now_s: float, max_wait_s: float, out: list[Decision]) -> None:
        kept: deque[_Waiting] = deque()
        for waiting in self.pending:
            if now_s - waiting.request.arrival_s > max_wait_s:
                out.append(Refuse(waiting.request.id, f"controller: waited more than "
                                  f"{max_wait_s:g} s for capacity; retry later",
                                  "queue_timeout", retry_after_s=1.0))
            else:
                kept.append(waiting)
        self.pending = kept

    def _set_clock(self, instance: str, proposed_mhz: int, now_s: float, reason: str,
                   out: list[Decision]) -> None:
        assert self.policy is not None
        cfg = self.config
        current = self.clock_mhz[instance]
        backoff = self._lower_backoff.get(instance, 0)
        step = next_clock(current, self.changed_s[instance], proposed_mhz, now_s,
                          min_dwell_s=lowering_dwell_s(cfg.min_dwell_s, cfg.switch_latency_s,
                                                       backoff),
                          down_margin_steps=cfg.down_margin_steps, clocks=self.policy.clocks)
        changed = step.clock_mhz != current
        if changed and cfg.switch_latency_s > 0:
            if instance in self._lowered:  # how did the last lowering fare?
                held_s = now_s - self.changed_s[instance]
                self._lower_backoff[instance] = next_backoff(backoff, held_s,
                                                             cfg.switch_latency_s)
            if step.clock_mhz < current:
                self._lowered.add(instance)
            else:
                self._lowered.discard(instance)
        if instance in self.unlocked:  # work is back: lock again at once
            self.unlocked.discard(instance)
            changed = True
        self.clock_mhz[instance], self.changed_s[instance] = step.clock_mhz, step.changed_s
        self._send(instance, now_s, f"{reason} ({step.reason})", changed, out)

    def _released_when_idle(self, instance: str, now_s: float, out: list[Decision]) -> bool:
        """Release an idle instance's lock once that pays (`switching.IdlePower`); True while
        it stays released (no retune until work comes back)."""
        idle_power = self.config.idle_power
        if idle_power is None or self.outstanding[instance] > 0:
            self._idle_since.pop(instance, None)
            return False
        if instance in self.unlocked:
            return True
        since = self._idle_since.setdefault(instance, now_s)
        clock = self.clock_mhz[instance]
        wait_s = idle_power.release_after_s(clock, self.config.switch_latency_s)
        if wait_s is None or now_s - since < wait_s:
            return False
        self.unlocked.add(instance)
        out.append(SetClock(instance, None, f"release the lock: idle {now_s - since:.1f} s, "
                            f"locked idle {idle_power.locked_w(clock):.0f} W > unlocked "
                            f"{idle_power.unlocked_w:.0f} W (break-even {wait_s:.2f} s)",
                            changed=True))
        return True

    def _peers(self, now_s: float, out: list[Decision]) -> None:
        assert self.policy is not None
        tbt_ms = min(c.tbt_ms for c in self.slo_classes.values())
        for instance, bandit in self._agft.items():
            if not bandit.due(now_s):
                continue
            agft_clock = bandit.decide(now_s, tbt_ms)
            self._set_direct(instance, agft_clock, now_s, "AGFT", out)
        for instance, eco in self._voltana.items():
            eco_clock = eco.decide(now_s, self.policy.perf, tbt_ms)
            if eco_clock is None:
                self._send(instance, now_s, "EcoFreq", False, out)
            else:
                self._set_direct(instance, eco_clock, now_s, "EcoFreq", out)

    def _set_direct(self, instance: str, clock: int | None, now_s: float, reason: str,
                    out: list[Decision]) -> None:
        """A peer's clock as it chose it (no hysteresis); None: release the lock."""
        if clock is None:
            if instance not in self.unlocked:
                self.unlocked.add(instance)
                out.append(SetClock(instance, None, f"{reason}: default clocks", changed=True))
            return
        changed = clock != self.clock_mhz[instance] or instance in self.unlocked
        self.unlocked.discard(instance)
        if changed:
            self.changed_s[instance] = now_s
        self.clock_mhz[instance] = clock
        self._send(instance, now_s, reason, changed, out)

    def _send(self, instance: str, now_s: float, reason: str, changed: bool,
              out: list[Decision]) -> None:
        if instance in self.unlocked:  # nothing locked: no lease to renew
            return
        # Renew the lease well before it runs out; send at once on a change.
        if changed or now_s - self.sent_s[instance] >= self.config.lease_s / 3:
            self.sent_s[instance] = now_s
            out.append(SetClock(instance, self.clock_mhz[instance], reason, changed))

    def _govern(self, now_s: float, out: list[Decision]) -> None:
        assert self.policy is not None
        gov = self.config.governor
        period = now_s - self._governed_s
        if period < gov.period_s:
            return
        self._governed_s = now_s
        tbt_bound_ms = (self._governed_tbt_ms if math.isfinite(self._governed_tbt_ms)
                        else self.slo_classes["standard"].tbt_ms)
        for instance, seen in self.measured.items():
            clock = reactive_clock(gov, self.policy.clocks, self.policy.floor_mhz,
                                   self.clock_mhz[instance],
                                   busy_fraction=min(seen.busy_s / period, 1.0),
                                   mean_pass_ms=seen.mean_pass_ms, tbt_bound_ms=tbt_bound_ms)
            changed = clock != self.clock_mhz[instance]
            self.clock_mhz[instance] = clock
            self.measured[instance] = Measured()
            self._send(instance, now_s, "governor", changed, out)

    # ------------------------------------------------------------------ restart

    def restore(self, history: Iterable[RequestEvent]) -> list[Decision]:
        """Rebuild the state from the request stream after a restart (pure).

        Admitted and not yet done requests go back to their instance (with no tokens counted:
        until the next iterations arrive they look queued, which makes the first projections
        cautious, never optimistic); requests deferred and never admitted are queued again in
        their order. Returns what must be said again: refusals of queued requests whose class
        is no longer configured. Nothing acknowledged is lost."""
        arrived: dict[str, tuple[RequestArrived, tuple[float, float] | None]] = {}
        admitted: dict[str, RequestAdmitted] = {}
        deferred: list[str] = []
        done: set[str] = set()
        for event in history:
            match event:
                case RequestArrived():
                    arrived.setdefault(event.id, (event, None))
                case RequestPredicted(request=RequestArrived() as request):
                    arrived[event.id] = (request, (event.predicted_tokens, event.upper_tokens))
                case RequestAdmitted():
                    admitted[event.request.id] = event
                case RequestDeferred(final=False):
                    deferred.append(event.id)
                case RequestDeferred(final=True) | RequestCompleted() | RequestAborted():
                    done.add(event.id)
                case _:  # a prediction without its request: nothing to plan with
                    pass
        for request_id, adm in admitted.items():
            if request_id in done or adm.instance not in self.outstanding:
                continue
            request = adm.request
            median = adm.predicted_tokens if adm.predicted_tokens is not None else 1.0
            upper = adm.upper_tokens if adm.upper_tokens is not None else median
            # A class no longer configured (restart with another config): planned as
            # `standard`, since the request is already running.
            if request.slo_class not in self.slo_classes:
                request = msgspec.structs.replace(request, slo_class="standard")
            self._admit(_Waiting(request, (median, upper)), adm.instance, "restored", [])
        out: list[Decision] = []
        for request_id in dict.fromkeys(deferred):
            if request_id in admitted or request_id in done or request_id not in arrived:
                continue
            request, lengths = arrived[request_id]
            refusal = self._refusal(request)
            if refusal is not None:
                out.append(refusal)
                continue
            if lengths is None and self.config.needs_predictions:
                continue
            self.pending.append(_Waiting(request, None if lengths is None else planned_lengths(
                self.shape, prompt_tokens=request.prompt_tokens, max_tokens=request.max_tokens,
                predicted_tokens=lengths[0], upper_tokens=lengths[1])))
        return out
