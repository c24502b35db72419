"""Where taskdelta keeps derived files (converted bases, fingerprints): TASKDELTA_CACHE_DIR."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("TASKDELTA_CACHE_DIR") or Path.home() / ".cache" / "taskdelta"
    return Path(root)
