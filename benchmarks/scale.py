"""Cost that grows with the model, not faster (issue 8): time and memory per chain at 3 sizes.

Builds, in a temporary folder, models of ``N`` = 100, 1,000 and 10,000 small independent linear
chains (each ``Gemm -> Gemm -> Relu`` on its own slice of features, 3 nodes a chain, all joined by
one ``Concat``; 30,000 nodes at 10,000 chains), plus one graph of a single long chain of 10,000
``MatMul`` ops whose widths alternate so that the cost model splits it into many segments. For
each model, each command in a fresh subprocess (peak RSS from ``getrusage(RUSAGE_CHILDREN)`` in a
wrapper):

* ``io``: onnx_ir's own ``ir.load`` + ``ir.save`` of the file: the floor;
* ``fuse``: ``python -m converter MODEL -o OUT --no-validate``;
* ``validated``: the same with validation (``--trials 1``), for information.

It prints, per model: wall seconds and peak RSS of each, ``fuse/io``, and microseconds per chain
for fusing and validating; then the growth of the per-chain time from the smallest to the largest
model (target: within 1.3x) and ``fuse/io`` at 10,000 chains (target: <= 1.5x). The interpreter's
start-up and imports are in every command's time (about the same for each side, 0.7-0.9 s here);
the per-chain figures subtract the ``io`` time to show the tool's own work. At 100 chains that work
is a tenth of a second, the size of the machine's noise, so each command runs ``--rounds`` times,
interleaved, the fastest run is kept, and the growth is also printed from 1,000 chains. It asserts
nothing and exits 0.

    python benchmarks/scale.py [--sizes 100 1000 10000] [--long 10000] [--no-validated] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]

_WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"code": code, "wall": wall, "peak": peak}))
"""

_IO = r"""
import sys, onnx_ir as ir
ir.save(ir.load(sys.argv[1]), sys.argv[2])
"""


def _tensor(array: np.ndarray, name: str) -> ir.Value:
    return ir.Value(name=name, const_value=ir.Tensor(array, name=name))


