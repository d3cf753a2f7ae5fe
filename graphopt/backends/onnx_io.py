"""Loading ONNX models safely (external data checked before it is read), counting, saving."""

from __future__ import annotations

import math
import os
import tempfile

import onnx
from google.protobuf.message import DecodeError

from graphopt.errors import InputError, UnsafeModelError

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
_TWO_GB = 2**31 - 1


def iter_graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_tensors(model: onnx.ModelProto):
    """Every weight tensor: initializers and Constant node values, subgraphs included."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        yield attr.t


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all floating-point initializers and Constant tensors (the report's count)."""
    return sum(math.prod(t.dims) for t in iter_tensors(model) if t.data_type in _FLOAT_TYPES)


def check_external_data(model: onnx.ModelProto, folder: str, source: str) -> None:
    """Refuse external-data locations that are absolute, escape `folder` or are links."""
    root = os.path.realpath(folder)
    for tensor in iter_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise UnsafeModelError(
                f"{source}: tensor '{tensor.name}' has external data at an absolute or empty "
                f"location '{location}'; refused"
            )
        full = os.path.join(folder, location)
        real = os.path.realpath(full)
        if os.path.commonpath([root, real]) != root or os.path.islink(full):
            raise UnsafeModelError(
                f"{source}: tensor '{tensor.name}' has external data '{location}' outside the "
                "model's folder (or behind a link); refused"
            )
        if not os.path.isfile(real):
            raise InputError(f"{source}: external data file '{location}' is missing")


MAX_TENSOR_BYTES = int(os.environ.get("PWGROUP_MAX_TENSOR_BYTES", 8 * 2**30))
_ITEM_SIZE = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.BOOL: 1,
}


def check_tensor_sizes(model: onnx.ModelProto, source: str) -> None:
    """Refuse tensors that declare more than MAX_TENSOR_BYTES, or more or fewer elements than
    they hold: such a model would make pwgroup allocate what the file does not contain."""
    for t in iter_tensors(model):
        if any(d < 0 for d in t.dims):
            raise InputError(f"{source}: tensor '{t.name}' declares a negative dimension")
        count = math.prod(t.dims)
        size = _ITEM_SIZE.get(t.data_type)
        if size is None:
            continue
        if count * size > MAX_TENSOR_BYTES:
            raise InputError(
                f"{source}: tensor '{t.name}' declares {count:,} elements "
                f"({count * size:,} bytes), over the limit of {MAX_TENSOR_BYTES:,} "
                "(PWGROUP_MAX_TENSOR_BYTES)"
            )
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            held = int(info["length"]) // size if "length" in info else count
        elif t.HasField("raw_data"):
            held = len(t.raw_data) // size
        else:
            held = max(len(t.float_data), len(t.int32_data), len(t.int64_data), len(t.double_data))
        if held != count and not (held == 0 and count == 0):
            raise InputError(
                f"{source}: tensor '{t.name}' declares {count:,} elements but holds {held:,}"
            )


def load_onnx(path: str) -> onnx.ModelProto:
    """Parse without external data, validate its locations, then read it."""
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from exc
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path}: the ONNX model has an empty graph")
    folder = os.path.dirname(os.path.abspath(path))
    check_external_data(model, folder, path)
    check_tensor_sizes(model, path)
    try:
        onnx.load_external_data_for_model(model, folder)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise InputError(f"{path}: cannot read its external data ({_first_line(exc)})") from exc
    try:  # full_check: the strict shape inference verification runs on the rewritten model
        onnx.checker.check_model(model, full_check=True)
    except (
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
        UnicodeDecodeError,
        ValueError,
    ) as exc:
        raise InputError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from exc
    return model


def save_onnx(model: onnx.ModelProto, path: str) -> None:
    """Write atomically; models over 2 GB keep their weights in `NAME.onnx.data` beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    large = sum(len(t.raw_data) for t in iter_tensors(model)) > _TWO_GB // 2
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pwgroup-") as tmp:
        tmp_model = os.path.join(tmp, os.path.basename(path))
        data_name = os.path.basename(path) + ".data"
        onnx.save_model(
            model,
            tmp_model,
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            location=data_name,
        )
        if large:
            os.replace(os.path.join(tmp, data_name), os.path.join(folder, data_name))
        os.replace(tmp_model, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
