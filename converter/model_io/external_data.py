"""Refuse external data that would be unsafe to read, before any weight is read.

External data is checked (:func:`check_external_data`) on *every* tensor of the model -- graph
initializers, sparse initializers, tensors in node attributes (``Constant.value``), subgraphs,
training graphs and model-local functions (see :mod:`converter.model_io.tensors`). A tensor is refused
(:class:`~converter.errors.UnsafeModelError`) when its ``location`` is empty, absolute or has a
``..`` component, when it resolves (through symlinks, including a symlinked parent folder) outside
the model's folder, when it is not a regular file or has more than one hard link, when an
``external_data`` key is not one of ``location``, ``offset``, ``length``, ``checksum`` or is
repeated, or when ``offset``/``length`` is not a non-negative integer, disagrees with the tensor's
size or lies beyond the end of the file (CVE-2022-25882, CVE-2024-27318: path traversal;
CVE-2026-27489, CVE-2026-34446, CVE-2026-34447: symlink and hard-link escapes). Paths resolve
against the model's folder, never the current directory. ``checksum`` is not verified: that would
read the data.
"""

from __future__ import annotations

__all__ = ["check_external_data"]

import dataclasses
import math
import os
import re
import stat
from collections.abc import Callable, Iterator

import onnx
import onnx_ir as ir

from converter.errors import InputError, UnsafeModelError
from converter.model_io.tensors import ir_tensors, proto_tensors

_ALLOWED_EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})


@dataclasses.dataclass(frozen=True)
class _ExternalRef:
    """One tensor's external-data entries, from a TensorProto or an ``ir.ExternalTensor``."""

    tensor: str
    entries: tuple[tuple[str, str], ...]
    nbytes: int | None  # the size the tensor's dtype and shape need, when known


def check_external_data(model: onnx.ModelProto | ir.Model, model_dir: str | os.PathLike) -> int:
    """Refuse external data that would be unsafe to read; read nothing. Return how many
    tensors live in external data (all of them safe).

    Works on an ``onnx.ModelProto`` (the thorough form, used by :func:`load_model`: it sees
    every ``external_data`` key, sparse tensors and training graphs) or an ``ir.Model``
    (onnx_ir keeps only ``location``, ``offset`` and ``length``, so unknown keys are invisible
    there). Every location resolves against ``model_dir``, the folder of the ``.onnx`` file.

    Raises:
        UnsafeModelError: one line naming the tensor, its location and the reason.
        InputError: an external data file that does not exist.
    """
    model_dir = os.path.abspath(os.fspath(model_dir))
    real_dir = os.path.realpath(model_dir)
    count = 0
    for ref in _external_refs(model):
        _check_external_ref(ref, model_dir, real_dir)
        count += 1
    return count


def _check_external_ref(ref: _ExternalRef, model_dir: str, real_dir: str) -> None:
    """Check one tensor's entries, its path and its byte range; stat only, never open."""
    entries = dict(ref.entries)
    location = entries.get("location", "")

    def refuse(reason: str, error: type[InputError] = UnsafeModelError) -> InputError:
        return error(f"tensor {ref.tensor!r} external data {location!r}: {reason}")

    _check_keys(ref, refuse)
    reason = _location_problem(location)
    if reason:
        raise refuse(reason)
    offset = _parse_count(entries.get("offset"), "offset", refuse)
    length = _parse_count(entries.get("length"), "length", refuse)
    real = os.path.realpath(os.path.join(model_dir, location))
    if os.path.commonpath([real_dir, real]) != real_dir:
        raise refuse(f"resolves to {real!r}, outside the model folder {real_dir!r}")
    size = _stat_data_file(real, model_dir, refuse)
    _check_range(ref, offset or 0, length, size, refuse)


def _check_keys(ref: _ExternalRef, refuse: Callable[..., InputError]) -> None:
    """Refuse unknown or repeated ``external_data`` keys."""
    seen: set[str] = set()
    for key, _ in ref.entries:
        if key not in _ALLOWED_EXTERNAL_KEYS:
            allowed = ", ".join(sorted(_ALLOWED_EXTERNAL_KEYS))
            raise refuse(f"unknown external_data key {key!r} (allowed: {allowed})")
        if key in seen:
            raise refuse(f"external_data key {key!r} is repeated")
        seen.add(key)


def _location_problem(location: str) -> str | None:
    """Return why ``location`` is not a safe relative path, or None."""
    if not location:
        return "the location is empty"
    if "\0" in location:
        return "the location contains a NUL byte"
    if os.path.isabs(location) or location[0] in "/\\" or re.match(r"[A-Za-z]:", location):
        return "the location is an absolute path; it must be relative to the model folder"
    if ".." in re.split(r"[/\\]", location):
        return "the location has a '..' component"
    return None


def _parse_count(value: str | None, key: str, refuse: Callable[..., InputError]) -> int | None:
    """Parse an ``offset``/``length`` entry: a plain non-negative decimal integer."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]+", value):
        raise refuse(f"{key} {value!r} is not a non-negative integer")
    return int(value)


def _stat_data_file(real: str, model_dir: str, refuse: Callable[..., InputError]) -> int:
    """Return the size of the data file at ``real``; refuse a missing, odd or linked file."""
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise refuse(f"file not found in {model_dir!r}", InputError) from None
    except OSError as e:
        raise refuse(f"cannot stat the file ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise refuse("is not a regular file (a directory, fifo, device or socket)")
    if st.st_nlink > 1:
        raise refuse(
            f"the file has {st.st_nlink} hard links; copy it to a file of its own to load it"
        )
    return st.st_size


def _check_range(
    ref: _ExternalRef,
    offset: int,
    length: int | None,
    size: int,
    refuse: Callable[..., InputError],
) -> None:
    """Refuse an ``offset``/``length`` outside the file or disagreeing with the tensor size."""
    if offset > size:
        raise refuse(f"offset {offset} is beyond the end of the file ({size} bytes)")
    if length is not None and ref.nbytes is not None and length != ref.nbytes:
        raise refuse(f"length {length} does not match the tensor's size ({ref.nbytes} bytes)")
    needed = length if length is not None else ref.nbytes
    if needed is not None and offset + needed > size:
        raise refuse(
            f"offset {offset} + length {needed} is beyond the end of the file ({size} bytes)"
        )


def _external_refs(model: onnx.ModelProto | ir.Model) -> Iterator[_ExternalRef]:
    """Yield every external tensor reference of ``model``, in a proto or an ir.Model."""
    if isinstance(model, onnx.ModelProto):
        for tensor in proto_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entries = tuple((e.key, e.value) for e in tensor.external_data)
                yield _ExternalRef(tensor.name, entries, _proto_nbytes(tensor))
    elif isinstance(model, ir.Model):
        for tensor in ir_tensors(model):
            if isinstance(tensor, ir.ExternalTensor):
                yield _ExternalRef(tensor.name, _ir_entries(tensor), tensor.nbytes)
    else:
        raise TypeError(f"expected onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _ir_entries(tensor: ir.ExternalTensor) -> tuple[tuple[str, str], ...]:
    """The ``external_data`` entries onnx_ir would serialize for ``tensor``."""
    entries = [("location", os.fspath(tensor.location))]
    entries += [
        (k, str(v))
        for k, v in (("offset", tensor.offset), ("length", tensor.length))
        if v is not None
    ]
    return tuple(entries)


def _proto_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dtype and dims need (sub-byte types packed), or None if unknown."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        return None
    if any(d < 0 for d in tensor.dims):
        return None
    return (math.prod(tensor.dims) * bits + 7) // 8
