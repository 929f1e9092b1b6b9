"""The security suite: a real nats-server with the configuration `throttllem security init`
generates refuses anonymous, plaintext and certificate-less clients and every operation
outside an identity's permissions, while the services, each with its own identity, still
serve requests end to end on the twin."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import anyio
import pytest

from throttllem import BusError
from throttllem._bus import Bus, EmbeddedNatsServer
from throttllem._busauth import BusAuth, redact_url
from throttllem._cli import main as cli_main
from throttllem._engines.twin import EngineTwinService
from throttllem._events import (
    ENERGY_CODEC,
    FREQ_CODEC,
    HEALTH_CODEC,
    REQUEST_CODEC,
    FreqEvent,
    Heartbeat,
    RequestArrived,
    RequestCompleted,
    RequestEnergy,
    RequestEvent,
    encode,
)
from throttllem._perf.runtime import load_perf_model
from throttllem._runtime import Clock
from throttllem._security import ADMIN, SecurityLayout, identities
from throttllem._services.actuator import ActuatorService
from throttllem._services.length_predictor import LengthPredictorService
from throttllem._services.replayer import replay
from throttllem._setup import DEFAULT_SETUP
from throttllem._subjects import (
    ENERGY_REQUEST,
    FREQ_APPLIED_ALL,
    HEALTH_ALL,
    REQUEST_COMPLETED,
)
from throttllem.testing import forecaster_service

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Who may publish each sensitive subject: written from the design (services/README.md), not
# from the matrix under test. Every other identity must be refused.
MAY_PUBLISH: dict[str, set[str]] = {
    "tllm.v1.request.admitted.i0": {"forecaster"},
    "tllm.v1.freq.target.i0": {"forecaster"},
    "tllm.v1.twin.gpu.i0.control": {"actuator-i0"},
    "tllm.v1.freq.applied.i0": {"actuator-i0"},
    "tllm.v1.engine.iteration.i0": {"engine-i0", "gateway"},
    "tllm.v1.request.completed": {"engine-i0", "engine-i1", "gateway"},
    "tllm.v1.energy.request": {"telemetry"},
    "tllm.v1.gpu.sample.node0.0": {"telemetry"},
    "tllm.v1.scale.target": {"scaler"},
    "tllm.v1.scale.applied": {"orchestrator"},
    "tllm.v1.request.arrived": {"replayer", "gateway", "demo"},
    "tllm.v1.request.predicted": {"length-predictor"},
    "tllm.v1.health.forecaster": {"forecaster"},
    "$JS.API.STREAM.UPDATE.TLLM_REQUESTS": set(),
    "$JS.API.STREAM.DELETE.TLLM_REQUESTS": set(),
    "$JS.API.STREAM.PURGE.TLLM_REQUESTS": set(),
    "$JS.API.CONSUMER.MSG.NEXT.TLLM_REQUESTS.engine-i0": {"engine-i0"},
    "$JS.API.CONSUMER.DELETE.TLLM_REQUESTS.telemetry": {"telemetry"},
}
# Snooping: reading another service's replies or the prompts sent to the predictor (the
# read-only identities see every tllm subject: arrivals carry the prompts anyway).
MAY_SUBSCRIBE: dict[str, set[str]] = {
    "_INBOX.forecaster.>": {"forecaster"},
    "tllm.v1.rpc.predict": {"length-predictor", "demo", "observer"},
    "tllm.v1.freq.target.i0": {"actuator-i0", "demo", "observer"},
}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> SecurityLayout:
    out = tmp_path_factory.mktemp("secrets")
    assert cli_main(["security", "init", "--out", str(out), "--instances", "i0,i1",
                     "--force"]) == 0
    return SecurityLayout(out)


@pytest.fixture
def secure_nats(layout: SecurityLayout, tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer(store_dir=tmp_path / "nats", config=layout.secure_conf, tls=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def connect_as(server: EmbeddedNatsServer, layout: SecurityLayout, identity: str) -> Bus:
    service = identities()[identity].service if identity != ADMIN else None
    return await Bus.connect(server.url, name=identity, auth=layout.auth(identity),
                             service=service, connect_timeout_s=2.0)


def test_init_keeps_secrets_private_and_out_of_the_server_config(
        layout: SecurityLayout, capsys: pytest.CaptureFixture[str]) -> None:
    names = layout.identities()
    assert set(identities()) | {ADMIN} == set(names)
    for name in names:
        d = layout.client_dir(name)
        for secret in ("nkey.seed", "key.pem"):
            assert (d / secret).stat().st_mode & 0o077 == 0, f"{name}/{secret} is readable"
        assert (d / "nkey.seed").read_text().startswith("SU")  # an nkey user seed
    assert layout.ca_key.stat().st_mode & 0o077 == 0
    public = layout.auth_conf.read_text() + layout.nats_conf.read_text() + \
        layout.secure_conf.read_text() + layout.manifest.read_text()
    for name in names:
        assert (layout.client_dir(name) / "nkey.seed").read_text().strip() not in public
    assert "http" not in layout.nats_conf.read_text()  # no monitoring port
    assert cli_main(["security", "init", "--out", str(layout.root)]) == 2  # never overwrites
    assert "already holds generated credentials" in capsys.readouterr().err


async def test_a_client_without_credentials_is_refused(
        secure_nats: EmbeddedNatsServer, layout: SecurityLayout) -> None:
    demo = layout.client_dir("demo")
    anonymous = BusAuth(ca_file=demo / "ca.pem", cert_file=demo / "cert.pem",
                        key_file=demo / "key.pem")
    with pytest.raises(BusError, match="refused the credentials"):
        await Bus.connect(secure_nats.url, name="anonymous", auth=anonymous,
                          connect_timeout_s=2.0)


async def test_a_client_without_a_certificate_is_refused(
        secure_nats: EmbeddedNatsServer, layout: SecurityLayout) -> None:
    demo = layout.client_dir("demo")
    no_cert = BusAuth(nkey_seed_file=demo / "nkey.seed", ca_file=demo / "ca.pem")
    with pytest.raises(BusError):
        await Bus.connect(secure_nats.url, name="no-cert", auth=no_cert, connect_timeout_s=2.0)


async def test_a_client_that_does_not_trust_the_ca_is_refused(
        secure_nats: EmbeddedNatsServer, layout: SecurityLayout) -> None:
    demo = layout.client_dir("demo")
    system_trust = BusAuth(nkey_seed_file=demo / "nkey.seed", cert_file=demo / "cert.pem",
                           key_file=demo / "key.pem")
    with pytest.raises(BusError, match="TLS"):
        await Bus.connect(secure_nats.url, name="no-ca", auth=system_trust,
                          connect_timeout_s=2.0)


def test_a_plaintext_connection_is_refused(secure_nats: EmbeddedNatsServer) -> None:
    """The NATS protocol in the clear, as a client that ignores `tls_required` would speak
    it: the server answers with an error and never with PONG."""
    port = int(secure_nats.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        info = sock.recv(4096).decode()
        assert info.startswith("INFO ")
        assert json.loads(info[5:])["tls_required"] is True
        sock.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        answer = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            answer += chunk
    assert b"PONG" not in answer
    assert answer == b"" or answer.startswith(b"-ERR") or answer[:1] == b"\x15", answer[:80]


async def test_every_identity_is_refused_outside_its_permissions(
        secure_nats: EmbeddedNatsServer, layout: SecurityLayout) -> None:
    refused_total: Counter[str] = Counter()
    for name in identities():
        bus = await connect_as(secure_nats, layout, name)
        try:
            for subject in MAY_PUBLISH:
                await bus.nc.publish(subject, b"{}")
            for subject in MAY_SUBSCRIBE:
                await bus.nc.subscribe(subject)
            await bus.sync()
            # (nats-py reports the refused subjects in lower case)
            expected_pub = {s.lower() for s, who in MAY_PUBLISH.items() if name not in who}
            expected_sub = sum(name not in who for who in MAY_SUBSCRIBE.values())
            with anyio.fail_after(5):
                while (bus.counters["refused.publish"] < len(expected_pub)
                       or bus.counters["refused.subscribe"] < expected_sub):
                    await anyio.sleep(0.02)
            await anyio.sleep(0.1)
            assert bus._refused_subjects == expected_pub, name
            assert bus.counters["refused.publish"] == len(expected_pub), name
            assert bus.counters["refused.subscribe"] == expected_sub, name
            refused_total["publish"] += bus.counters["refused.publish"]
            refused_total["subscribe"] += bus.counters["refused.subscribe"]
            # The one thing it must be allowed: its own reply inbox works (a core request).
        finally:
            await bus.close()
    print(f"refused: {refused_total['publish']} publishes, "
          f"{refused_total['subscribe']} subscriptions over {len(identities())} identities")
    assert refused_total["publish"] > 0


async def test_an_identity_cannot_use_another_services_consumer(
        secure_nats: EmbeddedNatsServer, layout: SecurityLayout) -> None:
    engine = await connect_as(secure_nats, layout, "engine-i0")
    telemetry = await connect_as(secure_nats, layout, "telemetry")
    try:
        await engine.ensure_request_stream()
        with anyio.fail_after(30), pytest.raises(BusError, match="refused this identity"):
            await telemetry.consume(durable="engine-i0", subject="tllm.v1.request.admitted.i0",
                                    codec=REQUEST_CODEC, handler=_ignore)
        # Nor its own consumer name on another filter (reading prompts, say).
        with anyio.fail_after(30), pytest.raises(BusError, match="refused this identity"):
            await telemetry.consume(durable="telemetry", subject="tllm.v1.request.arrived",
                                    codec=REQUEST_CODEC, handler=_ignore)
        with anyio.fail_after(30), pytest.raises(BusError, match="refused this identity"):
            await telemetry.publish_durable("tllm.v1.request.admitted.i0", RequestArrived(
                id="forged", arrival_s=0.0, prompt_tokens=1), timeout_s=1.0)
        assert telemetry.counters["refused.publish"] >= 3
    finally:
        await engine.close()
        await telemetry.close()


async def _ignore(_: object) -> None:
    return None


async def test_the_forecaster_reads_the_stream_back_under_its_fixed_consumer_name(
        secure_nats: EmbeddedNatsServer, layout: SecurityLayout) -> None:
    """`Bus.history` uses one consumer name per service (its permissions name it), replacing
    a leftover of an earlier run, so a restarted forecaster reads the stream again."""
    replayer = await connect_as(secure_nats, layout, "replayer")
    forecaster = await connect_as(secure_nats, layout, "forecaster")
    try:
        await replayer.ensure_request_stream()
        for n in range(3):
            await replayer.publish_durable("tllm.v1.request.arrived", RequestArrived(
                id=f"h{n}", arrival_s=float(n), prompt_tokens=5), msg_id=f"h{n}")
        for _ in range(2):  # the second read replaces the first one's consumer
            events = await forecaster.history("tllm.v1.request.>", REQUEST_CODEC)
            assert [e.id for e in events if isinstance(e, RequestArrived)] == ["h0", "h1", "h2"]
        assert not [k for k in forecaster.counters if k.startswith("refused")]
    finally:
        await replayer.close()
        await forecaster.close()


async def test_admin_may_update_the_stream_and_services_may_not(
        secure_nats: EmbeddedNatsServer, layout: SecurityLayout) -> None:
    replayer = await connect_as(secure_nats, layout, "replayer")
    admin = await connect_as(secure_nats, layout, ADMIN)
    try:
        await replayer.ensure_request_stream()
        await admin.ensure_request_stream(max_age_s=3600)  # a changed config: admin updates
        assert admin.counters["stream_update_refused"] == 0
        await replayer.ensure_request_stream(max_age_s=600)  # a service may not: it goes on
        assert replayer.counters["stream_update_refused"] == 1
        info = await admin.js.stream_info("TLLM_REQUESTS")
        assert info.config.max_age == 3600
    finally:
        await replayer.close()
        await admin.close()


async def test_services_with_their_own_identities_serve_requests_end_to_end(
        secure_nats: EmbeddedNatsServer, layout: SecurityLayout, tmp_path: Path) -> None:
    """The throttLL'eM pipeline on the twin, every service with its own identity: replayer
    -> length predictor -> forecaster -> engine, actuator on the twin GPU, telemetry as a
    `throttllem run` process given its identity by command-line options."""
    clock = Clock(epoch_wall_s=time.time())
    observer = await connect_as(secure_nats, layout, "observer")
    billing = await connect_as(secure_nats, layout, "billing")
    completed: dict[str, RequestCompleted] = {}
    energy: dict[str, RequestEnergy] = {}
    applied: list[FreqEvent] = []
    beats: set[str] = set()

    async def on_request(event: RequestEvent) -> None:
        if isinstance(event, RequestCompleted):
            completed[event.id] = event

    async def on_energy(record: RequestEnergy) -> None:
        energy[record.id] = record

    async def on_applied(event: FreqEvent) -> None:
        applied.append(event)

    async def on_beat(beat: Heartbeat) -> None:
        beats.add(beat.service)

    await observer.subscribe(REQUEST_COMPLETED, REQUEST_CODEC, on_request)
    await observer.subscribe(FREQ_APPLIED_ALL, FREQ_CODEC, on_applied)
    await observer.subscribe(HEALTH_ALL, HEALTH_CODEC, on_beat)
    services = {
        "engine-i0": EngineTwinService(instance="i0"),
        "actuator-i0": ActuatorService(instance="i0", backend="twin"),
        "length-predictor": LengthPredictorService(oracle=0.0),
        "forecaster": forecaster_service(instances=["i0"], policy="throttllem",
                                         perf=load_perf_model(DEFAULT_SETUP)),
    }
    buses: dict[str, Bus] = {}
    telemetry = _start_telemetry(secure_nats.url, layout, tmp_path / "telemetry.log")
    try:
        async with anyio.create_task_group() as tg:
            for name, service in services.items():
                bus = await connect_as(secure_nats, layout, name)
                buses[name] = bus
                await tg.start(service.run, bus, clock)
                await bus.publish(f"tllm.v1.health.{service.name}", Heartbeat(
                    service=service.name, instance_id=name, version="t", now_s=clock.now_s(),
                    uptime_s=0.0))
            await tg.start(partial(billing.consume, durable="billing", subject=ENERGY_REQUEST,
                                   codec=ENERGY_CODEC, handler=on_energy))
            with anyio.fail_after(60):
                while "service.ready" not in _read(tmp_path / "telemetry.log"):
                    assert telemetry.poll() is None, _read(tmp_path / "telemetry.log")[-3000:]
                    await anyio.sleep(0.1)
            replayer = await connect_as(secure_nats, layout, "replayer")
            buses["replayer"] = replayer
            start = clock.now_s() + 0.2
            requests = [RequestArrived(id=f"s{n}", arrival_s=start + 0.1 * n,
                                       prompt_tokens=100 + 10 * n, true_output_tokens=8 + n)
                        for n in range(6)]
            await replay(replayer, clock, requests)
            # The gateway asks the predictor directly; the answer comes to its own inbox.
            gateway = await connect_as(secure_nats, layout, "gateway")
            buses["gateway"] = gateway
            answer = await gateway.nc.request("tllm.v1.rpc.predict", encode(requests[0]),
                                              timeout=10)
            assert b'"request.predicted"' in answer.data
            with anyio.fail_after(60):
                while len(completed) < len(requests) or len(energy) < len(requests):
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    finally:
        telemetry.terminate()
        telemetry.wait(timeout=15)
        for bus in [*buses.values(), observer, billing]:
            await bus.close()
    assert set(completed) == set(energy) == {r.id for r in requests}
    assert applied, "the actuator applied no clock target"
    assert all(getattr(a, "error", None) is None for a in applied)
    assert {"forecaster", "engine", "actuator", "length-predictor", "telemetry"} <= beats
    for name, bus in [*buses.items(), ("observer", observer), ("billing", billing)]:
        refused = {k: v for k, v in bus.counters.items() if k.startswith("refused")}
        assert refused == {}, f"{name} was refused: {refused}"
        assert not [k for k in bus.counters if k.startswith("handler_errors")], name
    log_text = _read(tmp_path / "telemetry.log")
    assert (layout.client_dir("telemetry") / "nkey.seed").read_text().strip() not in log_text


def _start_telemetry(url: str, layout: SecurityLayout, log_path: Path) -> subprocess.Popen[bytes]:
    """As the demo starts a service: its identity in THROTTLLEM_NATS_* variables."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "throttllem", "run", "telemetry", "--gpu", "twin",
             "--instances", "i0", "--interval", "0.2", "--nats", url],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, **layout.env("telemetry"), "PYTHONUNBUFFERED": "1"})


