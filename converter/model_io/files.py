"""Load and save ONNX models: input checks, external-data safety, atomic output.

Loading (:func:`load_model`) turns every bad input into one :class:`~converter.errors.InputError`
line naming the file: missing, a directory, empty, not protobuf, protobuf but not a model (no
graph, no ``ai.onnx`` opset), an unsupported IR version or opset, or external data that is missing
or unsafe (:func:`~converter.model_io.external_data.check_external_data`, run on every tensor before any
weight is read). Weights kept in external data stay lazy (onnx_ir memory-maps them on first use).

Writing (:func:`write_model`) is atomic: the model is saved into a fresh temporary folder inside
the destination folder (same filesystem, final file names), and only :meth:`PendingOutput.commit`
moves the files into place with :func:`os.replace` (data file first, then the ``.onnx``). Until
then the caller can validate the output where it lies (``PendingOutput.path``). External tensors
that are not touched stream from the input file to the output file (``ir.save`` copies them with
``copy_file_range``); they are never all held in memory. Overwriting the input is therefore safe:
its data file is replaced by rename, never rewritten in place.
"""

from __future__ import annotations

__all__ = [
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "PendingOutput",
    "check_external_data",
    "is_same_file",
    "load_model",
    "load_proto",
    "model_size_bytes",
    "has_external_data",
    "make_temp_dir",
    "remove_leftovers",
    "write_copy",
    "write_model",
]

import contextlib
import functools
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence

import onnx
import onnx_ir as ir

from converter.errors import ConverterError, InputError
from converter.gcpause import paused_collection
from converter.model_io import training
from converter.model_io.external_data import check_external_data
from converter.model_io.tensors import ir_tensors, tensor_attrs

logger = logging.getLogger(__name__)

#: Above this many tensor bytes, ``write_model(external_data=None)`` writes external data
#: (protobuf cannot serialize a message of 2 GiB or more; the rest leaves room for the graph).
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

_MIN_OPSET = 7
_MIN_IR_VERSION = 3  # the first IR version with opset_import
_MAX_MODEL_FILE_BYTES = 2**31 - 1  # protobuf's hard limit on one message
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
_TEMP_PREFIX = ".onnx-fuse-"


def _one_line(text: object) -> str:
    """Collapse any whitespace run (newlines included) so a message fits on one line."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- loading


@paused_collection()
def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model, refusing anything that is not a safe, supported model.

    External data stays on disk (lazy, memory-mapped on first use). Every external tensor,
    wherever it sits in the model, passes :func:`check_external_data` before anything is read.

    Raises:
        InputError: one line ``"<path>: <problem>"`` for a missing, unreadable, empty or corrupt
            file, a protobuf that is not a model, an unsupported IR version or opset, or a
            missing external data file.
        UnsafeModelError: external data that would be unsafe to read.
    """
    path = os.fspath(path)
    proto, external = _checked_proto(path)
    model_dir = os.path.dirname(os.path.abspath(path))
    try:
        with _scope_warnings_to_debug():
            model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx_ir raises a variety of types on malformed protos
        if _has_sparse(proto.graph):
            raise InputError(
                f"{path}: holds sparse tensors (a sparse initializer or a Constant's "
                "sparse_value), which onnx-fuse cannot read; densify them first"
            ) from None
        twice = _defined_twice(proto.graph, "main graph")
        if twice is not None:
            raise InputError(f"{path}: {twice}") from None
        raise InputError(f"{path}: is not a valid ONNX model ({_one_line(e)})") from None
    if external:  # a walk over every tensor: only when some live in external data
        _set_base_dir(model, model_dir)
    training.stash(model, proto)
    if logger.isEnabledFor(logging.DEBUG):  # sizing walks every tensor: only when it is shown
        logger.debug("loaded %s (%d tensor bytes)", path, model_size_bytes(model))
    return model


# onnx_ir warns, in several lines, of a value that no scope defines; the fuser refuses such a
# graph in one line naming the node (converter.fusion.core.order), so these go to the debug log.
_SCOPE_WARNINGS = ("Input '%s' of node", "Caveat: The value is created", "Output '%s' is not")


