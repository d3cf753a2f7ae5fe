"""Loading ONNX models safely (external data checked before it is read), counting, saving."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
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


def external_data_size(path: str) -> int:
    """Bytes of the external data files the ONNX model at `path` refers to (checked at load)."""
    model = onnx.load(path, load_external_data=False)
    folder = os.path.dirname(os.path.abspath(path))
    locations = {
        e.value
        for t in iter_tensors(model)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return sum(os.path.getsize(os.path.join(folder, loc)) for loc in locations)


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
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensors(model))
    _check(model if not external else path, path)  # by path: the data may be over 2 GB
    try:
        onnx.load_external_data_for_model(model, folder)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise InputError(f"{path}: cannot read its external data ({_first_line(exc)})") from exc
    return model


def _check(model: onnx.ModelProto | str, path: str) -> None:
    """onnx.checker with its full check (strict shape inference, which verification runs on
    the rewritten model); given the path, it reads no weights and has no 2 GB limit."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
        UnicodeDecodeError,
        ValueError,
    ) as exc:
        raise InputError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from exc


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all weights, from their declared shapes (no data is touched)."""
    return sum(math.prod(t.dims) * _ITEM_SIZE.get(t.data_type, 4) for t in iter_tensors(model))


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too big to go through protobuf in one piece (2 GB), with room
    for the graph itself: it is then saved, checked and run from a file with external data."""
    return weight_bytes(model) > _TWO_GB // 2


def save_onnx(model: onnx.ModelProto, path: str) -> int:
    """Write atomically; models over 2 GB keep their weights in `NAME.onnx.data` beside it.
    `model` is left as it is (onnx.save_model would move a large model's data out of it).
    Returns the bytes written (both files)."""
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pwgroup-") as tmp:
        tmp_model = os.path.join(tmp, os.path.basename(path))
        data_name = os.path.basename(path) + ".data"
        size = 0
        if is_large(model):
            _save_external(model, tmp_model, data_name)
            size = os.path.getsize(os.path.join(tmp, data_name))
            os.replace(os.path.join(tmp, data_name), os.path.join(folder, data_name))
        else:
            onnx.save_model(model, tmp_model)
        os.replace(tmp_model, path)
    return size + os.path.getsize(path)


_INLINE_BYTES = 1024
"""Tensors up to this size stay in the .onnx file (shapes and indices), as onnx does."""


def _save_external(model: onnx.ModelProto, path: str, data_name: str) -> None:
    """Write the weights to `data_name` beside `path`, one tensor at a time, and the graph
    with references to them: memory for one tensor, not a second copy of the model."""
    folder = os.path.dirname(path)
    with open(os.path.join(folder, data_name), "wb") as data:

        def externalise(tensor: onnx.TensorProto) -> onnx.TensorProto:
            stub = onnx.TensorProto()
            if not tensor.HasField("raw_data") or tensor.ByteSize() <= _INLINE_BYTES:
                stub.CopyFrom(tensor)
                return stub
            for name in ("name", "data_type", "doc_string"):
                setattr(stub, name, getattr(tensor, name))
            stub.dims.extend(tensor.dims)
            offset = data.tell()
            data.write(tensor.raw_data)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(data.tell() - offset)),
            ):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            return stub

        skeleton = without_weights(model, externalise)
    with open(path, "wb") as f:
        f.write(skeleton.SerializeToString())


def shape_only(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """`tensor` without its data when it is large (for shape inference); small ones (shapes,
    indices) are kept whole, since inference may read them."""
    stub = onnx.TensorProto()
    if tensor.ByteSize() <= _INLINE_BYTES:
        stub.CopyFrom(tensor)
    else:
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
    return stub


def without_weights(model: onnx.ModelProto, replace) -> onnx.ModelProto:
    """A copy of `model` whose initializers and Constant values (subgraphs included) are
    `replace(tensor)`, made without copying the originals' data."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip={"graph"})
    out.graph.CopyFrom(_graph_without_weights(model.graph, replace))
    return out


def copy_fields(src, dst, skip=frozenset()) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _graph_without_weights(graph: onnx.GraphProto, replace) -> onnx.GraphProto:
    out = onnx.GraphProto()
    copy_fields(graph, out, skip={"initializer", "node"})
    out.initializer.extend(replace(t) for t in graph.initializer)
    for node in graph.node:
        copy = out.node.add()
        copy_fields(node, copy, skip={"attribute"})
        for attr in node.attribute:
            a = copy.attribute.add()
            if attr.type == onnx.AttributeProto.GRAPH:
                copy_fields(attr, a, skip={"g"})
                a.g.CopyFrom(_graph_without_weights(attr.g, replace))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                copy_fields(attr, a, skip={"graphs"})
                a.graphs.extend(_graph_without_weights(g, replace) for g in attr.graphs)
            elif attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                copy_fields(attr, a, skip={"t"})
                a.t.CopyFrom(replace(attr.t))
            else:
                a.CopyFrom(attr)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def input_specs(model: onnx.ModelProto) -> list:
    """The model's real inputs (not initializers) as data.InputSpec: name, dims, NumPy dtype."""
    from onnx.helper import tensor_dtype_to_np_dtype

    from graphopt.data import InputSpec

    weights = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        tensor = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type)).name
        specs.append(InputSpec(vi.name, (None, *dims[1:]) if dims else dims, dtype))
    return specs
