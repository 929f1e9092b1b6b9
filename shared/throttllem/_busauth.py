"""How a client proves who it is to NATS and protects the connection: credentials and TLS.

Secrets never travel on the command line (the process list shows argv to every user) and
never reach a log: options name *files* (an nkey seed, a `.creds` file, a password or token
file), or the secret comes from the environment. A URL that carries `user:password@` still
works, but every URL this package logs or puts in an error goes through `redact_url`.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from throttllem._errors import ConfigError

log = structlog.get_logger("throttllem.bus")

ENV_PREFIX: Final = "THROTTLLEM_NATS_"
_USERINFO_RE: Final = re.compile(r"(?P<scheme>[a-z]+://)(?P<userinfo>[^@/,]*)@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL(s) with any `user:password@` or `token@` replaced by `***@`."""
    return _USERINFO_RE.sub(lambda m: f"{m.group('scheme')}***@", url)


def url_has_secret(url: str) -> bool:
    return _USERINFO_RE.search(url) is not None


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read the NATS {what} file {path}: {e.strerror}") from e
    if not text:
        raise ConfigError(f"the NATS {what} file {path} is empty")
    _warn_if_shared(path, what)
    return text


def _warn_if_shared(path: Path, what: str) -> None:
    """A secret readable by other users of the machine is worth a warning, not a refusal
    (container secrets are often mounted 0444)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and not str(path).startswith("/run/secrets/"):
        log.warning("nats.secret_file_shared", file=str(path), what=what,
                    hint="chmod 600: other users of this machine can read it")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"the NATS {what} file {path} does not exist")
    return path


@dataclass(frozen=True)
class BusAuth:
    """Credentials and TLS settings of one NATS client. All fields optional: an empty
    `BusAuth` is the plaintext, anonymous connection of a local development server."""

    creds_file: Path | None = None          # JWT + nkey seed (decentralized auth, `nsc`)
    nkey_seed_file: Path | None = None      # an nkey user's seed (`throttllem security init`)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None             # trust this CA for the server's certificate
    cert_file: Path | None = None           # client certificate (mutual TLS)
    key_file: Path | None = None
    tls_hostname: str | None = None         # name to check the server certificate against

    def __post_init__(self) -> None:
        ways = [self.creds_file, self.nkey_seed_file, self.user, self.token]
        if sum(w is not None for w in ways) > 1:
            raise ConfigError("give one NATS identity: a creds file, an nkey seed, a user "
                              "(with its password) or a token, not several")
        if self.user is not None and self.password is None:
            raise ConfigError(f"NATS user {self.user!r} has no password: set "
                              f"{ENV_PREFIX}PASSWORD_FILE (or {ENV_PREFIX}PASSWORD)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a NATS client certificate needs its key and the other way "
                              "round (--nats-cert with --nats-key)")
        for path, what in ((self.creds_file, "creds"), (self.nkey_seed_file, "nkey seed"),
                           (self.ca_file, "CA"), (self.cert_file, "client certificate"),
                           (self.key_file, "client key")):
            if path is not None:
                _require_file(path, what)
        for path, what in ((self.creds_file, "creds"), (self.nkey_seed_file, "nkey seed"),
                           (self.key_file, "client key")):
            if path is not None:
                _warn_if_shared(path, what)

    @property
    def uses_tls(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None

    def describe(self) -> dict[str, str]:
        """What a log may say about this identity: kinds and file names, never secrets."""
        out: dict[str, str] = {}
        if self.creds_file:
            out["auth"] = f"creds {self.creds_file}"
        elif self.nkey_seed_file:
            out["auth"] = f"nkey {self.nkey_seed_file}"
        elif self.user:
            out["auth"] = f"user {self.user}"
        elif self.token:
            out["auth"] = "token"
        else:
            out["auth"] = "none"
        if self.uses_tls:
            out["tls"] = "mutual" if self.cert_file else "server"
        return out

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.uses_tls:
            return None
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=str(self.ca_file) if self.ca_file else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file and self.key_file:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the NATS TLS files: {e}") from e
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`."""
        opts: dict[str, Any] = {}
        if self.creds_file:
            opts["user_credentials"] = str(self.creds_file)
        if self.nkey_seed_file:
            opts["nkeys_seed"] = str(self.nkey_seed_file)
        if self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password
        if self.token is not None:
            opts["token"] = self.token
        ctx = self.ssl_context()
        if ctx is not None:
            opts["tls"] = ctx
        if self.tls_hostname:
            opts["tls_hostname"] = self.tls_hostname
        return opts

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> BusAuth:
        """Settings from `THROTTLLEM_NATS_*` variables; `overrides` (not None) win."""
        env = os.environ if environ is None else environ

        def path(name: str) -> Path | None:
            value = env.get(ENV_PREFIX + name)
            return Path(value) if value else None

        def secret(name: str, what: str) -> str | None:
            file = path(f"{name}_FILE")
            if file is not None:
                return _read_secret(file, what)
            return env.get(ENV_PREFIX + name) or None

        identity_keys = ("creds_file", "nkey_seed_file", "user", "password", "token")
        values: dict[str, Any] = {
            "ca_file": path("CA"), "cert_file": path("CERT"), "key_file": path("KEY"),
            "tls_hostname": env.get(ENV_PREFIX + "TLS_HOSTNAME") or None,
        }
        if not any(overrides.get(k) is not None for k in identity_keys):
            # The identity from the environment, its secrets read only for the way in use.
            values |= {"creds_file": path("CREDS"), "nkey_seed_file": path("NKEY"),
                       "user": env.get(ENV_PREFIX + "USER") or None}
            if values["user"] is not None:
                values["password"] = secret("PASSWORD", "password")
            elif not (values["creds_file"] or values["nkey_seed_file"]):
                values["token"] = secret("TOKEN", "token")
        elif overrides.get("user") is not None and overrides.get("password") is None:
            values["password"] = secret("PASSWORD", "password")
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        return cls(**values)


