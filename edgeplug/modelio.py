"""Read and write ONNX models with clear errors and the IR version the runtime accepts."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError, Message

from edgeplug.atomic import atomic_file
from edgeplug.errors import ModelError
from edgeplug.files import check_regular_file

# onnxruntime-training 1.19.2 loads IR version <= 10 only (see docs/architecture.md).
MAX_IR_VERSION = 10
# Highest default-domain opset onnxruntime 1.19 implements.
MAX_OPSET = 21


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version, 0 when it imports none."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file and its external data, refusing data outside its folder."""
    path = check_regular_file(path, "model file", ModelError)  # a FIFO or /dev/zero would hang onnx.load
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as error:
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(error).__name__}: {_first_line(error)}); "
            "check that the file is complete and was written by an ONNX exporter"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path} holds no ONNX graph (empty or not an ONNX file)")
    check_text_and_types(model, path)
    check_declared_sizes(model)  # before any external data is read: absurd shapes never reach a read
    _load_external_data(model, path.parent)
    return model


def check_text_and_types(model: onnx.ModelProto, path: Path | str = "the model") -> None:
    """Refuse invalid UTF-8 in string fields and unknown data types, which break onnx helpers later.

    Protobuf decodes a string field only when it is read, so a flipped byte in a
    name surfaces as a UnicodeDecodeError deep in a pass; read them all now.
    """
    from onnx.mapping import TENSOR_TYPE_MAP

    def visit(message: Any) -> None:
        for field, value in message.ListFields():
            if field.type == field.TYPE_MESSAGE:
                for item in ([value] if isinstance(value, Message) else value):
                    visit(item)
            elif field.type == field.TYPE_STRING:  # upb hands back invalid UTF-8 as bytes instead of str
                for item in ([value] if isinstance(value, (str, bytes)) else value):
                    if isinstance(item, bytes):
                        item.decode("utf-8")

    try:
        visit(model)
    except UnicodeDecodeError as error:
        raise ModelError(f"{path} holds a name or string that is not valid UTF-8 ({error.reason}); the file is damaged") from None
    except RecursionError:
        raise ModelError(f"{path} nests graphs too deeply to be a real model") from None
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if tensor.data_type not in TENSOR_TYPE_MAP:
            raise ModelError(f"tensor '{tensor.name}' has an unknown data type ({tensor.data_type}); the file is damaged")
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if value.type.HasField("tensor_type"):
            elem_type = value.type.tensor_type.elem_type
            if elem_type and elem_type not in TENSOR_TYPE_MAP:
                raise ModelError(f"'{value.name}' has an unknown data type ({elem_type}); the file is damaged")


MAX_LOCATION_LENGTH = 1024
"""Longest external-data `location` accepted (Linux paths stop at 4096, names at 255)."""


def _load_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Read every tensor's external data ourselves, after checking where it points.

    Refused before anything is opened: absolute locations, `..` that leaves the
    folder, symbolic links that lead out of it, NUL bytes, very long names, files
    that are not regular files (FIFOs, devices), and offset/length outside the file
    or disagreeing with the tensor's declared shape.
    """
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        root = folder.resolve(strict=True)
    except (OSError, RuntimeError) as error:
        raise ModelError(f"cannot resolve the model's folder {folder}: {error}") from None
    planned: list[tuple[onnx.TensorProto, str, Path, int, int]] = []
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        target = _external_path(tensor.name, location, folder, root)
        offset, length = _external_range(tensor.name, entries, target)
        _check_external_length(tensor, length)
        planned.append((tensor, location, target, offset, length))
    _check_memory_for(planned)
    for tensor, location, target, offset, length in planned:
        with open(target, "rb") as stream:  # O_RDONLY on the resolved path: no symlink left to follow
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise ModelError(f"external data {location!r} for tensor '{tensor.name}' is not a regular file")
            stream.seek(offset)
            try:
                data = stream.read(length)
            except MemoryError:
                raise ModelError(f"not enough memory to read the external data of tensor '{tensor.name}' "
                                 f"({_format_bytes(length)})") from None
        if len(data) != length:
            raise ModelError(f"external data {location!r} for tensor '{tensor.name}' changed while it was read")
        tensor.raw_data = data
        del data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _declared_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's shape and data type call for (None: a type without a fixed item size)."""
    itemsize = _ITEMSIZES.get(tensor.data_type)
    if itemsize is None or any(d < 0 for d in tensor.dims):
        return None
    count = 1
    for d in tensor.dims:
        count *= int(d)
    return count * itemsize


def _check_external_length(tensor: onnx.TensorProto, length: int) -> None:
    """The bytes to read must be exactly what the declared shape needs: checked before any read."""
    expected = _declared_bytes(tensor)
    if expected is not None and expected != length:
        raise ModelError(
            f"tensor '{tensor.name}' declares shape {list(tensor.dims)} ({expected:,} bytes) but its external data "
            f"is {length:,} bytes long; the file is damaged or the model was not written by an ONNX exporter"
        )


def _check_memory_for(planned: list[tuple[onnx.TensorProto, str, Path, int, int]]) -> None:
    """Refuse external data that cannot fit in the memory this process may still use."""
    if not planned:
        return
    from edgeplug.guard import available_memory_bytes, format_size

    # every tensor stays in memory; the largest is briefly held twice (read buffer, then the model's copy)
    needed = sum(length for *_, length in planned) + max(length for *_, length in planned)
    available = available_memory_bytes()
    if available is not None and needed > available:
        largest = max(planned, key=lambda item: item[4])
        raise ModelError(
            f"the model's external data needs about {format_size(needed)} of memory to load (the largest tensor, "
            f"'{largest[0].name}', holds {format_size(largest[4])}), but only {format_size(available)} of memory is "
            "left to this process; load it on a machine with more memory"
        )