class _ScopeWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_SCOPE_WARNINGS):
            logger.debug("onnx_ir: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _scope_warnings_to_debug() -> Iterator[None]:
    serde_logger, only = logging.getLogger(ir.serde.__name__), _ScopeWarningFilter()
    serde_logger.addFilter(only)
    try:
        yield
    finally:
        serde_logger.removeFilter(only)


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """The file's ``ModelProto`` after :func:`load_model`'s checks (readable, a supported model,
    safe external data), not deserialised into onnx_ir and with external data not read."""
    return _checked_proto(os.fspath(path))[0]


def _checked_proto(path: str) -> tuple[onnx.ModelProto, int]:
    """The checked proto and how many of its tensors live in external data."""
    proto = _parse_model_file(path)
    _check_model_proto(proto, path)
    try:
        external = check_external_data(proto, os.path.dirname(os.path.abspath(path)))
    except InputError as e:
        raise type(e)(f"{path}: {e}") from None
    return proto, external


def _parse_model_file(path: str) -> onnx.ModelProto:
    """Read and parse ``path`` as a binary ModelProto (external data is not loaded)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory, not an ONNX model file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is not a regular file")
    if st.st_size == 0:
        raise InputError(f"{path}: is empty, not an ONNX model")
    if st.st_size > _MAX_MODEL_FILE_BYTES:
        raise InputError(
            f"{path}: is {st.st_size} bytes, over protobuf's 2 GiB limit; "
            "a model that large must keep its weights in external data"
        )
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror})") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # DecodeError, or RuntimeError from some protobuf backends
        raise InputError(
            f"{path}: is not an ONNX model (not a valid protobuf ModelProto: {_one_line(e)}); "
            "the file may be truncated or of another format"
        ) from None
    return proto


def _check_model_proto(proto: onnx.ModelProto, path: str) -> None:
    """Refuse a protobuf that parsed as a ModelProto but is not a supported model."""
    if not proto.HasField("graph"):
        raise InputError(
            f"{path}: is not an ONNX model: it has no graph "
            "(is it a serialized TensorProto, GraphProto or another protobuf?)"
        )
    if not _MIN_IR_VERSION <= proto.ir_version <= onnx.IR_VERSION:
        raise InputError(
            f"{path}: has IR version {proto.ir_version}; supported are "
            f"{_MIN_IR_VERSION}..{onnx.IR_VERSION} (upgrade onnx for newer models)"
        )
    opsets = [op.version for op in proto.opset_import if op.domain in _DEFAULT_DOMAINS]
    if not opsets:
        raise InputError(f"{path}: is not a usable ONNX model: it imports no ai.onnx opset")
    newest = onnx.defs.onnx_opset_version()
    # "" and "ai.onnx" are one domain; imported twice, onnxruntime (and onnx_ir) use the last.
    if not _MIN_OPSET <= opsets[-1] <= newest:
        raise InputError(
            f"{path}: uses ai.onnx opset {opsets[-1]}; supported are {_MIN_OPSET}..{newest} "
            "(convert the model with onnx.version_converter, or upgrade onnx)"
        )


# --------------------------------------------------------------------------- helpers


def _has_sparse(graph: onnx.GraphProto) -> bool:
    """``graph`` or a subgraph of it holds a sparse tensor."""
    if graph.sparse_initializer:
        return True
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("sparse_tensor") or attr.sparse_tensors:
                return True
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            if any(_has_sparse(g) for g in subgraphs):
                return True
    return False


def _defined_twice(graph: onnx.GraphProto, label: str) -> str | None:
    """A value ``graph`` (or a subgraph) defines twice, in words: ONNX graphs define each name
    once (static single assignment), and onnxruntime refuses one that does not. A graph input
    that is also an initializer is allowed (a weight the caller may override)."""
    defined = {v.name: "a graph input" for v in graph.input}
    defined.update((t.name, "an initializer") for t in graph.initializer)
    for node in graph.node:
        where = f"node '{node.name or node.op_type}'"
        for name in filter(None, node.output):
            if name in defined:
                return (
                    f"{label}: value '{name}' is defined twice, by {defined[name]} and by "
                    f"{where}; an ONNX graph defines each value once"
                )
            defined[name] = where
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found = _defined_twice(sub, f"{label}/{node.name or node.op_type}.{attr.name}")
                if found is not None:
                    return found
    return None


def _set_base_dir(model: ir.Model, model_dir: str) -> None:
    """Point every external tensor at ``model_dir`` (onnx_ir's own helper skips functions)."""
    for tensor in ir_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = model_dir


def model_size_bytes(model: ir.Model) -> int:
    """Total bytes of every tensor in ``model``, from dtypes and shapes; no data is read."""
    return sum(t.nbytes for t in _unique_tensors(model))


def _unique_tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    """Every tensor of ``model`` once (one tensor may back several values)."""
    return list({id(t): t for t in ir_tensors(model)}.values())


def is_same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (hard links, symlinks, ``..`` resolved).

    Paths that do not exist compare by their resolved absolute paths.
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        norm = os.path.normcase
        return norm(os.path.realpath(a)) == norm(os.path.realpath(b))


# -------------------------------------------------------------------- atomic writing


class PendingOutput:
    """A model written to a temporary folder beside its destination, not yet in place.

    ``path`` (and ``data_path``, or None) can be loaded from where they are, e.g. by
    onnxruntime, to validate the output before :meth:`commit` moves them into place.
    :meth:`discard` removes them. Used as a context manager it discards unless committed.

    After a commit that replaced a file the model itself read weights from (writing over the
    input with ``force=True``), those external tensors are invalidated: reload the output.
    """

    def __init__(
        self,
        externals: Sequence[ir.ExternalTensor],
        dst: str,
        tmp_dir: str,
        data_name: str | None,
    ) -> None:
        self._externals = externals  # the model's tensors that read files (see commit)
        self._tmp_dir = tmp_dir
        self._done = False
        self.dst = dst
        self.dst_data_path = os.path.join(os.path.dirname(dst), data_name) if data_name else None
        self.path = os.path.join(tmp_dir, os.path.basename(dst))
        self.data_path = os.path.join(tmp_dir, data_name) if data_name else None

    def __enter__(self) -> PendingOutput:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._done:
            self.discard()

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"PendingOutput(dst={self.dst!r}, path={self.path!r}, {state})"

    def commit(self) -> None:
        """Move the data file, then the ``.onnx``, into place; remove the temporary folder."""
        if self._done:
            raise ConverterError(f"{self.dst}: output was already committed or discarded")
        moves = [(self.path, self.dst)]
        if self.data_path is not None:
            moves.insert(0, (self.data_path, self.dst_data_path))
        stale = _tensors_reading(self._externals, [d for _, d in moves])
        try:
            for src, dst in moves:
                _keep_mode(dst, src)
                # Flush to disk before a rename that replaces a file (--force): after a power
                # loss the old file must not be gone with the new one still unwritten. A new
                # output replaces nothing, so it skips the flush (seconds on multi-GB models).
                if os.path.lexists(dst):
                    _fsync(src)
            for src, dst in moves:
                os.replace(src, dst)
            _fsync(os.path.dirname(self.dst))
        except OSError as e:
            self.discard()
            raise InputError(f"{self.dst}: cannot move the output into place ({e})") from None
        self._done = True
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        for tensor in stale:
            tensor.invalidate()
        if stale:
            logger.info("%d input tensors read files now replaced; reload %s", len(stale), self.dst)
        logger.info("wrote %s", self.dst)

    def discard(self) -> None:
        """Remove the temporary folder and everything in it (idempotent)."""
        self._done = True
        shutil.rmtree(self._tmp_dir, ignore_errors=True)


def write_model(
    model: ir.Model,
    dst: str | os.PathLike,
    *,
    external_data: str | None = None,
    force: bool = False,
    src: str | os.PathLike | None = None,
) -> PendingOutput:
    """Save ``model`` next to ``dst`` in a temporary folder and return it, not yet committed.

    Args:
        model: the model; it is left unchanged.
        dst: the final ``.onnx`` path. Its folder must exist.
        external_data: None writes one file, unless the tensors exceed
            :data:`EXTERNAL_DATA_THRESHOLD_BYTES`, then ``<dst name>.data`` beside it. A plain
            file name always writes tensors larger than 256 bytes to that file.
        force: allow replacing an existing regular file, a symlink at the destination (the link
            itself is replaced, never written through) and the input model ``src``. Anything
            else (a device such as ``/dev/null``, a pipe, a socket) is never replaced.
        src: the input model path, to refuse overwriting it without ``force``.

    Raises:
        InputError: a missing output folder, a bad ``external_data`` name, an existing output or
            the input as output without ``force``, or a failed write (nothing is left behind).
    """
    dst = _absolute_destination(dst)
    tensors = _unique_tensors(model)  # one walk: the size, and which tensors read files
    externals = [t for t in tensors if isinstance(t, ir.ExternalTensor)]
    data_name = _choose_data_name(sum(t.nbytes for t in tensors), dst, external_data)
    targets = [dst] + ([os.path.join(os.path.dirname(dst), data_name)] if data_name else [])
    _check_destination(dst, targets, force=force, src=src)
    pending = PendingOutput(externals, dst, make_temp_dir(os.path.dirname(dst)), data_name)
    _fill(pending, lambda: _save(model, pending.path, data_name, inline=bool(externals)))
    logger.debug("wrote %s (external data: %s), pending commit", pending.path, data_name)
    return pending


def write_copy(
    src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False
) -> PendingOutput:
    """Copy the model file ``src`` byte for byte to a temporary folder beside ``dst``.

    For a model nothing was done to: the output is the input, not a re-serialisation of it
    (which would add ``value_info`` and reorder fields). Same checks and commit as
    :func:`write_model`; a model with external data must be written with that instead.
    """
    dst = _absolute_destination(dst)
    _check_destination(dst, [dst], force=force, src=src)
    pending = PendingOutput([], dst, make_temp_dir(os.path.dirname(dst)), None)
    _fill(pending, lambda: shutil.copyfile(src, pending.path))
    return pending


def has_external_data(model: ir.Model) -> bool:
    """True when any tensor of ``model`` lives in an external data file."""
    return any(isinstance(t, ir.ExternalTensor) for t in ir_tensors(model))


def _absolute_destination(dst: str | os.PathLike) -> str:
    if os.fspath(dst) == "-":
        raise InputError(
            "-: writing the model to stdout is not supported; give a file name "
            "(./- for a file named '-')"
        )
    return os.path.abspath(os.fspath(dst))


def _fill(pending: PendingOutput, write: Callable[[], object]) -> None:
    """Run ``write`` into ``pending``'s folder; on any failure or interrupt, remove the folder."""
    try:
        write()
    except OSError as e:
        pending.discard()
        raise InputError(f"{pending.dst}: cannot write the output ({_one_line(e)})") from None
    except BaseException:
        pending.discard()
        raise


# ------------------------------------------------------------- temporary folders


def _temp_prefix() -> str:
    """``.onnx-fuse-<pid>@<host>-``: a later run can tell whether the owner is gone."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    return f"{_TEMP_PREFIX}{os.getpid()}@{host}-"


_LEFTOVER = re.compile(re.escape(_TEMP_PREFIX) + r"(\d+)@([A-Za-z0-9_]+)-[^/]+$")


def make_temp_dir(folder: str) -> str:
    """A new temporary folder in ``folder`` named after this process (leftovers removed first)."""
    remove_leftovers(folder)
    try:
        return tempfile.mkdtemp(prefix=_temp_prefix(), dir=folder)
    except OSError as e:
        raise InputError(f"{folder}: cannot write to the output folder ({e.strerror})") from None


def remove_leftovers(folder: str) -> list[str]:
    """Remove temporary folders in ``folder`` left by onnx-fuse runs on this host that are gone.

    A run killed hard (SIGKILL, the out-of-memory killer) cannot clean up; its folder is named
    with its pid and host, so a later run removes it once no process of that pid is alive.
    Folders of other hosts (a shared filesystem) and of live processes are left alone.
    """
    host = _temp_prefix().rsplit("@", 1)[1][:-1]
    removed = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            match = _LEFTOVER.match(entry.name)
            if not match or match.group(2) != host or _alive(int(match.group(1))):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
                logger.info("removed %s, left by a run that was killed", entry.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def _choose_data_name(size: int, dst: str, external_data: str | None) -> str | None:
    """Apply the external data policy to a model of ``size`` tensor bytes; validate a name."""
    if external_data is None:
        if size <= EXTERNAL_DATA_THRESHOLD_BYTES:
            return None
        name = os.path.basename(dst) + ".data"
        logger.info("%s: %d tensor bytes, writing external data to %s", dst, size, name)
        return name
    name = external_data
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0")
        or name == os.path.basename(dst)
    ):
        raise InputError(
            f"{dst}: external data name {name!r} must be a plain file name "
            "(no folder, no '..', not the model's own name)"
        )
    return name


def _check_destination(
    dst: str, targets: list[str], *, force: bool, src: str | os.PathLike | None
) -> None:
    """Refuse a missing folder, a folder as target, and without ``force`` any existing target."""
    folder = os.path.dirname(dst)
    if not os.path.isdir(folder):
        raise InputError(f"{dst}: the output folder {folder!r} does not exist")
    if src is not None and not force and is_same_file(src, dst):
        raise InputError(f"{dst}: is the input model; pass --force (force=True) to overwrite it")
    for target in targets:
        if os.path.isdir(target) and not os.path.islink(target):
            raise InputError(f"{target}: is a directory; choose another output name")
        if os.path.exists(target) and not os.path.islink(target) and not os.path.isfile(target):
            raise InputError(
                f"{target}: is not a regular file (a device, pipe or socket); onnx-fuse only "
                "replaces regular files, even with --force"
            )
        if force or not os.path.lexists(target):
            continue
        if os.path.islink(target):
            raise InputError(
                f"{target}: is a symlink; pass --force (force=True) to replace the link itself"
            )
        raise InputError(f"{target}: already exists; pass --force (force=True) to overwrite it")


def _save(model: ir.Model, path: str, data_name: str | None, *, inline: bool) -> None:
    """``ir.save`` with every external tensor the output cannot reference made in-memory.

    ``ir.save`` streams external *initializers* into ``data_name``; tensors in attributes
    (``Constant.value``, functions) and, for a single-file output, all tensors must be inlined,
    or the output would point at the input's data file by a path relative to the wrong folder.
    """
    if not inline:  # no tensor reads a file: nothing to inline (and no walk over them all)
        ir.save(model, path, external_data=data_name)
    else:
        with _inlined_external_tensors(model, initializers=data_name is None):
            ir.save(model, path, external_data=data_name)
    training.restore_file(model, path)


@contextlib.contextmanager
def _inlined_external_tensors(model: ir.Model, *, initializers: bool) -> Iterator[None]:
    """Temporarily replace external attribute tensors (and initializers) by in-memory ones."""
    undo: list[Callable[[], None]] = []
    try:
        if initializers:
            for graph in model.graphs():
                for value in graph.initializers.values():
                    if isinstance(value.const_value, ir.ExternalTensor):
                        undo.append(functools.partial(_set_const, value, value.const_value))
                        value.const_value = _in_memory(value.const_value)
        for node, name, attr in list(tensor_attrs(model)):
            values = (attr.value,) if attr.type == ir.AttributeType.TENSOR else attr.value
            if any(isinstance(t, ir.ExternalTensor) for t in values):
                undo.append(functools.partial(node.attributes.__setitem__, name, attr))
                inlined = [_in_memory(t) for t in values]
                new = inlined[0] if attr.type == ir.AttributeType.TENSOR else inlined
                node.attributes[name] = ir.Attr(name, attr.type, new, doc_string=attr.doc_string)
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _set_const(value: ir.Value, tensor: ir.TensorProtocol) -> None:
    value.const_value = tensor


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """An ``ir.Tensor`` over an external tensor's (memory-mapped) array; others unchanged."""
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    return ir.Tensor(
        tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string
    )


def _tensors_reading(
    externals: Sequence[ir.ExternalTensor], paths: list[str]
) -> list[ir.ExternalTensor]:
    """The tensors of ``externals`` backed by one of the existing files at ``paths``."""
    existing = [p for p in paths if os.path.exists(p)]
    if not existing:
        return []
    return [t for t in externals if any(is_same_file(t.path, p) for p in existing)]


def _keep_mode(old: str, new: str) -> None:
    """Give ``new`` the permission bits of the regular file it replaces, if any."""
    if os.path.isfile(old) and not os.path.islink(old):
        shutil.copymode(old, new)


def _fsync(path: str) -> None:
    """Flush a file or folder to disk; some filesystems refuse folders, which is harmless."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
