"""Shared test setup: offline models, caches out of $HOME, and the fixture images."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "emoji64"

_cache = Path(os.environ.get("LDM_CACHE_DIR", Path(tempfile.gettempdir()) / "ldm-cache"))
for key, value in {
    "LDM_CACHE_DIR": str(_cache),
    "TORCH_EXTENSIONS_DIR": str(_cache / "torch_extensions"),
    "HF_HOME": str(_cache / "huggingface"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
}.items():
    os.environ.setdefault(key, value)


def run_ldm(*args: str, cwd: Path | None = None, timeout: int = 600):
    """Run the real `ldm` command line in a subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def fixture_images() -> Path:
    return FIXTURE_IMAGES
