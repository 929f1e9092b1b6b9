"""Who may do what on the bus: one NATS identity per service with least-privilege subject
permissions, and the files that set it up (a CA, server and client certificates, nkeys, the
server's `authorization` block).

The permissions matrix is data (`identities()`), rendered into the server config and into
the README's table, and checked by the security suite against a real nats-server. A service
may publish only what it produces, subscribe only to what it consumes and its own reply
inbox (`_INBOX.<service>.>`: the runtime connects with that inbox prefix), and use only its
own durable JetStream consumers. No service may update or delete the stream: that is the
`admin` identity's job (an operator with the `nats` CLI).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from throttllem._busauth import BusAuth
from throttllem._errors import ConfigError
from throttllem._subjects import (
    FORECASTER_DEAD_LETTERS_DURABLE,
    LENGTH_PREDICTOR_DURABLE,
    PREFIX,
    REQUEST_STREAM,
    TELEMETRY_DURABLE,
    dead_letter,
    engine_aborts_durable,
    engine_admissions_durable,
    forecaster_durable,
    history_consumer,
    token,
)

S: Final = REQUEST_STREAM
JS_API: Final = "$JS.API"


@dataclass(frozen=True)
class Identity:
    """One NATS user: the service it runs as (its reply inbox is `_INBOX.<service>`), what it
    may publish and subscribe to, its durable consumers, and whether it answers requests."""

    name: str
    service: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    durables: tuple[tuple[str, str], ...] = ()  # (consumer name, its filter subject)
    uses_stream: bool = False
    answers_requests: bool = False
    why: str = ""
    extra_publish: tuple[str, ...] = field(default=(), repr=False)  # JetStream API, derived

    def publish_allow(self) -> list[str]:
        allow = list(self.publish)
        if self.uses_stream or self.durables:
            allow += [f"{JS_API}.STREAM.INFO.{S}", f"{JS_API}.STREAM.CREATE.{S}"]
        allow += self.dead_letters()
        for durable, filter_subject in self.durables:
            # The create subject carries the filter (nats-server >= 2.9 checks that it is the
            # config's): an identity can read only what its consumers are for.
            allow += [
                f"{JS_API}.CONSUMER.INFO.{S}.{durable}",
                f"{JS_API}.CONSUMER.CREATE.{S}.{durable}.{filter_subject}",
                f"{JS_API}.CONSUMER.DELETE.{S}.{durable}",
                f"{JS_API}.CONSUMER.MSG.NEXT.{S}.{durable}",
                f"$JS.ACK.{S}.{durable}.>",
            ]
        return allow + list(self.extra_publish)

    def dead_letters(self) -> list[str]:
        """Where its durable consumers move a message that keeps failing."""
        return sorted({dead_letter(f) for d, f in self.durables
                       if d != history_consumer(self.service)})

    def subscribe_allow(self) -> list[str]:
        return [*self.subscribe, f"_INBOX.{self.service}.>"]


def identities(instances: Sequence[str] = ("i0", "i1")) -> dict[str, Identity]:
    """The permissions matrix for a deployment with these engine instances."""
    p = PREFIX
    out: list[Identity] = [
        Identity(
            "forecaster", "forecaster",
            publish=(f"{p}.request.admitted.*", f"{p}.request.deferred", f"{p}.freq.target.*",
                     f"{p}.health.forecaster"),
            subscribe=(f"{p}.request.>", f"{p}.engine.iteration.*", f"{p}.freq.applied.*",
                       f"{p}.scale.target"),
            # One durable per policy (`forecaster-<policy>`): a policy that plans reads
            # predictions, the others read arrivals.
            durables=((forecaster_durable("default"), f"{p}.request.arrived"),
                      (forecaster_durable("retail"), f"{p}.request.arrived"),
                      (forecaster_durable("throttllem"), f"{p}.request.predicted"),
                      (FORECASTER_DEAD_LETTERS_DURABLE, f"{p}.dead.request"),
                      (history_consumer("forecaster"), f"{p}.request.>")),
            why="the only one that admits requests and sets clock targets"),
        Identity(
            "length-predictor", "length-predictor",
            publish=(f"{p}.request.predicted", f"{p}.request.deferred",
                     f"{p}.health.length-predictor"),
            subscribe=(f"{p}.request.completed", f"{p}.rpc.predict"),
            durables=((LENGTH_PREDICTOR_DURABLE, f"{p}.request.arrived"),),
            answers_requests=True,
            why="predictions; answers rpc.predict"),
        Identity(
            "telemetry", "telemetry",
            publish=(f"{p}.gpu.sample.>", f"{p}.energy.request", f"{p}.twin.gpu.*.read",
                     f"{p}.health.telemetry"),
            subscribe=(f"{p}.engine.iteration.*", f"{p}.request.completed"),
            durables=((TELEMETRY_DURABLE, f"{p}.request.completed"),),
            why="the only one that publishes GPU samples and energy records; reads twin GPUs"),
        Identity(
            "replayer", "replayer",
            publish=(f"{p}.request.arrived", f"{p}.health.replayer"), subscribe=(),
            uses_stream=True, why="a gateway stand-in: arrivals only"),
        Identity(
            "scaler", "scaler",
            publish=(f"{p}.scale.target", f"{p}.health.scaler"),
            subscribe=(f"{p}.request.>", f"{p}.engine.iteration.*", f"{p}.scale.applied"),
            why="the only one that orders instances"),
        Identity(
            "orchestrator", "orchestrator",
            publish=(f"{p}.scale.applied", f"{p}.health.orchestrator"),
            subscribe=(f"{p}.scale.target",),
            why="an orchestrator adapter (Kubernetes, podman) acting on scale.target"),
        Identity(
            "gateway", "gateway",
            publish=(f"{p}.request.arrived", f"{p}.request.aborted", f"{p}.rpc.predict",
                     f"{p}.request.completed", f"{p}.engine.iteration.*",
                     f"{p}.health.gateway"),
            subscribe=(f"{p}.request.>", f"{p}.health.*"),
            uses_stream=True,
            why="the front door; also the engine adapter of engines it fronts (vLLM)"),
        Identity(
            "demo", "demo",
            publish=(f"{p}.request.arrived", f"{p}.twin.gpu.*.read"), subscribe=(f"{p}.>",),
            uses_stream=True,
            why="`throttllem demo`'s own client: replays arrivals, watches everything"),
        Identity(
            "billing", "billing", publish=(f"{p}.health.billing",), subscribe=(),
            durables=(("billing", f"{p}.energy.request"),),
            why="reads energy records (durable `billing`) for invoices and reports"),
        Identity(
            "observer", "observer", publish=(), subscribe=(f"{p}.>",),
            why="read-only: dashboards, `nats sub 'tllm.>'`"),
    ]
    for inst in instances:
        token(inst)
        out.append(Identity(
            f"engine-{inst}", "engine",
            publish=(f"{p}.engine.iteration.{inst}", f"{p}.request.completed",
                     f"{p}.request.deferred", f"{p}.request.aborted", f"{p}.health.engine"),
            subscribe=(f"{p}.twin.gpu.{inst}.read", f"{p}.twin.gpu.{inst}.control"),
            durables=((engine_admissions_durable(inst), f"{p}.request.admitted.{inst}"),
                      (engine_aborts_durable(inst), f"{p}.request.aborted")),
            answers_requests=True,
            why=f"serves {inst}'s admissions; its twin GPU answers NVML-shaped calls"))
        out.append(Identity(
            f"actuator-{inst}", "actuator",
            publish=(f"{p}.freq.applied.{inst}", f"{p}.twin.gpu.{inst}.read",
                     f"{p}.twin.gpu.{inst}.control", f"{p}.health.actuator"),
            subscribe=(f"{p}.freq.target.{inst}",),
            why=f"the only one that locks {inst}'s GPU clocks"))
    return {i.name: i for i in out}


ADMIN: Final = "admin"


# --------------------------------------------------------------------------- server config


def _q(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def render_authorization(users: dict[str, str], matrix: dict[str, Identity]) -> str:
    """The server's `authorization` block: `users` maps identity name to its public nkey."""
    lines = ["# throttLL'eM NATS identities: one nkey user per service, least privilege.",
             "# Generated by `throttllem security init`; edit the matrix in code, not here.",
             "authorization {", "  timeout: 2", "  users: ["]
    for name, pub in users.items():
        if name == ADMIN:
            lines += [f"    # {ADMIN}: operators only (stream updates, the nats CLI)",
                      f"    {{ nkey: {json.dumps(pub)} }}"]
            continue
        ident = matrix[name]
        pub_allow = ident.publish_allow()
        perms = [f"publish: {{ allow: {_q(pub_allow)} }}" if pub_allow
                 else 'publish: { deny: [">"] }',
                 f"subscribe: {{ allow: {_q(ident.subscribe_allow())} }}"]
        if ident.answers_requests:
            perms.append("allow_responses: true")
        lines.append(f"    # {name}: {ident.why}")
        lines.append(f"    {{ nkey: {json.dumps(pub)}, permissions: {{")
        lines += [f"        {perm}" for perm in perms]
        lines.append("    }}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def render_secure_config(*, ca: Path, cert: Path, key: Path, mutual_tls: bool,
                         auth_include: str = "auth.conf") -> str:
    """The security part of a nats-server config: TLS required on client connections and
    the identities. Include it from a config that sets the address and JetStream, or pass it
    with `-c` alongside command-line flags (as `EmbeddedNatsServer` does)."""
    tls = [f"  cert_file: {json.dumps(str(cert))}", f"  key_file: {json.dumps(str(key))}",
           f"  ca_file: {json.dumps(str(ca))}", "  timeout: 2"]
    if mutual_tls:
        tls.append("  verify: true  # clients must present a certificate signed by the CA")
    return "\n".join([
        "# throttLL'eM: TLS required on every client connection; nkey identities.",
        "tls {", *tls, "}",
        f"include {json.dumps(auth_include)}",
        "",
    ])


