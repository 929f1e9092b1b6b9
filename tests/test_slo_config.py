"""SLO classes from a TOML file (`--slo-config`): parsing and its errors, the forecaster
refusing classes it does not know (over a real nats-server), and the evaluator steered and
scored by the file's classes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._core.slo import (
    DEFAULT_SLO_CLASSES,
    load_slo_classes,
    parse_slo_classes,
    require_slo_class,
)
from throttllem._errors import ConfigError
from throttllem._events import (
    RequestAdmitted,
    RequestArrived,
    RequestDeferred,
    RequestPredicted,
)
from throttllem._runtime import Clock
from throttllem._services.forecaster import ForecasterService
from throttllem._subjects import (
    REQUEST_PREDICTED,
)
from throttllem.testing import forecaster_service, watch_decisions

REPO = Path(__file__).resolve().parents[1]


def test_a_file_replaces_and_adds_classes_and_keeps_the_rest() -> None:
    classes = parse_slo_classes("""
        [interactive]
        tbt_ms = 20          # only this key: the rest stay the built-in interactive's
        [premium]
        tbt_ms = 25.0
        ttft_base_ms = 250
    """)
    assert classes["standard"] == DEFAULT_SLO_CLASSES["standard"]
    assert classes["batch"] == DEFAULT_SLO_CLASSES["batch"]
    assert classes["interactive"].tbt_ms == 20.0
    assert classes["interactive"].ttft_base_ms == DEFAULT_SLO_CLASSES["interactive"].ttft_base_ms
    premium = classes["premium"]
    assert (premium.name, premium.tbt_ms, premium.ttft_base_ms) == ("premium", 25.0, 250.0)
    # A new class's unset keys come from the SloClass defaults (the standard bounds).
    assert premium.ttft_ms_per_prompt_token == DEFAULT_SLO_CLASSES["standard"] \
        .ttft_ms_per_prompt_token
    assert premium.e2e_bound_ms(prompt_tokens=100, generated_tokens=11) == pytest.approx(
        250.0 + 0.25 * 100 + 25.0 * 10)


@pytest.mark.parametrize(("text", "message"), [
    ("[standard]\ntbt_m = 40", "unknown key(s) ['tbt_m']"),
    ("standard = 40", "'standard' must be a table"),
    ("[x]\ntbt_ms = 0", "tbt_ms = 0 is out of range"),
    ("[x]\nttft_base_ms = -5", "ttft_base_ms = -5 is out of range"),
    ("[x]\ntbt_ms = nan", "tbt_ms = nan is out of range"),
    ("[x]\ntbt_ms = '40'", "tbt_ms must be a number, not '40'"),
    ("[x]\ntbt_ms = true", "tbt_ms must be a number, not True"),
    ("[x\ntbt_ms = 4", "not valid TOML"),
])
def test_a_bad_file_is_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^slo\.toml: ") as info:
        parse_slo_classes(text, source="slo.toml")
    assert message in str(info.value)


def test_loading(tmp_path: Path) -> None:
    assert load_slo_classes(None) == dict(DEFAULT_SLO_CLASSES)
    with pytest.raises(ConfigError, match=r"cannot read the SLO config .*missing\.toml"):
        load_slo_classes(tmp_path / "missing.toml")
    example = load_slo_classes(REPO / "deploy" / "slo.example.toml")
    assert example["premium"].tbt_ms == 25.0
    assert set(DEFAULT_SLO_CLASSES) <= set(example)
    with pytest.raises(ConfigError, match=r"unknown SLO class 'gold'; known: \['batch'"):
        require_slo_class("gold", example)


def predicted(rid: str, slo_class: str) -> RequestPredicted:
    return RequestPredicted(id=rid, predicted_tokens=40.0, upper_tokens=50.0, model_version="t",
                            request=RequestArrived(id=rid, arrival_s=time.time(),
                                                   prompt_tokens=100, slo_class=slo_class))


async def _decisions(nats: EmbeddedNatsServer, service: ForecasterService,
                     requests: list[RequestPredicted],
                     ) -> tuple[dict[str, RequestAdmitted | RequestDeferred], dict[str, int]]:
    """Run the forecaster, publish `requests`; each one's admission or deferral, and the
    forecaster bus's counters."""
    clock = Clock(epoch_wall_s=0.0)  # event time = Unix time, as the arrivals above
    client = await Bus.connect(nats.url, name="client")
    await client.ensure_request_stream()
    decided = await watch_decisions(client)
    bus = await Bus.connect(nats.url, name="forecaster")
    async with anyio.create_task_group() as tg:
        await tg.start(service.run, bus, clock)
        for request in requests:
            await client.publish_durable(REQUEST_PREDICTED, request)
        with anyio.fail_after(10):
            while len(decided) < len(requests):
                await anyio.sleep(0.02)
        await anyio.sleep(1.5)  # a nak'ed message would come back after 1 s: none may
        tg.cancel_scope.cancel()
    counters = dict(bus.counters)
    await bus.close()
    await client.close()
    return decided, counters


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_forecaster_refuses_an_unknown_class_and_serves_the_rest(
        nats: EmbeddedNatsServer) -> None:
    service = forecaster_service(instances=["i0"], policy="throttllem")
    decided, counters = await _decisions(nats, service,
                                         [predicted("a", "gold"), predicted("b", "standard")])
    refused = decided["a"]
    assert isinstance(refused, RequestDeferred)
    assert refused.final
    assert "unknown SLO class 'gold'" in refused.reason
    assert "--slo-config" in refused.reason
    assert isinstance(decided["b"], RequestAdmitted)  # the next request is not held up
    assert counters["requests_rejected.unknown_slo_class"] == 1
    assert service.metrics.value("throttllem_refusals_total",
                                 {"reason": "unknown_slo_class"}) == 1
    assert service.metrics.value("throttllem_admissions_total", {"instance": "i0"}) == 1
    assert not any(k.startswith("handler_errors") for k in counters)  # acked, not retried


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_class_from_the_file_is_planned_with(nats: EmbeddedNatsServer) -> None:
    classes = parse_slo_classes("[gold]\ntbt_ms = 30\n")
    service = forecaster_service(instances=["i0"], policy="throttllem", slo_classes=classes)
    decided, _ = await _decisions(nats, service, [predicted("a", "gold")])
    assert isinstance(decided["a"], RequestAdmitted)
    assert service.controller.trackers["i0"].requests == ["a"]


