"""Build the small example models with torch and export them to ONNX.

Run ``python models/make_models.py [--out-dir DIR]`` to (re)write the ``.onnx`` files kept next to
this script, so the README's first command works without a download. Every model is seeded, so the
files are reproducible, and exported with the legacy exporter (``dynamo=False``), opset 17, with a
dynamic ``batch`` axis (and a dynamic ``seq`` axis for ``batched_3d``).

torch exports ``nn.Linear`` as ``Gemm(transB=1)`` for a 2-D input and as ``MatMul`` with an
``(in, out)`` weight followed by ``Add`` for an N-D input. What onnx-fuse should do with each model:

==========  ==========================================  =======================================
model       layers                                      after ``fuse(policy="cost")``
==========  ==========================================  =======================================
two_layer   Linear(16,32) -> Linear(32,8), 2-D          one Gemm
four_layer  64 -> 128 -> 128 -> 64 -> 32, 2-D           one Gemm
batched_3d  32 -> 64 -> 48 -> 16 on (batch, seq, 32)    one MatMul + Add
fp16_chain  32 -> 64 -> 64 -> 16, float16, 2-D          one Gemm
low_rank    Linear(256,16) -> Linear(16,256), 2-D       unchanged: merged it would be 8x bigger
relu_mlp    Linear -> ReLU -> Linear -> ReLU -> Linear  unchanged: ReLU is not linear
recurrent   two steps of h = tanh(x W_ih + h W_hh),     unchanged: every pair of linear ops is
            then Linear(100, 6); inputs x1, x2, h0      separated by tanh or has two inputs
==========  ==========================================  =======================================

``recurrent`` (see :class:`Recurrent`) is the ``onnx-fuse inspect`` example: five Linear layers
(12 -> 100, 100 -> 100 without bias, 12 -> 100, 100 -> 100 without bias, 100 -> 6) of a small
recurrent network unrolled over two time steps. It has three inputs, so it is built by
:func:`export_recurrent` rather than listed in ``MODEL_NAMES``.

The builders are importable so tests can export every module with both exporters::

    from models.make_models import build_modules, export
    module, example = build_modules()["two_layer"][:2]
    program = export("two_layer", tmp_path / "two_layer.onnx", dynamo=True)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "EXPECTED_LINEAR_OPS",
    "MODEL_NAMES",
    "OPSET",
    "Example",
    "build_module",
    "build_modules",
    "export",
    "export_recurrent",
    "Recurrent",
    "main",
]

OPSET = 17
_BATCH = 4  # example batch size; torch.export specialises sizes 0 and 1, so avoid them
_SEQ = 5


class Example(NamedTuple):
    """A module in eval mode, an input to trace it with, and the input's dynamic axes."""

    module: nn.Module
    example_input: torch.Tensor
    dynamic_axes: dict[int, str]


def _chain(*widths: int) -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(a, b) for a, b in pairwise(widths)))


def _two_layer() -> tuple[nn.Module, tuple[int, ...]]:
    return _chain(16, 32, 8), (_BATCH, 16)


def _four_layer() -> tuple[nn.Module, tuple[int, ...]]:
    return _chain(64, 128, 128, 64, 32), (_BATCH, 64)


def _batched_3d() -> tuple[nn.Module, tuple[int, ...]]:
    return _chain(32, 64, 48, 16), (_BATCH, _SEQ, 32)


def _fp16_chain() -> tuple[nn.Module, tuple[int, ...]]:
    return _chain(32, 64, 64, 16).half(), (_BATCH, 32)


def _low_rank() -> tuple[nn.Module, tuple[int, ...]]:
    return _chain(256, 16, 256), (_BATCH, 256)


def _relu_mlp() -> tuple[nn.Module, tuple[int, ...]]:
    layers = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    return layers.append(nn.Linear(64, 16)), (_BATCH, 32)


_BUILDERS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "two_layer": _two_layer,
    "four_layer": _four_layer,
    "batched_3d": _batched_3d,
    "fp16_chain": _fp16_chain,
    "low_rank": _low_rank,
    "relu_mlp": _relu_mlp,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)

# Gemm + MatMul nodes in the main graph after ``converter.fuse(model, policy="cost")``.
EXPECTED_LINEAR_OPS: dict[str, int] = {
    "two_layer": 1,
    "four_layer": 1,
    "batched_3d": 1,
    "fp16_chain": 1,
    "low_rank": 2,
    "relu_mlp": 3,
}


class Recurrent(nn.Module):
    """``h = tanh(x W_ih + h W_hh)`` unrolled over two steps, then ``y = h W_out + b``."""

    def __init__(self, features: int = 12, hidden: int = 100, outputs: int = 6) -> None:
        super().__init__()
        self.ih1 = nn.Linear(features, hidden)
        self.hh1 = nn.Linear(hidden, hidden, bias=False)
        self.ih2 = nn.Linear(features, hidden)
        self.hh2 = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        h1 = torch.tanh(self.ih1(x1) + self.hh1(h0))
        h2 = torch.tanh(self.ih2(x2) + self.hh2(h1))
        return self.out(h2)


def export_recurrent(path: str | Path, seed: int = 0) -> None:
    """Export :class:`Recurrent` (legacy exporter, opset 17, dynamic ``batch``) to ``path``."""
    torch.manual_seed(seed)
    module = Recurrent().eval()
    inputs = (torch.randn(_BATCH, 12), torch.randn(_BATCH, 12), torch.randn(_BATCH, 100))
    names = ["x1", "x2", "h0"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module,
            inputs,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=["y"],
            dynamic_axes={name: {0: "batch"} for name in [*names, "y"]},
        )


def build_module(name: str, seed: int = 0) -> Example:
    """Build model ``name``, its weights and example input drawn after ``manual_seed(seed)``."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown example model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    torch.manual_seed(seed)
    module, shape = _BUILDERS[name]()
    module.eval()
    dtype = next(module.parameters()).dtype
    axes = {0: "batch", 1: "seq"} if len(shape) == 3 else {0: "batch"}
    return Example(module, torch.randn(shape).to(dtype), axes)


def build_modules(seed: int = 0) -> dict[str, Example]:
    """Every example model by name, each built from the same ``seed``."""
    return {name: build_module(name, seed) for name in MODEL_NAMES}


def export(name: str, path: str | Path, *, dynamo: bool = False, seed: int = 0):
    """Export example model ``name`` to ``path`` (weights inline) and return what torch returned.

    ``dynamo=False`` uses the legacy TorchScript exporter at opset 17 and returns ``None``;
    ``dynamo=True`` uses ``torch.export`` at the exporter's own default opset (asking it for 17
    makes it export 18 and down-convert) and returns the ``torch.onnx.ONNXProgram``, whose
    ``.model`` is an ``onnx_ir.Model`` and ``.model_proto`` a ``ModelProto``.
    """
    module, example, axes = build_module(name, seed)
    names = {"input_names": ["x"], "output_names": ["y"]}
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own notices about its exporters (legacy deprecated, pytree renames)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if not dynamo:
            dynamic_axes = {"x": axes, "y": axes}
            return torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                dynamic_axes=dynamic_axes,
                **names,
            )
        dims = {axis: torch.export.Dim(label) for axis, label in axes.items()}
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=(dims,),
            verbose=False,
            **names,
        )
    program.save(str(path), external_data=False)
    return program


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory to write the .onnx files to (default: next to this script)",
    )
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_NAMES:
        path = args.out_dir / f"{name}.onnx"
        export(name, path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
    path = args.out_dir / "recurrent.onnx"
    export_recurrent(path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
