"""Validation on models built with torch (issue #9), through ``fuse_file`` and the CLI.

The verdict rests on the graph outputs; each fusion's own output is a diagnostic, measured where
it still exists in both models. Each case is exported by both exporters (``dynamo=False``:
TorchScript, opset 17; ``dynamo=True``: ``torch.export``) and checked for: exit 0 with default
settings, outputs equal to the original's at explicit tolerances, a diagnostic per fusion in the
JSON report (a max error, or "not measured" with the reason), and ``onnx.checker``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

import converter  # noqa: E402
from converter.cli import main  # noqa: E402

EXPORTERS = {"legacy": False, "dynamo": True}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


class ResidualThenLinear(torch.nn.Module):
    """Case 1: ``y = L2(x + L1(x))``: the residual merge is absorbed by the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(x + self.l1(x))


class AffineBlock(torch.nn.Module):
    """``x + ls * L(a * x + b)`` with random per-feature ``a``, ``b`` and layer scale ``ls``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.l = torch.nn.Linear(d, d)
        self.a, self.b = torch.nn.Parameter(torch.randn(d)), torch.nn.Parameter(torch.randn(d))
        self.ls = torch.nn.Parameter(torch.rand(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls * self.l(self.a * x + self.b)


class ResidualMLP(torch.nn.Module):
    """Case 2: patch embedding (a Linear on flattened 4x4x3 patches), then 12 affine blocks."""

    def __init__(self, d: int = 96) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(48, d)
        self.blocks = torch.nn.Sequential(*[AffineBlock(d) for _ in range(12)])

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed(patches))


class ScalarLoss(torch.nn.Module):
    """Case 3: a 0-d output ``loss = (L2(L1(x)) ** 2).mean()`` beside the features."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.l2(self.l1(x))
        return y, (y**2).mean()


MODELS = {
    "residual_then_linear": (ResidualThenLinear, (4, 16)),
    "residual_mlp": (ResidualMLP, (2, 49, 48)),
    "scalar_loss": (ScalarLoss, (4, 16)),
}
CASES = [
    pytest.param(name, exporter, id=f"{name}-{exporter}")
    for name in MODELS
    for exporter in EXPORTERS
]


def _export(name: str, exporter: str, folder: Path) -> tuple[Path, np.ndarray]:
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    module = cls().eval()
    example = torch.randn(*shape)
    path = folder / f"{name}-{exporter}.onnx"
    torch.onnx.export(module, (example,), str(path), dynamo=EXPORTERS[exporter])
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    return path, x


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_torch_models_pass_validation_with_defaults(tmp_path, capsys, name, exporter):
    src, x = _export(name, exporter, tmp_path)
    dst, report_path = tmp_path / "fused.onnx", tmp_path / "report.json"
    assert main([str(src), "-o", str(dst), "--report", str(report_path), "-v"]) == 0
    assert "validation      passed" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(dst), full_check=True)
    for actual, expected in zip(_run(dst, x), _run(src, x), strict=True):
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, **TOLERANCE)
    report = json.loads(report_path.read_text())
    assert report["validated"] is True and report["fusions"]
    for record in report["fusions"]:  # a diagnostic per fusion, measured or saying why not
        if record["max_error"] is None:
            assert record["error_note"].startswith("not measured: ")
        else:
            assert record["error_note"] is None and 0 <= record["max_error"] < 1e-3
    assert any(r["max_error"] is not None for r in report["fusions"])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_merge_absorbed_by_a_later_one_is_reported_not_measured(tmp_path, exporter):
    src, _ = _export("residual_then_linear", exporter, tmp_path)
    report = converter.fuse_file(src, tmp_path / "fused.onnx")
    assert report.validated and len(report.fusions) == 2
    first, second = report.fusions
    assert first.max_error is None and "no longer exists" in first.error_note
    assert second.max_error is not None and second.error_note is None


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_scalar_output_passes_check(tmp_path, capsys, exporter):
    src, _ = _export("scalar_loss", exporter, tmp_path)
    dst = tmp_path / "fused.onnx"
    converter.fuse_file(src, dst)
    assert main(["check", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and " [] float32" in out  # the 0-d output, compared


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_wrong_merge_fails_and_the_message_names_the_fusion(tmp_path, monkeypatch, exporter):
    """Fuse the MLP, then perturb the weight of one merged block in the written candidate."""
    src, _ = _export("residual_mlp", exporter, tmp_path)
    real_write = converter.api.io.write_model
    spoiled = {}

    def write_and_spoil(model, dst, **kwargs):
        fused = [n for n in model.graph if n.name.startswith("fused(") and n.op_type != "Add"]
        node = fused[len(fused) // 2]
        weight = next(v for v in node.inputs if v is not None and v.const_value is not None)
        array = weight.const_value.numpy().copy()
        array[0, 0] += 0.5
        weight.const_value = ir.tensor(array, name=weight.name)
        spoiled["node"] = node.name
        return real_write(model, dst, **kwargs)

    monkeypatch.setattr(converter.api.io, "write_model", write_and_spoil)
    with pytest.raises(converter.ValidationError) as e:
        converter.fuse_file(src, tmp_path / "fused.onnx")
    message = str(e.value)
    assert "first diverged: the fusion of [" in message
    assert not (tmp_path / "fused.onnx").exists()
    report = converter.fuse_file(src, tmp_path / "kept.onnx", keep_on_fail=True)
    assert report.validated is False and report.diverged is not None
    assert spoiled["node"] in report.diverged.new_nodes
    assert report.diverged.tolerance_used > 1
    assert f"[{', '.join(report.diverged.nodes)}]" in message
