"""The engine contract: what one engine instance consumes from the bus, what it publishes,
when, and with which guarantees. Written once here; `services/README.md` ("The engine
contract") shows `contract_table()`, and `throttllem.testing_engine_contract` checks any
adapter against it over a real nats-server.

Every time (`*_s`) is event time on the shared `Clock` (`throttllem._runtime`).

Consumes
- `request.admitted.<instance>` (`RequestAdmitted`): its own admissions, from JetStream
  through the durable pull consumer `engine_admissions_durable(instance)` (its name, like
  every durable's, lives in `throttllem._subjects`). A durable created for the
  first time starts at new messages; an existing one resumes where it stopped, so admissions
  published while no engine process runs are served when one starts. The message is acked
  only once its request is *done* (completion stored, final refusal stored, or abort acted
  on) and kept alive (`in_progress`) meanwhile, so an engine process that dies leaves its
  unfinished admissions unacked and JetStream hands them to its restart within
  `ADMISSION_ACK_WAIT_S`, which serves them from the start (a completion stored before the
  crash is not stored twice: its message id). A request may start no earlier than its
  admission's `decided_s`.
- `request.aborted` (`RequestAborted`): from JetStream through the durable consumer
  `engine_aborts_durable(instance)`. An abort naming this instance, or no instance (the request
  ended while waiting for admission), makes the engine stop and forget that request: it
  leaves the queue or its batch slot within one pass, frees its KV, publishes nothing more
  for it (no completion, no deferral) and drops any later admission of that id. Aborts for
  other instances are ignored (the controller may re-place a request elsewhere under the
  same id after its engine failed).

Publishes
- `engine.iteration.<instance>` (`EngineIteration`), core NATS, fire-and-forget: one per
  forward pass, when the pass ends. `seq` grows by one per pass within one process;
  `request_ids` lists every request in the pass once and `request_tokens` the tokens the pass
  computed for each (the prompt, or the prompt plus tokens generated before a preemption, at
  prefill; 1 per decode), so `sum(request_tokens) == prefill_tokens + decode_tokens` and
  `batch_size == len(request_ids)`. A request served without preemption is thus charged
  `prompt_tokens + generated_tokens - 1` tokens over its passes (an engine with a prefix
  cache counts only what it computed).
- `request.completed` (`RequestCompleted`), JetStream with msg id `completion_msg_id(id)`:
  once per finished request, after its last token. A retried publish is de-duplicated, so
  the stream holds one completion per request. Fields: arrival_s (the request's) <=
  admitted_s <= first_token_s <= completed_s; ttft_ms, e2e_ms from arrival; tbt_mean_ms over
  the tokens after the first; 1 <= generated_tokens <= max_tokens.
- `request.deferred` (`RequestDeferred`, `final=True`), JetStream with msg id
  `refusal_msg_id(id)`: for a request the engine can never serve (a prompt that fills the
  context window, a request longer than the whole KV cache). It gets no iteration and no
  completion.
- `health.<service>` (`Heartbeat`), core NATS: every 2 s from the service runtime
  (`throttllem._runtime.run_service`) with the bus counters.

Duplicates: an admission of an id the engine holds, or finished, aborted or refused among
the last `REMEMBERED_IDS`, is dropped and counted (`admissions_duplicate`); it is never
served twice within one process.

Our adapters (the twin, the GPU engine) keep the bus side of this contract through one shell,
`throttllem._engines.shell.EngineShell`; they differ only in how a pass runs. Surviving a
crash is theirs, not every engine's: vLLM's requests live in the gateway with their clients'
connections, and die with it (the suite's flag `accepted_requests_survive_a_crash`).
Iterations are fire-and-forget: a slow consumer may miss some.

Real engines may split these duties between processes. For vLLM the gateway sits in the
request path (vLLM has no hook for outside admission) and throttLL'eM's scheduler runs inside
vLLM (`throttllem._engines.vllm`); `Obligation.vllm_owner` says which of them keeps each duty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import anyio
import anyio.abc

from throttllem._bus import Bus
from throttllem._events import RequestAborted
from throttllem._runtime import Clock
from throttllem._subjects import (
    REQUEST_ABORTED,
    REQUEST_COMPLETED,
    REQUEST_DEFERRED,
    engine_aborts_durable,
    engine_admissions_durable,
    engine_iteration,
    health,
    request_admitted,
)

# How many finished (completed, aborted, refused) request ids an engine remembers to drop
# a late duplicate admission.
REMEMBERED_IDS: Final = 65_536
# Wall seconds after which an admission held by a dead engine goes to its restart (the
# admissions durable's ack wait); those being served are kept alive three times as often.
ADMISSION_ACK_WAIT_S: Final = 6.0
# The service name an engine process heartbeats under (`health.engine`).
ENGINE_SERVICE: Final = "engine"


def completion_msg_id(request_id: str) -> str:
    """JetStream de-duplicates a completion published twice under this id."""
    return f"done-{request_id}"


def refusal_msg_id(request_id: str) -> str:
    return f"rejected-{request_id}"


def acts_on_abort(instance: str, abort: RequestAborted) -> bool:
    """Whether `instance` must act on `abort`: it names this instance or none."""
    return abort.instance in ("", instance)


class EngineAdapter(Protocol):
    """What `throttllem run engine --backend <name>` runs: one engine instance as a service
    (`throttllem._runtime.Service`) that keeps this contract."""

    name: str
    instance: str

    async def run(self, bus: Bus, clock: Clock, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume, serve and publish until cancelled; `task_status.started()` once both
        durable consumers exist (an admission published after that is not missed)."""
        ...


