"""Where edgediff keeps what it makes once and reuses: converted defaults, adopted graphs,
optimized graphs, repacked weights, synthetic models and peer environments."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`EDGEDIFF_CACHE`, else `$XDG_CACHE_HOME/edgediff`, else `~/.cache/edgediff`."""
    root = os.environ.get("EDGEDIFF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgediff"
    return Path(root)
