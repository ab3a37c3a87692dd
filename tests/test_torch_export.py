"""End-to-end tests on models exported from torch by both exporters.

Every example model of ``models/make_models.py`` is exported with the legacy TorchScript
exporter (``dynamo=False``, opset 17: ``Gemm(transB=1)`` for 2-D inputs, ``MatMul`` + ``Add(bias,
y)`` for N-D inputs) and with the ``torch.export`` exporter (``dynamo=True``, its default opset:
``Gemm`` for 2-D inputs, ``MatMul`` + ``Add(y, bias)`` for N-D inputs, the transposed weights
folded into initializers), then fused with ``policy="cost"``:

* chains of ``Linear`` layers become one linear op (``W = W2 @ W1``, ``b = b1 @ W2.T + b2``);
* ``low_rank`` (256 -> 16 -> 256) is declined by the cost model: merged it would be 8x bigger;
* ``relu_mlp`` has nothing to fuse.

Each case checks the number of fusions, the structure (Gemm + MatMul count), onnxruntime
equivalence with the original model and with the torch module at explicit tolerances, and
``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

import converter  # noqa: E402

_MAKE_MODELS = Path(__file__).resolve().parents[1] / "models" / "make_models.py"
_spec = importlib.util.spec_from_file_location("make_models", _MAKE_MODELS)
make_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_models)

EXPORTERS = {"legacy": False, "dynamo": True}
FUSED = ("two_layer", "four_layer", "batched_3d", "fp16_chain")
FUSIONS = {name: int(name in FUSED) for name in make_models.MODEL_NAMES}
TOLERANCE = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float16: {"rtol": 5e-3, "atol": 5e-3}}

CASES = [
    pytest.param(name, exporter, id=f"{name}-{exporter}")
    for name in make_models.MODEL_NAMES
    for exporter in EXPORTERS
]


class _Exported:
    """One model exported once: the file, the proto read back, and the dynamo ``ONNXProgram``."""

    def __init__(self, name: str, exporter: str, directory: Path) -> None:
        self.name = name
        self.path = directory / f"{name}-{exporter}.onnx"
        self.program = make_models.export(name, self.path, dynamo=EXPORTERS[exporter])
        self.proto = onnx.load(self.path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name, exporter)``, exporting each pair once per test module.

    Only ``test_pass_on_dynamo_program`` touches ``.program.model`` (the pass mutates it); every
    other test reads the file written before that.
    """
    directory = tmp_path_factory.mktemp("exported")
    cache: dict[tuple[str, str], _Exported] = {}

    def get(name: str, exporter: str) -> _Exported:
        if (name, exporter) not in cache:
            cache[name, exporter] = _Exported(name, exporter, directory)
        return cache[name, exporter]

    return get


def _linear_ops(model: onnx.ModelProto) -> int:
    return sum(node.op_type in ("Gemm", "MatMul") for node in model.graph.node)


def _linear_node_names(model: onnx.ModelProto) -> set[str]:
    return {node.name for node in model.graph.node if node.op_type in ("Gemm", "MatMul")}


def _linear_layers(name: str) -> int:
    module = make_models.build_module(name).module
    return sum(isinstance(layer, torch.nn.Linear) for layer in module.modules())


