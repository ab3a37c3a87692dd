"""The public API is what ``converter.__all__`` names, and each name does what it is for.

Each test exercises the objects rather than reading the source: a tiny two-layer model goes
through ``fuse``, the pass and ``check_equivalence``; the errors carry their exit codes; and the
pure algebra modules run in an interpreter where no graph library can be imported at all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from builders import linear_chain

import converter

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_is_small_and_complete():
    expected = {
        "fuse",
        "fuse_file",
        "export",
        "FuseLinearChainsPass",
        "FusionReport",
        "check_equivalence",
        "EquivalenceReport",
        "BenchmarkOptions",
        "BenchmarkResult",
        "ConverterError",
        "ValidationError",
    }
    assert expected <= set(converter.__all__)
    assert len(converter.__all__) == len(set(converter.__all__))
    assert set(converter.__all__) <= set(dir(converter))


def test_fuse_the_pass_and_check_equivalence_work_together(tmp_path):
    model = linear_chain([6, 5, 4])
    fused = converter.fuse(model)
    assert isinstance(fused, onnx.ModelProto)
    assert [n.op_type for n in fused.graph.node] == ["Gemm"]
    ir_model = ir.serde.deserialize_model(model)
    result = converter.FuseLinearChainsPass()(ir_model)
    assert isinstance(converter.FuseLinearChainsPass(), ir.passes.InPlacePass)
    assert result.modified and isinstance(result.report, converter.FusionReport)
    assert len(result.report.fusions) == 1 and result.report.to_dict()["fusions"]
    onnx.save(model, tmp_path / "a.onnx")
    onnx.save(fused, tmp_path / "b.onnx")
    report = converter.check_equivalence(tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert isinstance(report, converter.EquivalenceReport) and report.passed


def test_fuse_file_writes_and_reports(tmp_path):
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(linear_chain([6, 5, 4]), src)
    report = converter.fuse_file(src, dst)
    assert report.validated and dst.exists()
    assert onnx.load(dst).graph.node[0].op_type == "Gemm"


@pytest.mark.parametrize(("name", "code"), [("ConverterError", 2), ("ValidationError", 1)])
def test_errors_carry_their_exit_codes(name, code):
    error = getattr(converter, name)
    assert issubclass(error, Exception) and error("x").exit_code == code
    assert issubclass(converter.ValidationError, converter.ConverterError)


_NO_GRAPH_LIBRARY = """
import importlib.abc, importlib.util, sys, types
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"onnx", "onnx_ir", "onnxruntime", "torch", "onnxscript"}:
            raise ImportError("no graph library here: " + name)
sys.meta_path.insert(0, Refuse())
root = sys.argv[1]
for package in ("converter", "converter.fusion", "converter.fusion.core",
                "converter.fusion.linear", "converter.fusion.conv"):  # without their __init__
    module = types.ModuleType(package)
    module.__path__ = [root + "/" + package.replace(".", "/")]
    sys.modules[package] = module
import numpy as np
from converter.fusion.linear import algebra
from converter.fusion.conv import algebra as conv_algebra, geometry
a = algebra.AffineMap(np.eye(3) * 2, np.ones(3))
b = algebra.compose(a, algebra.AffineMap(np.eye(3), None))
assert np.allclose(b.weight, np.eye(3) * 2) and np.allclose(b.bias, 1)
assert conv_algebra.ConvMap and geometry.ConvGeometry
print("pure")
"""


def test_the_algebra_runs_without_any_graph_library():
    """The float64 algebra (linear and conv) is pure numpy: it imports and computes in an
    interpreter that refuses every graph library."""
    done = subprocess.run(
        [sys.executable, "-c", _NO_GRAPH_LIBRARY, str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "pure", done.stderr[-2000:]


def test_a_refused_library_would_be_caught():
    """The guard of the test above works: importing onnx under it fails."""
    script = _NO_GRAPH_LIBRARY.split("root = sys.argv[1]")[0] + "import onnx\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert done.returncode != 0 and b"no graph library here: onnx" in done.stderr
