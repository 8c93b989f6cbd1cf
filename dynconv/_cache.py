"""The one folder where dynconv keeps what it computes or fetches once per machine."""

from __future__ import annotations

import os

CACHE_ENV = "DYNCONV_CACHE_DIR"


def cache_root() -> str:
    """``$DYNCONV_CACHE_DIR``, else ``~/.cache/dynconv``: autotuning results (``autotune/``), fetched data packages."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dynconv")