def _input(name: str) -> np.ndarray:
    """A seeded input whose dynamic sizes differ from the export example (batch 4, seq 5)."""
    example = make_models.build_module(name).example_input
    shape = (3, 7, *example.shape[2:]) if example.ndim == 3 else (3, *example.shape[1:])
    dtype = np.float16 if example.dtype == torch.float16 else np.float32
    return np.random.default_rng(1234).standard_normal(shape).astype(dtype)


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _torch_output(name: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return make_models.build_module(name).module(torch.from_numpy(x)).numpy()


def _assert_equivalent(name: str, fused: onnx.ModelProto | Path, original: Path) -> None:
    x = _input(name)
    tolerance = TOLERANCE[x.dtype.type]
    actual = _run(fused, x)
    assert actual.dtype == x.dtype
    np.testing.assert_allclose(actual, _run(original, x), **tolerance)
    np.testing.assert_allclose(actual, _torch_output(name, x), **tolerance)


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_export_has_one_linear_op_per_layer_and_matches_torch(exported, name, exporter):
    model = exported(name, exporter)
    assert _linear_ops(model.proto) == _linear_layers(name)
    assert not {i.name for i in model.proto.graph.initializer} & {
        i.name for i in model.proto.graph.input
    }
    x = _input(name)
    np.testing.assert_allclose(
        _run(model.path, x), _torch_output(name, x), **TOLERANCE[x.dtype.type]
    )


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_fuse_proto(exported, name, exporter):
    model = exported(name, exporter)
    before = model.proto.SerializeToString()

    fused = converter.fuse(model.proto, policy="cost")

    assert isinstance(fused, onnx.ModelProto)
    assert model.proto.SerializeToString() == before, "fuse() must not mutate its argument"
    assert _linear_ops(fused) == make_models.EXPECTED_LINEAR_OPS[name]
    onnx.checker.check_model(fused, full_check=True)
    _assert_equivalent(name, fused, model.path)


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_fuse_file_reports_fusions(exported, tmp_path, name, exporter):
    model = exported(name, exporter)
    dst = tmp_path / f"{name}.out.onnx"

    report = converter.fuse_file(model.path, dst, policy="cost", validate=True)

    assert len(report.fusions) == FUSIONS[name]
    layers = _linear_node_names(model.proto)
    for record in report.fusions:
        assert set(record.nodes) >= layers, "the whole chain fuses into one"
    fused = onnx.load(dst)
    assert _linear_ops(fused) == make_models.EXPECTED_LINEAR_OPS[name]
    onnx.checker.check_model(fused, full_check=True)
    _assert_equivalent(name, dst, model.path)


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_low_rank_is_declined_by_the_cost_model(exported, tmp_path, exporter):
    model = exported("low_rank", exporter)

    report = converter.fuse_file(model.path, tmp_path / "out.onnx", policy="cost")

    layers = _linear_node_names(model.proto)
    reasons = [d.reason for d in report.declined if set(d.nodes) & layers]
    assert any("cost" in reason.lower() for reason in reasons), reasons


@pytest.mark.parametrize("name", make_models.MODEL_NAMES)
def test_pass_on_dynamo_program(exported, tmp_path, name):
    model = exported(name, "dynamo")
    program = model.program

    result = converter.FuseLinearChainsPass()(program.model)

    assert result.modified is bool(FUSIONS[name])
    assert result.model is program.model, "an in-place pass returns the model it was given"
    proto = ir.to_proto(result.model)
    assert _linear_ops(proto) == make_models.EXPECTED_LINEAR_OPS[name]
    onnx.checker.check_model(proto, full_check=True)
    saved = tmp_path / f"{name}.onnx"
    program.save(str(saved), external_data=False)
    _assert_equivalent(name, saved, model.path)
    ir.save(result.model, tmp_path / "ir_saved.onnx")
    _assert_equivalent(name, tmp_path / "ir_saved.onnx", model.path)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_converter_export_writes_a_fused_validated_model(tmp_path, exporter):
    built = make_models.build_module("four_layer")
    path = tmp_path / "four_layer.onnx"
    kwargs = (
        {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
        if EXPORTERS[exporter]
        else {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch"}}}
    )
    report = converter.export(
        built.module, (built.example_input,), path, dynamo=EXPORTERS[exporter], **kwargs
    )
    assert len(report.fusions) == 1 and report.validated is True
    fused = onnx.load(path)
    assert _linear_ops(fused) == 1
    onnx.checker.check_model(fused, full_check=True)
    x = _input("four_layer")
    np.testing.assert_allclose(
        _run(path, x), _torch_output("four_layer", x), **TOLERANCE[np.float32]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four_layer.onnx"]
