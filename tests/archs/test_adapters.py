"""Every adapter type PEFT merges into ``nn.Linear``, fused from its export (issue 21).

For each adapter type of ``archs.adapters`` (non-identity values) on the tiny LLaMA-style model,
and a set of types on the tiny BERT, with each torch exporter: ``onnx-fuse adapter.onnx --inputs
<its token ids>`` exits 0 with validation on; the fused model gives torch's outputs; it has at
most the linear ops (``Gemm``, ``MatMul``/``Einsum`` with a constant operand) of the export of
the same model after ``merge_and_unload()``, no more weight bytes, no free fold left and every
fused kernel onnxruntime made of the original. An adapter model torch cannot export skips with
the exporter's reason; what is still left is an ``xfail(strict=True)`` saying why.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import numpy as np
import onnx

from archs import adapter_runs, adapters, language

ATOL = 1e-4
BERT = ("lora", "dora", "ia3", "oft", "road", "vera", "loha", "gralora", "miss", "pvera")

#: (adapter, model, exporter) still left, and why.
LEFT: dict[tuple[str, str, str], str] = {}


def _cases() -> list:
    cases = []
    for adapter in adapters.ADAPTERS:
        for model in ("llama", "bert"):
            if model == "bert" and adapter not in BERT:
                continue
            for exporter in adapter_runs.EXPORTERS:
                marks = []
                if (adapter, model, exporter) in LEFT:
                    marks.append(
                        pytest.mark.xfail(strict=True, reason=LEFT[adapter, model, exporter])
                    )
                cases.append(
                    pytest.param(
                        adapter, model, exporter, marks=marks, id=f"{adapter}-{model}-{exporter}"
                    )
                )
    return cases


@pytest.mark.parametrize(("adapter", "model", "exporter"), _cases())
def test_the_fused_adapter_model_is_the_merged_model(adapter, model, exporter, tmp_path):
    if (model, adapter) in adapters.UNMERGEABLE_ON:
        pytest.skip(adapters.UNMERGEABLE_ON[model, adapter])
    if adapter in adapters.REQUIRES:
        pytest.importorskip(adapters.REQUIRES[adapter])
    try:
        adapter_runs.export_pair(model, adapter, exporter, tmp_path)
    except language.ExporterCannot as e:
        pytest.skip(f"torch cannot export the adapter model: {e}")
    code = adapter_runs.fuse(tmp_path)
    assert code == 0, (
        (tmp_path / "fused.json").read_text() if (tmp_path / "fused.json").exists() else code
    )
    fused = tmp_path / "fused.onnx"
    onnx.checker.check_model(onnx.load(fused), full_check=True)
    with (
        np.load(tmp_path / "adapter.inputs.npz") as inputs,
        np.load(tmp_path / "torch.npz") as torch_out,
    ):
        np.testing.assert_allclose(
            language.run_onnx(fused, dict(inputs)), torch_out["adapter"], atol=ATOL, rtol=0
        )
    m = adapter_runs.measure(tmp_path, code)
    assert m.ops["fused"] <= m.ops["merged"], m.ops
    # within 0.1%: a few scalar constants more (RMSNorm's Reciprocal written as Div(1, Sqrt)
    # for onnxruntime's fusion holds its own 1.0), 20 to a few hundred bytes on 1.3-1.7 MB
    assert m.weights["fused"] <= m.weights["merged"] * 1.001, m.weights
    assert m.folds == [] and m.lost == [], (m.folds, m.lost)