def test_run_options_name_files_and_never_take_secrets(layout: SecurityLayout) -> None:
    from throttllem._busauth import auth_from_args  # noqa: PLC0415
    from throttllem._cli import build_parser  # noqa: PLC0415

    d = layout.client_dir("forecaster")
    args = build_parser().parse_args([
        "run", "forecaster", "--instances", "i0", "--nats", "tls://localhost:4222",
        "--nats-nkey", str(d / "nkey.seed"), "--nats-ca", str(d / "ca.pem"),
        "--nats-cert", str(d / "cert.pem"), "--nats-key", str(d / "key.pem")])
    auth = auth_from_args(args, environ={})
    assert auth == layout.auth("forecaster")
    assert auth.describe() == {"auth": f"nkey {d / 'nkey.seed'}", "tls": "mutual"}
    with pytest.raises(SystemExit):  # there is no option that takes a secret itself
        build_parser().parse_args(["run", "forecaster", "--instances", "i0",
                                   "--nats-password", "x"])


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_the_deploy_config_is_valid_with_generated_secrets(
        layout: SecurityLayout, tmp_path: Path) -> None:
    """deploy/nats.conf (secure by default) loads with what `security init` wrote, at the
    paths compose.yaml mounts; every identity compose.yaml mounts exists."""
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    (tmp_path / "secrets").symlink_to(layout.root)
    conf = (deploy / "nats.conf").read_text().replace("/etc/nats/secrets", str(layout.root))
    conf = conf.replace("/data/jetstream", str(tmp_path / "js"))
    (tmp_path / "nats.conf").write_text(conf)
    from throttllem._bus import find_nats_server  # noqa: PLC0415

    check = subprocess.run([str(find_nats_server()), "-c", str(tmp_path / "nats.conf"), "-t"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "verify: true" in conf
    assert "http: 127.0.0.1:8222" in conf
    compose = (deploy / "compose.yaml").read_text()
    mounted = set(re.findall(r"\./secrets/clients/([\w-]+):/run/secrets/nats", compose))
    assert mounted
    assert mounted <= set(layout.identities())
    assert '"8222:8222"' not in compose


def test_urls_with_credentials_are_redacted() -> None:
    assert redact_url("nats://svc:hunter2@nats:4222") == "nats://***@nats:4222"
    assert redact_url("tls://tok@a:1,tls://u:p@b:2") == "tls://***@a:1,tls://***@b:2"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_secrets_come_from_files_or_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    auth = BusAuth.from_env({"THROTTLLEM_NATS_USER": "svc",
                             "THROTTLLEM_NATS_PASSWORD_FILE": str(secret)})
    assert auth.connect_options() == {"user": "svc", "password": "s3cret"}
    assert "s3cret" not in repr(auth)
    assert "s3cret" not in str(auth.describe())
    token = BusAuth.from_env({"THROTTLLEM_NATS_TOKEN": "t0k"})
    assert token.connect_options() == {"token": "t0k"}
    with pytest.raises(ValueError, match="no password"):
        BusAuth.from_env({"THROTTLLEM_NATS_USER": "svc"})
    with pytest.raises(ValueError, match="does not exist"):
        BusAuth(nkey_seed_file=tmp_path / "missing.seed")


async def test_password_and_token_identities_work_against_a_real_server(tmp_path: Path) -> None:
    """The other ways to authenticate, read from files: right secret in, wrong one refused."""
    (tmp_path / "users.conf").write_text(
        'authorization { users: [ { user: "svc", password: "s3cret-pw" } ] }\n')
    (tmp_path / "right").write_text("s3cret-pw\n")
    (tmp_path / "wrong").write_text("guess\n")
    for f in ("right", "wrong"):
        (tmp_path / f).chmod(0o600)
    server = EmbeddedNatsServer(store_dir=tmp_path / "nats", config=tmp_path / "users.conf")
    url = server.start()
    try:
        good = BusAuth.from_env({"THROTTLLEM_NATS_USER": "svc",
                                 "THROTTLLEM_NATS_PASSWORD_FILE": str(tmp_path / "right")})
        bus = await Bus.connect(url, name="svc", auth=good, connect_timeout_s=2.0)
        await bus.close()
        bad = BusAuth.from_env({"THROTTLLEM_NATS_USER": "svc",
                                "THROTTLLEM_NATS_PASSWORD_FILE": str(tmp_path / "wrong")})
        with pytest.raises(BusError, match="refused the credentials") as refused:
            await Bus.connect(url, name="svc", auth=bad, connect_timeout_s=2.0)
        assert "guess" not in str(refused.value)
    finally:
        server.stop()
    (tmp_path / "token.conf").write_text('authorization { token: "t0ken-value" }\n')
    server = EmbeddedNatsServer(store_dir=tmp_path / "nats2", config=tmp_path / "token.conf")
    url = server.start()
    try:
        bus = await Bus.connect(url, name="svc", connect_timeout_s=2.0,
                                auth=BusAuth.from_env({"THROTTLLEM_NATS_TOKEN": "t0ken-value"}))
        await bus.close()
        with pytest.raises(BusError, match="refused the credentials"):
            await Bus.connect(url, name="svc", connect_timeout_s=2.0,
                              auth=BusAuth.from_env({"THROTTLLEM_NATS_TOKEN": "nope"}))
    finally:
        server.stop()
