# throttLL'eM tasks. `just --list` shows them.

LOCK_FLAGS := "--quiet --generate-hashes --python-version 3.11 --python-platform linux --custom-compile-command 'just lock'"

# run the test suite (the same command CI runs)
test *ARGS:
    pytest {{ARGS}}

# the whole system on a 2-minute window of the Azure conversation trace, against the twin
demo *ARGS:
    throttllem demo {{ARGS}}

# policies compared on a whole trace hour in simulated time (table, JSON, plots)
evaluate *ARGS:
    throttllem evaluate {{ARGS}}

# lint and type-check
lint:
    ruff check .
    mypy

# benchmarks: each prints one table and writes JSON under runs/
bench:
    for b in benchmarks/bench_*.py; do python "$b"; done

# runtime.lock (every service), gateway.lock (the gateway extra), build.lock (build stage), for
# the images' Python (3.11, Linux); it keeps the pins it can, `--upgrade` takes the newest.
# lock the images' dependencies with hashes (deploy/requirements/)
lock *ARGS:
    uv pip compile pyproject.toml {{LOCK_FLAGS}} {{ARGS}} -o deploy/requirements/runtime.lock
    uv pip compile pyproject.toml --extra gateway {{LOCK_FLAGS}} {{ARGS}} -o deploy/requirements/gateway.lock
    uv pip compile deploy/requirements/build.in {{LOCK_FLAGS}} {{ARGS}} -o deploy/requirements/build.lock

# Needs crane, skopeo or docker buildx and a reachable registry; `--check` lists what is still
# unpinned (exit 1 if any), `--update` re-resolves every tag.
# pin the base and third-party images by digest
pin-images *ARGS:
    python deploy/pin_images.py {{ARGS}}

# container images, one per service (podman or docker)
images engine="podman":
    for s in services/*/; do n=$(basename "$s"); {{engine}} build -f "$s/Containerfile" -t "throttllem-$n" .; done

# the reliability suites: chaos (each service and the NATS server killed mid-replay), the
# clock fail-safe's deaths, and a three-node cluster losing a node (THROTTLLEM_CHAOS_DOWN_S=30
# for a longer server outage)
chaos *ARGS:
    pytest tests/test_chaos.py tests/test_clock_failsafe.py tests/test_nats_cluster.py tests/test_poison.py -s {{ARGS}}