def _format_bytes(count: int) -> str:
    from edgeplug.guard import format_size

    return format_size(count)


def _external_path(name: str, location: str, folder: Path, root: Path) -> Path:
    shown = repr(location[:80] + ("..." if len(location) > 80 else ""))
    if not location:
        raise ModelError(f"tensor '{name}' uses external data but names no file (empty 'location')")
    if "\0" in location or len(location) > MAX_LOCATION_LENGTH:
        raise ModelError(f"tensor '{name}' has an invalid external data location {shown} (NUL byte or too long); refusing it")
    if Path(location).is_absolute():
        raise ModelError(f"tensor '{name}' points to external data outside the model's folder ({shown}); refusing to read it")
    try:
        target = (folder / location).resolve()
    except (OSError, RuntimeError) as error:  # name too long, symlink loop
        raise ModelError(f"tensor '{name}' has an external data location that cannot be resolved ({shown}: {error}); refusing it") from None
    if not target.is_relative_to(root) or target == root:
        raise ModelError(f"tensor '{name}' points to external data outside the model's folder ({shown}); refusing to read it")
    try:
        info = target.stat()
    except OSError:
        raise ModelError(f"external data file {shown} for tensor '{name}' is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelError(f"external data {shown} for tensor '{name}' is not a regular file; refusing to read it")
    return target


def _external_range(name: str, entries: dict[str, str], target: Path) -> tuple[int, int]:
    """Offset and length to read, checked against the file's size and the tensor's shape."""
    size = target.stat().st_size
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else size - offset
    except ValueError:
        raise ModelError(f"tensor '{name}': external data offset/length are not integers") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelError(
            f"tensor '{name}' declares external data bytes {offset}..{offset + length} but {target.name} has {size} bytes"
        )
    return offset, length


def check_declared_sizes(model: onnx.ModelProto) -> None:
    """Refuse initializers whose declared shape does not match the bytes they carry (absurd dims)."""
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if any(d < 0 for d in tensor.dims):
            raise ModelError(f"tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
        count = 1
        for d in tensor.dims:
            count *= int(d)
        if count > MAX_TENSOR_VALUES:
            raise ModelError(
                f"tensor '{tensor.name}' declares shape {list(tensor.dims)} ({count:,} values), more than edgeplug accepts "
                f"({MAX_TENSOR_VALUES:,}); the file is damaged or not a model a device can train"
            )
        itemsize = _ITEMSIZES.get(tensor.data_type)
        held = len(tensor.raw_data) if tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL else None
        if itemsize and held is not None and held != count * itemsize:
            raise ModelError(
                f"tensor '{tensor.name}' declares shape {list(tensor.dims)} ({count * itemsize:,} bytes) "
                f"but holds {held:,} bytes; the file is damaged"
            )


MAX_TENSOR_VALUES = 2**34
"""Largest initializer accepted, in values (64 GiB of float32): anything bigger is a damaged file."""

_ITEMSIZES: dict[int, int] = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.UINT32: 4, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BFLOAT16: 2,
}


def unsorted_node(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> str | None:
    """The first node (also in subgraphs) that reads a tensor no earlier node, input or initializer made.

    ONNX's shape inference crashes the process (SIGSEGV) on graphs with cycles; a
    graph whose nodes are in topological order has none, so call this first.
    """
    known = set(outer) | {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    known |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        for name in node.input:
            if name not in known:
                return f"node '{node.name or node.op_type}' reads '{name}' before it is produced (or never)"
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") else list(attribute.graphs):
                problem = unsorted_node(sub, frozenset(known))
                if problem:
                    return problem
        known.update(node.output)
    return None


def unknown_ops(model: onnx.ModelProto) -> list[str]:
    """Ops with no ONNX schema: unknown default-domain op types, or domains the model does not import."""
    imported = {o.domain or "" for o in model.opset_import}
    problems = []
    for node in model.graph.node:
        domain = node.domain or ""
        if domain in ("", "ai.onnx"):
            if not onnx.defs.has(node.op_type):
                problems.append(f"{node.op_type} (node '{node.name}'): not an ONNX operator")
        elif domain not in imported:
            problems.append(f"{node.op_type} (node '{node.name}'): domain '{domain}' is not imported")
    return problems


def check_model(model: onnx.ModelProto, *, full: bool = False) -> None:
    """Raise ModelError if `model` is not valid ONNX (with shape inference when `full`)."""
    unknown = unknown_ops(model)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ModelError(
            f"unsupported op {unknown[0]}{more}; re-export the model using standard ONNX operators "
            "(no custom ops or domains)"
        )
    # The checker of onnx 1.17 stops at IR versions above its own (10), but normalize lowers those:
    # check the model as the IR version it will be written with (unknown data types were refused on load).
    declared = model.ir_version
    model.ir_version = min(declared, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ModelError(f"invalid ONNX model: {_first_line(error)}") from None
    finally:
        model.ir_version = declared


def clamp_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version to what onnxruntime-training 1.19.2 loads."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


def save_model(model: onnx.ModelProto, target: str | Path) -> None:
    """Write `model` atomically with a runtime-loadable IR version."""
    clamp_ir_version(model)
    with atomic_file(Path(target)) as staging:
        onnx.save_model(model, str(staging))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else " ".join(lines[:3])