def build_chains(n: int, path: Path, width: int = 4, seed: int = 0) -> None:
    """``n`` chains ``Gemm -> Gemm -> Relu``, each on its own ``width`` features, concatenated."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", width]))
    graph = ir.Graph([x], [], nodes=[], name="chains", opset_imports={"": 17})
    outs = []
    for i in range(n):
        prev = x
        for k in range(2):
            w = _tensor(rng.standard_normal((width, width)).astype(np.float32), f"W{i}_{k}")
            b = _tensor(rng.standard_normal(width).astype(np.float32), f"b{i}_{k}")
            graph.register_initializer(w)
            graph.register_initializer(b)
            node = ir.node("Gemm", [prev, w, b], attributes={"transB": 1}, name=f"fc{i}_{k}")
            node.outputs[0].name = f"h{i}_{k}"
            graph.append(node)
            prev = node.outputs[0]
        relu = ir.node("Relu", [prev], name=f"act{i}")
        relu.outputs[0].name = f"r{i}"
        graph.append(relu)
        outs.append(relu.outputs[0])
    concat = ir.node("Concat", outs, attributes={"axis": 1}, name="concat")
    concat.outputs[0].name = "y"
    concat.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    concat.outputs[0].shape = ir.Shape(["b", n * width])
    graph.append(concat)
    graph.outputs.append(concat.outputs[0])
    ir.save(ir.Model(graph, ir_version=8), path)


def build_long_chain(k: int, path: Path, seed: int = 0) -> None:
    """One chain of ``k`` MatMuls whose widths go 16, 16, 2, 16, 16, 2, ...: split every 3."""
    rng = np.random.default_rng(seed)
    widths = [(16, 16, 2)[i % 3] for i in range(k + 1)]
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", 16]))
    graph = ir.Graph([x], [], nodes=[], name="long", opset_imports={"": 17})
    prev = x
    for i in range(k):
        a, b = widths[i], widths[i + 1]
        w = _tensor((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}")
        graph.register_initializer(w)
        node = ir.node("MatMul", [prev, w], name=f"mm{i}")
        node.outputs[0].name = f"h{i}"
        graph.append(node)
        prev = node.outputs[0]
    prev.type = ir.TensorType(ir.DataType.FLOAT)
    prev.shape = ir.Shape(["b", widths[-1]])
    graph.outputs.append(prev)
    ir.save(ir.Model(graph, ir_version=8), path)


def measure(args: list[str]) -> dict[str, float]:
    """Run ``args`` in a wrapper process: wall seconds and peak RSS bytes."""
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, cwd=ROOT
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        print(f"  command failed ({result['code']}): {' '.join(args)}", file=sys.stderr)
    return result


def _run_model(
    model: Path, work: Path, validated: bool, rounds: int
) -> dict[str, dict[str, float]]:
    """Each command ``rounds`` times, interleaved; the fastest round of each is kept."""
    tool = [sys.executable, "-m", "converter", str(model), "--force", "-q"]
    commands = {
        "io": [sys.executable, "-c", _IO, str(model), str(work / "io.onnx")],
        "fuse": [*tool, "-o", str(work / "fused.onnx"), "--no-validate"],
    }
    if validated:
        commands["validated"] = [*tool, "-o", str(work / "valid.onnx"), "--trials", "1"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    for _ in range(rounds):  # a single run of a short command is mostly the machine's noise
        for name, args in commands.items():
            runs[name].append(measure(args))
    return {name: min(results, key=lambda r: r["wall"]) for name, results in runs.items()}


def _row(name: str, chains: int, r: dict[str, dict[str, float]]) -> dict[str, float]:
    io, fuse = r["io"]["wall"], r["fuse"]["wall"]
    row = {
        "chains": chains,
        "io_s": io,
        "fuse_s": fuse,
        "fuse_over_io": fuse / io,
        "fuse_us_per_chain": (fuse - io) / chains * 1e6,
        "fuse_peak_mb": r["fuse"]["peak"] / 2**20,
    }
    line = (
        f"{name:>14}: io {io:6.2f}s  fuse {fuse:6.2f}s ({fuse / io:4.2f}x io, "
        f"{row['fuse_us_per_chain']:7.1f} us/chain over io, peak {row['fuse_peak_mb']:5.0f} MB)"
    )
    if "validated" in r:
        valid = r["validated"]["wall"]
        row["validate_us_per_chain"] = (valid - fuse) / chains * 1e6
        line += f"  validated {valid:6.2f}s ({row['validate_us_per_chain']:7.1f} us/chain)"
    print(line, flush=True)
    return row


def _growth(what: str, key: str, first: dict[str, float], last: dict[str, float]) -> None:
    """Print how a per-chain time grew from ``first`` to ``last`` (target: within 1.3x)."""
    sizes = f"{first['chains']} -> {last['chains']} chains"
    if first[key] <= 0 or last[key] <= 0:  # the difference of two walls drowned in noise
        print(f"{what} time per chain, {sizes}: n/a (a per-chain time is not positive)")
        return
    print(f"{what} time per chain, {sizes}: {last[key] / first[key]:.2f}x (target <= 1.3x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--long", type=int, default=10000, help="ops in the long chain (0: skip)")
    parser.add_argument("--no-validated", action="store_true", help="skip the validated runs")
    parser.add_argument("--rounds", type=int, default=3, help="runs per command (fastest kept)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in args.sizes:
            model = work / f"chains{n}.onnx"
            start = time.perf_counter()
            build_chains(n, model)
            print(f"built {n} chains ({3 * n + 1} nodes) in {time.perf_counter() - start:.1f}s")
            results = _run_model(model, work, not args.no_validated, args.rounds)
            rows.append(_row(f"{n} chains", n, results))
        if args.long:
            model = work / "long.onnx"
            build_long_chain(args.long, model)
            results = _run_model(model, work, False, args.rounds)
            long_row = _row(f"{args.long}-op chain", args.long, results)
    last = rows[-1]
    for first in rows[:-1]:  # the smallest model's figure carries the start-up noise
        _growth("fuse", "fuse_us_per_chain", first, last)
        if "validate_us_per_chain" in last:
            _growth("validation", "validate_us_per_chain", first, last)
    print(f"fuse/io at {last['chains']} chains: {last['fuse_over_io']:.2f}x (target <= 1.5x)")
    if args.long:
        print(f"{args.long}-op chain: fuse/io {long_row['fuse_over_io']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
