"""graphopt: replace pointwise convolutions with kEffNet's grouped sub-architecture.

`rewrite(model)` takes a Keras model or an onnx.ModelProto and returns (new_model, report).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from graphopt.quiet import silenced_stderr  # noqa: E402
from graphopt.runtime import has_keras  # noqa: E402

# Registers GroupedPointwiseConv and ChannelInterleave, so that a rewritten model saved as
# .keras reloads with keras.models.load_model once graphopt is imported. TensorFlow's C++
# runtime prints at import whatever the log level (absl's "WARNING: All log messages before
# absl::InitializeLog() ..."): kept off the user's stderr. ONNX-only installs have no Keras
# (the `keras` extra brings it): there nothing is registered and TensorFlow is never imported.
if has_keras():
    with silenced_stderr():
        import graphopt.backends.keras_layers  # noqa: E402,F401
from graphopt.api import (  # noqa: E402
    export_onnx,
    load,
    model_kind,
    register_rewritten,
    rewrite,
    save,
)
from graphopt.errors import GraphoptError, InternalError  # noqa: E402
from graphopt.finetune import FinetuneResult, finetune  # noqa: E402
from graphopt.plan import SitePlan, Skipped, max_groups, plan_site  # noqa: E402
from graphopt.report import Report, Totals  # noqa: E402

__version__ = "0.1.0"


__all__ = [
    "export_onnx",
    "finetune",
    "FinetuneResult",
    "GraphoptError",
    "InternalError",
    "Report",
    "SitePlan",
    "Skipped",
    "Totals",
    "load",
    "max_groups",
    "model_kind",
    "plan_site",
    "register_rewritten",
    "rewrite",
    "save",
]