@dataclass(frozen=True, slots=True)
class Obligation:
    """One duty of an engine on the bus, as the README's contract table shows it."""

    duty: str
    subject: str
    payload: str
    delivery: str
    guarantee: str
    vllm_owner: str


def _shown(per_instance: Callable[[str], str]) -> str:
    """A per-instance name with `<instance>` where the instance goes."""
    return per_instance("INSTANCE").replace("INSTANCE", "<instance>")


OBLIGATIONS: Final[tuple[Obligation, ...]] = (
    Obligation(
        duty="consume its admissions",
        subject=_shown(request_admitted),
        payload="`RequestAdmitted`",
        delivery=f"JetStream, durable `{_shown(engine_admissions_durable)}`; ack once the request "
                 "is done (kept alive meanwhile)",
        guarantee="admissions published while the engine is down are served when it starts; "
                  "one accepted by an engine that dies is handed to its restart (within "
                  f"{ADMISSION_ACK_WAIT_S:g} s of the death) and served; none starts before "
                  "its `decided_s`",
        vllm_owner="gateway (forwards the HTTP request to vLLM; a gateway that dies takes "
                   "its clients' connections with it)"),
    Obligation(
        duty="stop aborted requests",
        subject=REQUEST_ABORTED,
        payload="`RequestAborted` (instance = this one or empty)",
        delivery=f"JetStream, durable `{_shown(engine_aborts_durable)}`",
        guarantee="gone from the batch within one pass, KV freed, nothing more published "
                  "for it, later admissions of the id dropped",
        vllm_owner="gateway (cancels the HTTP request; vLLM aborts the sequence)"),
    Obligation(
        duty="one event per forward pass",
        subject=_shown(engine_iteration),
        payload="`EngineIteration` with `request_ids`, `request_tokens`",
        delivery="core NATS, fire-and-forget, when the pass ends",
        guarantee="`seq` +1 per pass; each request in the pass once; "
                  "sum(request_tokens) = prefill + decode tokens",
        vllm_owner="throttLL'eM's scheduler inside vLLM"),
    Obligation(
        duty="one completion per finished request",
        subject=REQUEST_COMPLETED,
        payload="`RequestCompleted`",
        delivery=f"JetStream, msg id `{completion_msg_id('<id>')}`",
        guarantee="stored once; arrival <= admitted <= first token <= completed; "
                  "ttft, tbt, e2e from those",
        vllm_owner="gateway (it sees the stream end)"),
    Obligation(
        duty="refuse what it can never serve",
        subject=REQUEST_DEFERRED,
        payload="`RequestDeferred`, `final=true`",
        delivery=f"JetStream, msg id `{refusal_msg_id('<id>')}`",
        guarantee="stored once; no iteration, no completion for that request",
        vllm_owner="gateway (vLLM's HTTP 400)"),
    Obligation(
        duty="drop duplicate admissions",
        subject="(no subject)",
        payload="-",
        delivery="-",
        guarantee=f"an id held or among the last {REMEMBERED_IDS:,} finished is never served "
                  "twice by one process; counted as `admissions_duplicate`",
        vllm_owner="gateway"),
    Obligation(
        duty="say it is alive",
        subject=health(ENGINE_SERVICE),
        payload="`Heartbeat` with the bus counters",
        delivery="core NATS, every 2 s (the service runtime)",
        guarantee="a silent engine is presumed dead",
        vllm_owner="gateway (on `health.gateway`; vLLM answers its own `/health`)"),
)


def contract_table() -> str:
    """The obligations as a Markdown table (what `services/README.md` shows)."""
    rows = ["| duty | subject | payload | delivery | guarantee | for vLLM, kept by |",
            "| --- | --- | --- | --- | --- | --- |"]
    for o in OBLIGATIONS:
        subject = o.subject if o.subject.startswith("(") else f"`{o.subject}`"
        rows.append(f"| {o.duty} | {subject} | {o.payload} | {o.delivery} | {o.guarantee} "
                    f"| {o.vllm_owner} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(contract_table(), end="")