def render_server_config(*, listen: str, store_dir: Path, secure_include: str) -> str:
    """A complete nats-server config: address, JetStream, the security part included, and no
    monitoring port (add `http: 127.0.0.1:8222` to have one, on loopback only)."""
    return "\n".join([
        "# nats-server for throttLL'eM: TLS required, nkey identities, JetStream.",
        f"listen: {listen}",
        "jetstream {", f"  store_dir: {json.dumps(str(store_dir))}", "}",
        f"include {json.dumps(secure_include)}",
        "",
    ])


# --------------------------------------------------------------------------- generated files


@dataclass(frozen=True)
class SecurityLayout:
    """Where `throttllem security init` puts things (all paths below `root`)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "private" / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "cert.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "key.pem"

    @property
    def auth_conf(self) -> Path:
        return self.root / "auth.conf"

    @property
    def nats_conf(self) -> Path:
        """A complete server config (`nats-server -c nats.conf`)."""
        return self.root / "nats.conf"

    @property
    def secure_conf(self) -> Path:
        """TLS and identities only: for `EmbeddedNatsServer(config=...)` or an include."""
        return self.root / "secure.conf"

    @property
    def manifest(self) -> Path:
        return self.root / "identities.json"

    def client_dir(self, identity: str) -> Path:
        return self.root / "clients" / identity

    def identities(self) -> list[str]:
        data = json.loads(self.manifest.read_text())
        return list(data["identities"])

    def auth(self, identity: str, *, tls_hostname: str | None = None) -> BusAuth:
        """The BusAuth of one generated identity (nkey seed, CA, client certificate)."""
        d = self.client_dir(identity)
        if not d.is_dir():
            raise ConfigError(f"no identity {identity!r} under {self.root}")
        cert = d / "cert.pem"
        return BusAuth(nkey_seed_file=d / "nkey.seed", ca_file=d / "ca.pem",
                       cert_file=cert if cert.exists() else None,
                       key_file=d / "key.pem" if cert.exists() else None,
                       tls_hostname=tls_hostname)

    def env(self, identity: str) -> dict[str, str]:
        """The `THROTTLLEM_NATS_*` variables that give a `throttllem run` process this
        identity (what the demo sets for each service it starts)."""
        d = self.client_dir(identity)
        env = {"THROTTLLEM_NATS_NKEY": str(d / "nkey.seed"),
               "THROTTLLEM_NATS_CA": str(d / "ca.pem")}
        if (d / "cert.pem").exists():
            env |= {"THROTTLLEM_NATS_CERT": str(d / "cert.pem"),
                    "THROTTLLEM_NATS_KEY": str(d / "key.pem")}
        return env


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with the final mode: a secret is never readable by others, not even briefly.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if secret else 0o644)


def new_user_nkey() -> tuple[bytes, str]:
    """A fresh nkey user: (seed, public key). The seed is the secret."""
    import nkeys  # noqa: PLC0415 - the nkeys package only where nkeys are made or used

    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    return seed, public


def init_security(out: Path, *, instances: Sequence[str] = ("i0", "i1"),
                  hosts: Sequence[str] = ("localhost", "127.0.0.1", "nats"),
                  mutual_tls: bool = True, days: int = 825, force: bool = False,
                  listen: str = "127.0.0.1:4222") -> SecurityLayout:
    """Generate a CA, a server certificate for `hosts`, and per identity an nkey and a client
    certificate, plus the server's `auth.conf` and a complete `nats.conf` using them."""
    from cryptography import x509  # noqa: PLC0415 - only this command needs it
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    layout = SecurityLayout(out.resolve())
    if layout.manifest.exists() and not force:
        raise ConfigError(f"{out} already holds generated credentials (identities.json); "
                          "pass --force to replace them all")
    matrix = identities(instances)
    now = dt.datetime.now(dt.UTC)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def issue(subject_cn: str, public: Any, issuer: x509.Name, signer: Any, *, ca: bool,
              extensions: list[tuple[Any, bool]], valid_days: int) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
                                            x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                               "throttLL'eM")]))
                   .issuer_name(issuer).public_key(public)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=valid_days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                                  critical=True))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "throttLL'eM NATS CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "throttLL'eM")])
    ca_cert = issue("throttLL'eM NATS CA", ca_key.public_key(), ca_name, ca_key, ca=True,
                    valid_days=max(days, 3650), extensions=[
                        (x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), True),
                        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)])
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    leaf_usage = x509.KeyUsage(digital_signature=True, content_commitment=False,
                               key_encipherment=False, data_encipherment=False,
                               key_agreement=True, key_cert_sign=False, crl_sign=False,
                               encipher_only=False, decipher_only=False)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    _write(layout.ca_cert, ca_pem, secret=False)
    _write(layout.ca_key, key_pem(ca_key), secret=True)

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue(hosts[0] if hosts else "nats", server_key.public_key(), ca_name, ca_key,
                        ca=False, valid_days=days, extensions=[
                            (x509.SubjectAlternativeName(names), False), (leaf_usage, True),
                            # Client use too: in a cluster each server dials its peers'
                            # routes with this certificate (deploy/nats-cluster.conf).
                            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                    ExtendedKeyUsageOID.CLIENT_AUTH]), False),
                            (aki, False)])
    _write(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(layout.server_key, key_pem(server_key), secret=True)

    publics: dict[str, str] = {}
    for name in [*matrix, ADMIN]:
        d = layout.client_dir(name)
        seed, public = new_user_nkey()
        publics[name] = public
        _write(d / "nkey.seed", seed + b"\n", secret=True)
        _write(d / "ca.pem", ca_pem, secret=False)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_cert = issue(name, client_key.public_key(), ca_name, ca_key, ca=False,
                            valid_days=days, extensions=[
                                (leaf_usage, True),
                                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
                                (aki, False)])
        _write(d / "cert.pem", client_cert.public_bytes(serialization.Encoding.PEM),
               secret=False)
        _write(d / "key.pem", key_pem(client_key), secret=True)

    _write(layout.auth_conf, render_authorization(publics, matrix).encode(), secret=False)
    _write(layout.secure_conf, render_secure_config(
        ca=layout.ca_cert, cert=layout.server_cert, key=layout.server_key,
        mutual_tls=mutual_tls).encode(), secret=False)
    _write(layout.nats_conf, render_server_config(
        listen=listen, store_dir=layout.root / "jetstream",
        secure_include=layout.secure_conf.name).encode(), secret=False)
    manifest = {"instances": list(instances), "hosts": list(hosts), "mutual_tls": mutual_tls,
                "identities": {n: {"nkey": publics[n]} for n in publics}}
    _write(layout.manifest, (json.dumps(manifest, indent=2) + "\n").encode(), secret=False)
    return layout


def matrix_markdown(matrix: dict[str, Identity]) -> str:
    """The permissions matrix as the README's table."""
    def short(subject: str) -> str:
        rest = subject.removeprefix(PREFIX + ".")
        return f"`{subject}` (all)" if rest == ">" else f"`{rest}`"

    rows = ["| identity | may publish | may subscribe | durable consumers (filter) |",
            "| --- | --- | --- | --- |"]
    for ident in matrix.values():
        pub = ", ".join(short(s) for s in (*ident.publish, *ident.dead_letters())) or "–"
        if ident.answers_requests:
            pub += " (+ replies to requests it receives)"
        sub = ", ".join(short(s) for s in ident.subscribe) or "–"
        durables = ", ".join(f"`{d}` (`{f.removeprefix(PREFIX + '.')}`)"
                             for d, f in ident.durables) or "–"
        rows.append(f"| `{ident.name}` | {pub} | {sub} | {durables} |")
    rows.append(f"| `{ADMIN}` | everything | everything | all (stream updates) |")
    return "\n".join(rows)
