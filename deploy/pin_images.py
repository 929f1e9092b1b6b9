"""Pin the third-party images of the production manifests by digest (`just pin-images`).

A tag (`nats:2.10-alpine`) is mutable: the registry may serve other bytes tomorrow. A digest
is not. This finds every image reference in services/*/Containerfile (`FROM`) and in
deploy/compose*.yaml and deploy/k8s/ (`image:`), asks a registry what each tag names now,
with whichever standard tool is installed (crane, skopeo, or docker buildx imagetools), and
rewrites the reference as `name:tag@sha256:...` in place: the tag stays for readers, the
digest is what gets pulled (the multi-architecture index, so every platform keeps its own
image). The project's own images (`throttllem-*`) are pinned where they are pushed, in the
kustomization's `images:`.

    python deploy/pin_images.py             # pin what is unpinned
    python deploy/pin_images.py --update    # re-resolve every tag (a newer base image)
    python deploy/pin_images.py --check     # list unpinned references; exit 1 if any

deploy/unpinned-images.txt lists the references knowingly left unpinned; pinning updates it
and a test keeps it equal to what the files hold, so that no new tag-only reference slips in.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACKNOWLEDGED = Path("deploy") / "unpinned-images.txt"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
OWN_IMAGE = "throttllem-"
_FROM = re.compile(r"^(?P<head>FROM\s+(?:--platform=\S+\s+)?)(?P<ref>\S+)(?P<tail>.*)$")
_IMAGE = re.compile(r"""^(?P<head>\s*(?:-\s+)?image:\s*["']?)(?P<ref>[^\s"'#]+)(?P<tail>.*)$""")
_STAGE = re.compile(r"\s+AS\s+(\S+)", re.I)


class PinError(Exception):
    """A reference that cannot be resolved to a digest here (no tool, no registry)."""


@dataclass(frozen=True)
class ImageRef:
    """One image reference: where it is, and the text that names the image."""

    path: Path
    line: int
    ref: str

    @property
    def pinned(self) -> bool:
        return is_pinned(self.ref)

    @property
    def own(self) -> bool:
        name = self.ref.rsplit("/", 1)[-1]
        return name.startswith(OWN_IMAGE)


def is_pinned(ref: str) -> bool:
    return "@" in ref and DIGEST.fullmatch(ref.rsplit("@", 1)[1]) is not None


def unpinned_form(ref: str) -> str:
    """The reference without its digest (what the tag names)."""
    return ref.rsplit("@", 1)[0] if "@" in ref else ref


def manifests(root: Path) -> list[Path]:
    """The production manifests: what builds or runs the images."""
    files = sorted(root.glob("services/*/Containerfile"))
    files += sorted(root.glob("deploy/compose*.yaml"))
    files += sorted((root / "deploy" / "k8s").rglob("*.yaml"))
    return files


def references_in(path: Path) -> list[ImageRef]:
    refs: list[ImageRef] = []
    stages: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if path.name == "Containerfile":
            match = _FROM.match(line)
            if match is None:
                continue
            ref = match["ref"]
            stage = _STAGE.search(match["tail"])
            if stage:
                stages.add(stage[1].lower())
            if ref.lower() in stages or ref == "scratch":
                continue  # an earlier stage, not an image
        else:
            match = _IMAGE.match(line)
            if match is None or "${" in match["ref"]:
                continue
            ref = match["ref"]
        refs.append(ImageRef(path, number, ref))
    return refs


def find_references(root: Path = ROOT) -> list[ImageRef]:
    return [ref for path in manifests(root) for ref in references_in(path)]


def unpinned(refs: Iterable[ImageRef]) -> list[str]:
    """The third-party references named by tag alone, each once, sorted."""
    return sorted({r.ref for r in refs if not r.pinned and not r.own})


# --------------------------------------------------------------------------- resolving


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PinError(f"{argv[0]}: {e}") from e
    if done.returncode != 0:
        raise PinError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def _crane(ref: str) -> str:
    return _run(["crane", "digest", ref])


def _skopeo(ref: str) -> str:
    # Digest: of the manifest the tag names (for a multi-platform image, its index).
    return _run(["skopeo", "inspect", "--format", "{{.Digest}}", f"docker://{ref}"])


def _docker(ref: str) -> str:
    manifest = json.loads(_run(["docker", "buildx", "imagetools", "inspect", ref,
                                "--format", "{{json .Manifest}}"]))
    return str(manifest["digest"])


TOOLS: dict[str, Callable[[str], str]] = {"crane": _crane, "skopeo": _skopeo, "docker": _docker}


def resolve_digest(ref: str) -> str:
    """sha256:... of what `ref`'s tag names now, from the first installed tool that answers."""
    errors: list[str] = []
    for tool, resolve in TOOLS.items():
        if shutil.which(tool) is None:
            continue
        try:
            digest = resolve(unpinned_form(ref))
        except (PinError, ValueError, KeyError) as e:
            errors.append(f"{tool}: {e}")
            continue
        if DIGEST.fullmatch(digest) is None:
            errors.append(f"{tool}: answered {digest!r}, not a sha256 digest")
            continue
        return digest
    if not errors:
        raise PinError(f"cannot resolve {ref}: install crane, skopeo or docker (with buildx), "
                       "on a machine that reaches the registry")
    raise PinError(f"cannot resolve {ref}: " + "; ".join(errors))


# --------------------------------------------------------------------------- rewriting


def pin(root: Path = ROOT, *, resolve: Callable[[str], str] = resolve_digest,
        update: bool = False) -> dict[str, str]:
    """Rewrite every third-party reference that is unpinned (with `update`, every one) as
    `name:tag@digest`; returns old -> new. Nothing is written unless all resolve."""
    refs = [r for r in find_references(root) if not r.own and (update or not r.pinned)]
    wanted = sorted({r.ref for r in refs})
    digests = {ref: resolve(unpinned_form(ref)) for ref in wanted}
    changes = {ref: f"{unpinned_form(ref)}@{digest}" for ref, digest in digests.items()
               if f"{unpinned_form(ref)}@{digest}" != ref}
    by_file: dict[Path, set[int]] = {}
    for r in refs:
        if r.ref in changes:
            by_file.setdefault(r.path, set()).add(r.line)
    for path, lines in by_file.items():
        text = path.read_text().splitlines(keepends=True)
        for number in lines:
            line = text[number - 1]
            match = (_FROM if path.name == "Containerfile" else _IMAGE).match(line.rstrip("\n"))
            assert match is not None, f"{path}:{number} moved while pinning"
            ending = line[len(line.rstrip("\n")):]
            text[number - 1] = (match["head"] + changes[match["ref"]] + match["tail"] + ending)
        path.write_text("".join(text))
    write_acknowledged(root, unpinned(find_references(root)))
    return changes


def read_acknowledged(root: Path = ROOT) -> list[str]:
    path = root / ACKNOWLEDGED
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return sorted(line for line in lines if line and not line.startswith("#"))


def write_acknowledged(root: Path, refs: list[str]) -> None:
    path = root / ACKNOWLEDGED
    header = [line for line in path.read_text().splitlines() if line.startswith("#")] \
        if path.is_file() else ["# Image references knowingly left unpinned (tag only)."]
    path.write_text("\n".join([*header, *refs]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true",
                       help="list the unpinned references; exit 1 if there is any")
    group.add_argument("--update", action="store_true",
                       help="re-resolve every tag, pinned or not (take newer base images)")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        left = [r for r in find_references(args.root) if not r.pinned and not r.own]
        for r in left:
            print(f"{r.path.relative_to(args.root)}:{r.line}: {r.ref} (tag only)")
        print(f"{len(left)} unpinned image reference(s)")
        return 1 if left else 0
    try:
        changes = pin(args.root, update=args.update)
    except PinError as e:
        print(f"pin-images: {e}", file=sys.stderr)
        return 1
    for old, new in changes.items():
        print(f"{old} -> {new}")
    print(f"{len(changes)} reference(s) pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
