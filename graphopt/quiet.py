"""Keeping TensorFlow's C++ runtime off the user's stderr where what it prints is noise."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def silenced_stderr():
    """File descriptor 2 goes to /dev/null inside: TensorFlow's C++ runtime writes there
    directly (at import, in tf2onnx's conversion, and when an op fails on purpose), past
    Python's sys.stderr and unaffected by TF_CPP_MIN_LOG_LEVEL once TensorFlow is loaded."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
