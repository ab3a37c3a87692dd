"""The public API is exactly what ``converter.__all__`` names, and every name imports."""

from __future__ import annotations

import importlib

import converter


def test_every_public_name_imports():
    for name in converter.__all__:
        assert getattr(converter, name) is not None, name


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


def test_pass_is_an_onnx_ir_in_place_pass():
    import onnx_ir as ir

    assert issubclass(converter.FuseLinearChainsPass, ir.passes.InPlacePass)


def test_algebra_imports_no_graph_library():
    algebra = importlib.import_module("converter.fusion.linear.algebra")
    with open(algebra.__file__, encoding="utf-8") as f:
        source = f.read()
    assert "import onnx" not in source and "onnx_ir" not in source