AUTH_ENV_HELP: Final = (
    "NATS identity and TLS: the options below, or the environment variables "
    f"{ENV_PREFIX}CREDS, _NKEY, _USER, _PASSWORD or _PASSWORD_FILE, _TOKEN or _TOKEN_FILE, "
    "_CA, _CERT, _KEY, _TLS_HOSTNAME. Secrets are read from files or the environment, never "
    "from the command line.")


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """The NATS identity and TLS options shared by `throttllem run <service>` and the demo."""
    group = parser.add_argument_group("NATS identity and TLS", AUTH_ENV_HELP)
    group.add_argument("--nats-creds", type=Path, default=None, metavar="FILE",
                       help="a .creds file (JWT and nkey seed)")
    group.add_argument("--nats-nkey", type=Path, default=None, metavar="FILE",
                       help="an nkey seed file (throttllem security init writes one per service)")
    group.add_argument("--nats-user", default=None, metavar="NAME",
                       help="user name; its password from --nats-password-file or "
                            f"{ENV_PREFIX}PASSWORD")
    group.add_argument("--nats-password-file", type=Path, default=None, metavar="FILE")
    group.add_argument("--nats-token-file", type=Path, default=None, metavar="FILE")
    group.add_argument("--nats-ca", type=Path, default=None, metavar="FILE",
                       help="CA certificate: TLS, checking the server against it")
    group.add_argument("--nats-cert", type=Path, default=None, metavar="FILE",
                       help="client certificate (mutual TLS; with --nats-key)")
    group.add_argument("--nats-key", type=Path, default=None, metavar="FILE")
    group.add_argument("--nats-tls-hostname", default=None, metavar="NAME",
                       help="server name expected in its certificate (default: the URL's host)")


def auth_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> BusAuth:
    """The BusAuth of parsed `add_auth_arguments` options over the environment."""
    password = (_read_secret(args.nats_password_file, "password")
                if args.nats_password_file is not None else None)
    token = (_read_secret(args.nats_token_file, "token")
             if args.nats_token_file is not None else None)
    return BusAuth.from_env(
        environ, creds_file=args.nats_creds, nkey_seed_file=args.nats_nkey, user=args.nats_user,
        password=password, token=token, ca_file=args.nats_ca, cert_file=args.nats_cert,
        key_file=args.nats_key, tls_hostname=args.nats_tls_hostname)
