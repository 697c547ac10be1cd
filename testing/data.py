"""Where the real test data lives."""

from __future__ import annotations

import os
from pathlib import Path

from ..runner.comfyui_path import PACK_ROOT

# The small real fixtures the tests use, shipped with the repo (licences and provenance in its README.md).
REPO_TEST_DATA = PACK_ROOT / "tests" / "data"


def test_data_dir() -> Path:
    """Real CXR test material: ``CXR_TEST_DATA`` (a folder with the same ``cxr/...`` layout), else the repo's
    own ``tests/data``, so a plain clone runs every test."""
    env = os.environ.get("CXR_TEST_DATA")
    return Path(env).expanduser() if env else REPO_TEST_DATA
