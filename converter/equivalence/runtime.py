"""Run models in onnxruntime exactly as given: one session per model, reused across trials.

Runtime: onnxruntime CPU provider, graph optimisations disabled (``ORT_DISABLE_ALL``), one thread,
fatal-only logging, no memory pattern or buffer reuse. A model given as a path is loaded by
onnxruntime from that path when it needs no change; when :func:`expose` added outputs, the file's
own proto (external data not loaded, see :mod:`converter.equivalence.sides`) gets them and goes to
onnxruntime as bytes, with the file's folder for its external data. A model given in memory is
serialised to bytes (external data stays where it is) or, above ~1.8 GB of in-memory weights, saved
with external data into a temporary folder. A small model with many initializers is built with
onnxruntime keeping them in its graph (see ``_KEEP_MAX_BYTES``). Types numpy lacks (bfloat16,
float8) go in and come out as raw OrtValues.
"""

from __future__ import annotations

__all__ = [
    "ModelLike",
    "OnDisk",
    "Runner",
    "Side",
    "all_nodes",
    "expose",
    "load_side",
    "model_source",
    "one_line",
    "open_session",
    "ort_reason",
    "ort_value",
]

import ctypes
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from converter.equivalence.compare import ir_dtype
from converter.equivalence.sides import ModelLike, OnDisk, Side, all_nodes, expose, load_side
from converter.model_io import files as io

logger = logging.getLogger(__name__)

_IN_MEMORY_LIMIT = io.EXTERNAL_DATA_THRESHOLD_BYTES
_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_PROVIDERS = ["CPUExecutionProvider"]
_NO_NUMPY_TYPES = frozenset(
    f"tensor({t})"
    for t in ("bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz")
)
_MAX_MESSAGE = 500
# Once a session holds an initializer, onnxruntime (1.32) removes it from its graph, searching
# the graph's list of initializers from the start each time: quadratic in their number (a model
# of 40,000 small Gemm weights spent 2 s of a 4 s session there). It keeps them when asked to
# save the model it built, which costs one write of the model: done when the model is small
# (its bytes, a few MB at most) and its initializers many (their square above its bytes).
_KEEP_MAX_BYTES = 64 << 20


# --------------------------------------------------------------------------- onnxruntime


