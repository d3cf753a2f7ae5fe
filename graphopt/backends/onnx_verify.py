"""Check a rewritten ONNX model the way a user would: the checker, the interface, onnxruntime."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import onnx

from graphopt import runtime
from graphopt.backends.onnx_io import is_large, save_onnx
from graphopt.errors import InputError, InternalError

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


class VerificationError(InternalError):
    """The rewritten model fails a check the original passes: a bug in pwgroup, since the
    input passed the same checks when it was loaded."""


def interface(model: onnx.ModelProto) -> list[tuple]:
    """(name, elem_type, shape) of every graph input (not initializer) and output."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            if vi.name in inits:
                continue
            dims = vi.type.tensor_type.shape.dim
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in dims
            )
            out.append((kind, vi.name, vi.type.tensor_type.elem_type, shape))
    return out


def random_feed(
    model: onnx.ModelProto, session, seed: int = 0, dynamic: int = 8, batch: int = 1
) -> dict:
    """Random inputs for a session; dynamic dims get `dynamic` (`batch` for the leading one)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in session.get_inputs():
        shape = [
            d if isinstance(d, int) and d > 0 else (batch if i == 0 else dynamic)
            for i, d in enumerate(inp.shape)
        ]
        dtype = {
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
            "tensor(double)": np.float64,
            "tensor(int64)": np.int64,
            "tensor(int32)": np.int32,
            "tensor(bool)": np.bool_,
        }.get(inp.type, np.float32)
        if dtype == np.bool_:
            feed[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            feed[inp.name] = rng.integers(0, 4, shape).astype(dtype)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def timing_threads() -> int:
    """The intra-op thread count every timing uses: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(purpose: str = "to run an ONNX model"):
    """Fresh onnxruntime SessionOptions (for callers that add their own, e.g. profiling)."""
    return runtime.onnxruntime(purpose).SessionOptions()


def session(
    model: onnx.ModelProto | str,
    provider: str = "CPUExecutionProvider",
    purpose: str = "to run an ONNX model",
    timing: bool = False,
    options=None,
):
    """An onnxruntime session. Every session that is timed (`timing=True`) has its worker
    threads' spinning off and a fixed thread count (`timing_threads`): otherwise the threads
    of one session busy-wait after each run and steal the cores of the next session timed in
    turn (measured here: B0 at batch 1 read 15-25 ms with spinning, 9-11 ms without)."""
    ort = runtime.onnxruntime(purpose)
    options = options or ort.SessionOptions()
    options.log_severity_level = 4
    if timing:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = timing_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if provider in available and provider != "CPUExecutionProvider":
        providers.insert(0, provider)
    if isinstance(model, str):  # a file: onnxruntime reads it and its external data itself
        return ort.InferenceSession(model, options, providers=providers)
    if not is_large(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with _on_disk(model) as path:  # protobuf cannot serialise it in one piece
        return ort.InferenceSession(path, options, providers=providers)


@contextlib.contextmanager
def _on_disk(model: onnx.ModelProto):
    """The path of `model` saved (with external data) in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="pwgroup-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_onnx(model, path)
        yield path


def _checked(model: onnx.ModelProto) -> None:
    """onnx.checker's full check, from a file for a model over 2 GB."""
    if not is_large(model):
        onnx.checker.check_model(model, full_check=True)
        return
    with _on_disk(model) as path:
        onnx.checker.check_model(path, full_check=True)


CHECK_PURPOSE = "to check the rewritten model (--no-verify skips the check)"
DYNAMIC_SIZES = (32, 64, 224, 16, 8, 1)


def _runnable_feed(model, ref):
    """A random feed the original model runs on (dynamic dims tried from DYNAMIC_SIZES)."""
    for size in DYNAMIC_SIZES:
        feed = random_feed(model, ref, dynamic=size)
        try:
            return feed, ref.run(None, feed)
        except Exception:  # noqa: BLE001, S112 - the original rejects this size; try the next
            continue
    return None, None


def verify(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    provider: str = "CPUExecutionProvider",
    original_path: str | None = None,
) -> None:
    """Raise VerificationError unless `rewritten` passes the checker, keeps the interface of
    `original` and runs in onnxruntime with finite outputs of the original's shapes.

    With `original_path` (the file `original` was read from) onnxruntime reads the original
    from there, and `original` may be a copy without weight data (`onnx_io.without_weights`):
    a model over 2 GB is then never in memory twice. The original's session is let go before
    the rewritten one is made."""
    try:
        _checked(rewritten)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(
            f"the rewritten model fails onnx.checker: {str(exc).splitlines()[0]}"
        ) from exc
    if interface(original) != interface(rewritten):
        raise VerificationError("the rewritten model's inputs/outputs differ from the original's")
    runtime.onnxruntime(CHECK_PURPOSE)  # a missing runtime is not a broken model
    try:
        ref = session(original_path or original, provider)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            "onnxruntime cannot load the input model, so the result cannot be checked "
            f"(--no-verify skips the check): {why}"
        ) from exc
    feed, expected = _runnable_feed(original, ref)
    del ref  # its copy of the weights goes before the rewritten model's session is made
    try:
        new = session(rewritten, provider)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph
        raise VerificationError(f"onnxruntime cannot load the rewritten model: {exc}") from exc
    if feed is None:
        return  # the original itself runs on no random input we can make: nothing to compare
    try:
        got = new.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidArgument
        raise VerificationError(f"onnxruntime cannot run the rewritten model: {exc}") from exc
    for e, g, meta in zip(expected, got, new.get_outputs()):
        if np.shape(e) != np.shape(g):
            raise VerificationError(
                f"output '{meta.name}' has shape {np.shape(g)}, expected {np.shape(e)}"
            )
        if np.issubdtype(np.asarray(g).dtype, np.floating) and not np.isfinite(g).all():
            raise VerificationError(f"output '{meta.name}' is not finite")
