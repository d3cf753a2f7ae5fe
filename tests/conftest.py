"""Shared fixtures: a quiet TensorFlow, fixture models written once per session."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests are derandomized unless asked otherwise, so that CI (and a fresh clone) cannot
# fail by chance: every run tries the same examples, and every example that ever failed is kept
# as an explicit @example. `HYPOTHESIS_PROFILE=random` (or `--hypothesis-profile=random`) runs
# them randomized with ten times the examples (1000 where a test sets no count), by hand
# (docs/testing.md).
settings.register_profile("derandomized", derandomize=True, database=None, print_blob=True)
settings.register_profile("random", derandomize=False, max_examples=1000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))


def examples(n: int) -> int:
    """`n` examples for a property test; ten times as many in a randomized run."""
    return n if settings.default.derandomize else 10 * n


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def keras_fixtures(tmp_path_factory):
    """Every model of fixtures/keras_models.py saved as .keras; name -> path."""
    from fixtures.keras_models import write_all

    return write_all(str(tmp_path_factory.mktemp("keras_fixtures")))


def run_pwgroup(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    """The real console script in a subprocess, as a user or CI would run it."""
    return subprocess.run(["pwgroup", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


sys.path.insert(0, REPO)