def test_the_evaluator_is_steered_and_scored_by_the_file(tmp_path: Path) -> None:
    from throttllem._eval import EvalOptions, evaluate  # noqa: PLC0415
    from throttllem._eval.driver import to_document  # noqa: PLC0415

    base = EvalOptions(trace="conv", minutes=0.5, instances=1, time_scale=False,
                       policies=["default", "freq"], length_error="0", seed=0)
    loose = evaluate(base)
    # A mean-TBT bound between what the top clock and the floor clock give on this window
    # (7.5 and 8.5 ms at the median): the controller must keep the clock up.
    tight_file = tmp_path / "slo.toml"
    tight_file.write_text("[tight]\ntbt_ms = 9.0\n")
    opts = EvalOptions(**{**{f: getattr(base, f) for f in base.__struct_fields__},
                          "slo_config": tight_file, "slo_class": "tight"})
    tight = evaluate(opts)
    freq_loose, freq_tight = loose.runs["freq"].report, tight.runs["freq"].report
    assert freq_tight.mean_sm_clock_mhz > freq_loose.mean_sm_clock_mhz + 100
    assert freq_tight.energy_j > freq_loose.energy_j
    # Scored by the file's class: the top clock meets the default class for every request of
    # this window, but not the tight one.
    assert loose.runs["default"].report.slo_attainment == 1.0
    assert tight.runs["default"].report.slo_attainment < 1.0
    assert tight.slo_classes["tight"].tbt_ms == 9.0
    document = json.loads(json.dumps(to_document(tight, opts)))
    assert document["slo_classes"]["tight"]["tbt_ms"] == 9.0
    assert document["options"]["slo_config"] == str(tight_file)
    with pytest.raises(ConfigError, match="unknown SLO class 'tight'"):
        evaluate(EvalOptions(**{**{f: getattr(base, f) for f in base.__struct_fields__},
                                "slo_class": "tight"}))
