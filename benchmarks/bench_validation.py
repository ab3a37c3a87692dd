"""What validation costs next to fusing, on models of many small chains, measured in one run.

A model of ``N`` small chains (issue #9: "10,000 small chains, 30,000 nodes"): one input
``x: [batch, 16]`` feeds ``N`` independent chains ``Gemm(16 -> 16) -> Gemm(16 -> 8) -> Relu``
(``Gemm(transB=1)``, as torch exports ``nn.Linear``), and their results are joined by one
``Concat`` into the single output ``y: [batch, 8 N]``. So the model has ``3 N + 1`` nodes, ``N``
fusions (each pair of Gemms becomes one) and one graph output; ``--layout outputs`` instead makes
every chain's ``Relu`` a graph output (``N`` outputs, no ``Concat``).

For ``N`` = 1,000 and 10,000 it runs ``converter.fuse_file(src, dst)`` with the default settings
(validation on, 3 trials) and splits the wall time with the progress callback: *fusion* is
everything up to the ``validating`` stage (load, fuse, write the temporary output), *validation*
the rest (the onnxruntime sessions, the trials, the comparisons and the final move). It prints
both, their ratio (target: validation <= 1x fusion) and the time per chain of each (linear growth:
the per-chain times stay flat from 1,000 to 10,000 chains). The figures are printed, not asserted.

The process runs with Python's cyclic garbage collector off, as the ``onnx-fuse`` executable does
(:func:`converter.cli.run`): with it on, the first collection after ``fuse_file`` turns it back on
walks every object the run made (0.7 s at 10,000 chains), and that lands after the ``validating``
stage, in *validation*, though most of those objects are the loaded and fused model's.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, if not installed

import converter

IN, HIDDEN, OUT = 16, 16, 8
SIZES = (1_000, 10_000)
RATIO_TARGET = 1.0


def build_model(chains: int, *, layout: str = "concat", seed: int = 0) -> onnx.ModelProto:
    """``chains`` chains ``x -> Gemm -> Gemm -> Relu`` joined by a Concat (or one output each)."""
    rng = np.random.default_rng(seed)
    nodes, inits, relus = [], [], []
    for i in range(chains):
        w1 = rng.uniform(-0.25, 0.25, (HIDDEN, IN)).astype(np.float32)
        w2 = rng.uniform(-0.25, 0.25, (OUT, HIDDEN)).astype(np.float32)
        b1, b2 = (rng.uniform(-0.25, 0.25, n).astype(np.float32) for n in (HIDDEN, OUT))
        names = [f"c{i}.{p}" for p in ("w1", "b1", "w2", "b2")]
        inits += [
            numpy_helper.from_array(a, n) for a, n in zip((w1, b1, w2, b2), names, strict=True)
        ]
        nodes += [
            helper.make_node("Gemm", ["x", names[0], names[1]], [f"c{i}.h"], transB=1),
            helper.make_node("Gemm", [f"c{i}.h", names[2], names[3]], [f"c{i}.g"], transB=1),
            helper.make_node("Relu", [f"c{i}.g"], [f"c{i}.y"]),
        ]
        relus.append(f"c{i}.y")
    if layout == "concat":
        nodes.append(helper.make_node("Concat", relus, ["y"], axis=1))
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT * chains])]
    else:
        outputs = [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", OUT]) for n in relus
        ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])
    graph = helper.make_graph(nodes, f"chains{chains}", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class _PhaseClock:
    """A progress callback that notes when validation starts."""

    def __init__(self) -> None:
        self.start = _now()
        self.validating: tuple[float, float] | None = None

    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        if stage == "validating" and self.validating is None:
            self.validating = _now()


def _now() -> tuple[float, float]:
    """Wall and CPU seconds (CPU: every thread of this process; the machine may be shared)."""
    return time.perf_counter(), time.process_time()


def measure(folder: Path, chains: int, layout: str) -> tuple[tuple[float, ...], str]:
    """Fusion and validation seconds (wall, then CPU) of one ``fuse_file`` run, and its verdict."""
    src, dst = folder / f"chains{chains}.onnx", folder / f"chains{chains}.fused.onnx"
    onnx.save(build_model(chains, layout=layout), src)
    clock = _PhaseClock()
    report = converter.fuse_file(src, dst, force=True, progress=clock)
    end = _now()
    if clock.validating is None:
        raise RuntimeError(f"{src}: nothing was validated ({len(report.fusions)} fusions)")
    verdict = "passed" if report.validated else "FAILED"
    (w0, c0), (w1, c1), (w2, c2) = clock.start, clock.validating, end
    return (w1 - w0, w2 - w1, c1 - c0, c2 - c1), verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="chain counts")
    p.add_argument("--layout", choices=("concat", "outputs"), default="concat")
    args = p.parse_args(argv)
    gc.disable()  # as the onnx-fuse executable runs (see the module docstring)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_validation-") as tmp:
        for chains in args.sizes:
            (fusion, validation, fusion_cpu, validation_cpu), verdict = measure(
                Path(tmp), chains, args.layout
            )
            rows.append((chains, fusion_cpu, validation_cpu))
            ratio = validation / fusion
            met = "met" if ratio <= RATIO_TARGET else "NOT MET"
            print(
                f"{chains:>6} chains ({3 * chains + (args.layout == 'concat'):,} nodes, "
                f"layout {args.layout}): fusion {fusion:.2f} s, validation {validation:.2f} s "
                f"({verdict}) -> ratio {ratio:.2f} (target <= {RATIO_TARGET:g}) {met}\n"
                f"        CPU: fusion {fusion_cpu:.2f} s, validation {validation_cpu:.2f} s -> "
                f"ratio {validation_cpu / fusion_cpu:.2f}; per chain: fusion "
                f"{1e3 * fusion_cpu / chains:.3f} ms, validation {1e3 * validation_cpu / chains:.3f} ms"
            )
    if len(rows) >= 2:
        (n0, f0, v0), (n1, f1, v1) = rows[0], rows[-1]
        print(
            f"growth in CPU time {n0} -> {n1} chains ({n1 / n0:g}x): fusion {f1 / f0:.1f}x, "
            f"validation {v1 / v0:.1f}x (linear: {n1 / n0:g}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