def _session_options(folder: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # Fatal only: run errors reach the user through our one-line message, not ORT's own log.
    options.log_severity_level = 4
    # Prepacking copies every Gemm/MatMul weight into the kernel's layout: a second copy of the
    # model in memory, for runs that only happen a few times here.
    options.add_session_config_entry("session.disable_prepacking", "1")
    # The memory pattern is planned again for every new input shape, and trials change shapes:
    # on a graph of 30,000 nodes each plan took longer than the run it was made for.
    options.enable_mem_pattern = False
    # Planning which values may share a buffer took an eighth of building a session of 30,000
    # nodes; values are still freed after their last use, so a run's peak memory barely moves.
    options.enable_mem_reuse = False
    if folder is not None:
        options.add_session_config_entry(_FOLDER_KEY, folder)
    return options


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for graph in model.graphs():
        yield from (v.const_value for v in graph.initializers.values() if v.const_value is not None)
    for node in all_nodes(model):
        for attr in node.attributes.values():
            if not attr.is_ref() and attr.type == ir.AttributeType.TENSOR:
                yield attr.as_tensor()


def _serialise(model: ir.Model, workdir: str, stem: str) -> tuple[bytes | str, str | None]:
    """Bytes plus the folder of any external data, or a saved file when too big for bytes."""
    tensors = {id(t): t for t in _all_tensors(model)}.values()
    external = [t for t in tensors if isinstance(t, ir.ExternalTensor)]
    folders = {os.path.abspath(t.base_dir) for t in external}
    in_memory = sum(t.nbytes for t in tensors if not isinstance(t, ir.ExternalTensor))
    if in_memory < _IN_MEMORY_LIMIT and len(folders) <= 1:
        return ir.to_proto(model).SerializeToString(), (folders.pop() if folders else None)
    path = os.path.join(workdir, f"{stem}.onnx")
    logger.info("saving the %s copy with external data to %s", stem, path)
    ir.save(model, path, external_data=f"{stem}.onnx.data")
    return path, None


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> bytes:
    """The proto's bytes with ``names`` added as graph outputs (types left to onnxruntime);
    the proto is left as it was.

    Editing the proto costs milliseconds where serialising the IR copy costs seconds on a graph
    of many thousand nodes. The file passed :func:`load_side`'s checks when it was read.
    """
    outputs = proto.graph.output
    count = len(outputs)
    outputs.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        return proto.SerializeToString()
    finally:
        del outputs[count:]


def _folder(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def open_session(side: Side, workdir: str, stem: str) -> Runner:
    """Create the onnxruntime session for ``side`` (from its file when it has one)."""
    if side.path is not None and not side.exposed:
        return Runner(ort.InferenceSession(side.path, _session_options(), providers=_PROVIDERS))
    if side.path is not None:
        proto = side.proto or onnx.load(side.path, load_external_data=False)
        source, folder = _with_outputs(proto, side.exposed), _folder(side.path)
        initializers = len(proto.graph.initializer)
    else:
        source, folder = _serialise(side.model, workdir, stem)
        initializers = len(side.model.graph.initializers)
    if isinstance(source, bytes) and _keep_initializers(initializers, source):
        options = _session_options(folder)
        options.optimized_model_filepath = os.path.join(workdir, f"{stem}.as-built.onnx")
        try:
            return Runner(ort.InferenceSession(source, options, providers=_PROVIDERS))
        except Exception as e:  # onnxruntime raises many types; saving is only a shortcut
            logger.debug("onnxruntime session keeping initializers failed (%s)", one_line(e))
    return Runner(ort.InferenceSession(source, _session_options(folder), providers=_PROVIDERS))


def _keep_initializers(count: int, source: bytes) -> bool:
    """Whether to ask onnxruntime to keep the graph's initializers (see ``_KEEP_MAX_BYTES``):
    many of them in a small model without external data (which the saved copy would hold).

    Every external tensor names its file under the key ``location``: a model whose bytes do
    not contain that word has none (a name that does only costs the shortcut).
    """
    size = len(source)
    return size <= _KEEP_MAX_BYTES and count * count > size and b"location" not in source


class Runner:
    """One onnxruntime session, created once and run for every trial."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._raw_outputs = any(o.type in _NO_NUMPY_TYPES for o in session.get_outputs())

    def run(
        self, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run on ``feeds`` and return output name -> array, for ``names`` (default: all)."""
        names = self.output_names if names is None else list(names)
        ort_feeds = {name: _ort_input(feeds[name], self._raw_outputs) for name in self.input_names}
        if self._raw_outputs:
            values = self.session.run_with_ort_values(names, ort_feeds)
            arrays = [_ortvalue_to_numpy(v) for v in values]
        else:
            arrays = self.session.run(names, ort_feeds)
        return dict(zip(names, arrays, strict=True))


def model_source(model: ModelLike, workdir: str, stem: str) -> tuple[bytes | str, str | None]:
    """What an onnxruntime session of ``model`` as given (no outputs added) is built from: its
    file, or its bytes and the folder of any external data (saved in ``workdir`` when too big)."""
    if isinstance(model, OnDisk):
        return os.fspath(model.path), None
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), None
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), None
    return _serialise(model, workdir, stem)


def ort_value(array: np.ndarray) -> ort.OrtValue:
    """``array`` as an onnxruntime value (types numpy lacks, bfloat16 and float8, too)."""
    return _ort_input(array, True)


def _ort_input(array: np.ndarray, as_ortvalue: bool) -> Any:
    """Numpy arrays pass as they are; types numpy lacks (bfloat16, float8) go as raw OrtValues."""
    dtype = ir_dtype(array.dtype)
    if array.dtype.kind == "V" and dtype is not None:
        raw = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, int(dtype))
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)) if as_ortvalue else array


def _ortvalue_to_numpy(value: ort.OrtValue) -> np.ndarray:
    """Copy an output out of onnxruntime, also for 8/16-bit types numpy does not have."""
    if value.data_type() not in _NO_NUMPY_TYPES:
        return value.numpy()
    dtype = np.dtype(ir.DataType(value.element_type()).numpy())
    count = value.tensor_size_in_bytes()
    raw = np.frombuffer((ctypes.c_uint8 * count).from_address(value.data_ptr()), np.uint8)
    return raw.copy().view(dtype).reshape(value.shape())


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def ort_reason(error: object) -> str:
    """:func:`one_line` without onnxruntime's ``[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED :``."""
    return _ORT_PREFIX.sub("", one_line(error))


def one_line(error: object) -> str:
    """An onnxruntime error on one line of at most 500 characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."
