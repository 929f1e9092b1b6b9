"""Container images, checked offline: the locked dependency sets agree with pyproject.toml
(every dependency pinned to a release its specifier allows, every file hashed), and every
Containerfile installs from its lock alone, hash-checked, and runs as a non-root user."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "deploy" / "requirements"
CONTAINERFILES = sorted((ROOT / "services").glob("*/Containerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The images' interpreter: markers in pyproject.toml are evaluated for it.
IMAGE_ENV = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.0",
             "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+?)(?:\s*;.*)?\s*\\?$")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def parse_lock(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, its hashes); fails on any line that is not a pin or a hash."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current: str | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            assert current is not None, f"{path.name}:{number}: a hash before any pin"
            assert HASH.fullmatch(line.rstrip(" \\")), f"{path.name}:{number}: {line}"
            pins[current][1].append(line)
            continue
        match = PIN.match(line)
        assert match, f"{path.name}:{number}: not an exact pin (name==version): {line}"
        current = canonicalize_name(match["name"])
        assert current not in pins, f"{path.name}: {current} pinned twice"
        pins[current] = (Version(match["version"]), [])
    for name, (_, hashes) in pins.items():
        assert hashes, f"{path.name}: {name} has no hash (pip --require-hashes would refuse)"
    return pins


def wanted(requirements: list[str]) -> list[Requirement]:
    """The requirements that apply in the image, the project's own extras expanded."""
    out: list[Requirement] = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        if canonicalize_name(req.name) == "throttllem":
            for extra in req.extras:
                out += wanted(PYPROJECT["project"]["optional-dependencies"][extra])
            continue
        out.append(req)
    return out


def build_inputs() -> list[str]:
    lines = (LOCKS / "build.in").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


EXPECTED = {
    "runtime.lock": PYPROJECT["project"]["dependencies"],
    "gateway.lock": [*PYPROJECT["project"]["dependencies"], "throttllem[gateway]"],
    "build.lock": [*build_inputs(), *PYPROJECT["build-system"]["requires"]],
}


@pytest.mark.parametrize("lock", sorted(EXPECTED))
def test_every_dependency_is_locked_to_an_allowed_release_with_hashes(lock: str) -> None:
    pins = parse_lock(LOCKS / lock)
    requirements = wanted(EXPECTED[lock])
    assert requirements
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock} lacks {req} (pyproject.toml changed: run `just lock`)"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, outside {req} (run `just lock`)")


def test_the_gateway_lock_agrees_with_the_runtime_lock_where_they_overlap() -> None:
    """One release of a package across the images, so that a fix reaches all of them."""
    runtime, gateway = parse_lock(LOCKS / "runtime.lock"), parse_lock(LOCKS / "gateway.lock")
    assert runtime.keys() <= gateway.keys()
    assert {n: runtime[n][0] for n in runtime} == {n: gateway[n][0] for n in runtime}


# --------------------------------------------------------------------------- Containerfiles


def instructions(containerfile: Path) -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in containerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line.removesuffix(chr(92)).strip()}".strip()
        if not line.endswith("\\"):
            out.append(pending)
            pending = ""
    assert not pending, f"{containerfile}: ends inside a continued line"
    return out


def stages(containerfile: Path) -> list[list[str]]:
    result: list[list[str]] = []
    for instruction in instructions(containerfile):
        if instruction.startswith("FROM "):
            result.append([])
        assert result, f"{containerfile}: {instruction} before FROM"
        result[-1].append(instruction)
    return result


def pip_commands(stage: list[str]) -> list[str]:
    """The pip commands of a stage's RUN instructions (RUN and its --mount options dropped)."""
    runs = [re.sub(r"^RUN (--mount=\S+ )*", "", i) for i in stage if i.startswith("RUN ")]
    return [cmd.strip() for run in runs for cmd in re.split(r"&&|;", run)
            if re.search(r"\bpip (install|wheel)\b", cmd)]


def lock_of(containerfile: Path) -> str:
    return "gateway.lock" if containerfile.parent.name == "gateway" else "runtime.lock"


@pytest.mark.parametrize("containerfile", CONTAINERFILES, ids=lambda p: p.parent.name)
def test_images_install_only_what_the_lock_hashes(containerfile: Path) -> None:
    build, final = stages(containerfile)
    lock = lock_of(containerfile)
    assert f"COPY deploy/requirements/build.lock deploy/requirements/{lock} ./" in build
    pins = parse_lock(LOCKS / lock)
    from_index = 0
    for cmd in pip_commands(build):
        if "--no-deps" in cmd:  # the project itself, built from the checkout
            assert cmd.endswith(" ."), cmd
            assert "--no-build-isolation" in cmd, cmd
            continue
        assert "--require-hashes" in cmd, f"{containerfile.parent.name}: {cmd}"
        assert "--only-binary :all:" in cmd, cmd
        assert re.search(r"-r (build\.lock|" + re.escape(lock) + ")$", cmd), cmd
        for name in re.findall(r"--no-binary (\S+)", cmd):  # sources only where no wheel is
            assert canonicalize_name(name) in pins, f"--no-binary {name}: not in {lock}"
        from_index += 1
    assert from_index == 2, "the build stage installs build.lock and builds the service's lock"
    installs = pip_commands(final)
    assert installs == ["pip install --no-cache-dir --no-index --no-deps /wheels/*.whl"], (
        "the image installs the build stage's wheels only, offline")
    assert any(i.startswith("RUN --mount=type=bind,from=build,source=/wheels,target=/wheels")
               for i in final)
    assert any("pip check" in i for i in final), "the installed set is checked for consistency"


@pytest.mark.parametrize("containerfile", CONTAINERFILES, ids=lambda p: p.parent.name)
def test_images_run_as_a_non_root_user(containerfile: Path) -> None:
    final = stages(containerfile)[-1]
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users, f"{containerfile.parent.name}: no USER (root by default)"
    assert users[-1] == "tllm"
    assert any("useradd --system --uid 10001 tllm" in i for i in final)
