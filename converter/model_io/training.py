"""Keep a model's ``training_info`` through onnx-ir, which does not represent it.

onnx-ir drops ``ModelProto.training_info`` on load. We stash the serialised protos in the
model's ``meta`` when loading, mark every initializer the training algorithm reads or updates
(the fusion run is handed them, so it will not merge them away: a merged weight can no longer
be trained), and put the protos back on the output proto.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

__all__ = [
    "TRAINED",
    "stash",
    "mark_trained",
    "marked",
    "restore",
    "restore_file",
]

_KEY = "onnx_fuse.training_info"
#: ``Value.meta`` key set on initializers that a ``training_info`` binding names.
TRAINED = "onnx_fuse.trained"


def stash(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Remember ``proto.training_info`` on ``model`` (no-op when there is none)."""
    if proto.training_info:
        model.meta[_KEY] = [t.SerializeToString() for t in proto.training_info]


def _training_infos(model: ir.Model) -> list[onnx.TrainingInfoProto]:
    infos = []
    for data in model.meta.get(_KEY, ()):
        info = onnx.TrainingInfoProto()
        info.ParseFromString(data)
        infos.append(info)
    return infos


def _bound_names(info: onnx.TrainingInfoProto) -> set[str]:
    names = set()
    for binding in (*info.initialization_binding, *info.update_binding):
        names.update((binding.key, binding.value))
    return names


def mark_trained(model: ir.Model) -> frozenset[ir.Value]:
    """Set ``meta[TRAINED]`` on every initializer a training binding names; return them."""
    names = set().union(*(_bound_names(i) for i in _training_infos(model)))
    marked = []
    for name in names:
        value = model.graph.initializers.get(name)
        if value is not None:
            value.meta[TRAINED] = True
            marked.append(value)
    return frozenset(marked)


def marked(model: ir.Model) -> frozenset[ir.Value]:
    """The initializers :func:`mark_trained` marked in ``model`` (none if it never ran)."""
    return frozenset(v for v in model.graph.initializers.values() if v.meta.get(TRAINED))


def restore(model: ir.Model, proto: onnx.ModelProto) -> onnx.ModelProto:
    """Put the stashed ``training_info`` back on ``proto`` (the serialised ``model``)."""
    proto.training_info.extend(_training_infos(model))
    return proto


def restore_file(model: ir.Model, path: str) -> None:
    """Add the stashed ``training_info`` to the model file at ``path`` (weights stay in place)."""
    if model.meta.get(_KEY):
        proto = onnx.load(path, load_external_data=False)
        onnx.save(restore(model, proto), path)
