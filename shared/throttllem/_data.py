"""Where the project's real data lives: `../shared/data` beside the checkout, never inside it.

Set THROTTLLEM_DATA_DIR to point elsewhere (containers mount it, e.g. at /data).
"""

from __future__ import annotations

import os
from pathlib import Path

from throttllem._errors import ConfigError

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The data folder; raises ConfigError naming what was tried when it is absent."""
    env = os.environ.get("THROTTLLEM_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates += [_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise ConfigError(f"no data folder found (tried {tried}); set THROTTLLEM_DATA_DIR")


def data_file(relative: str) -> Path:
    """A file under the data folder, with a clear error when it is missing."""
    path = data_dir() / relative
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    return path


def models_dir() -> Path:
    """Where trained models live: $THROTTLLEM_MODELS_DIR, else `models/` of the checkout (an
    editable install). Containers copy `models/` and set the variable."""
    env = os.environ.get("THROTTLLEM_MODELS_DIR")
    return Path(env) if env else _REPO_ROOT / "models"
