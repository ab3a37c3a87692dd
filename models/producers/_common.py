"""Shared by the ``make_*.py`` scripts: save a fixture, its sample inputs and the producer's outputs.

Needs only numpy, onnx and onnxruntime, which every producer's environment has. Each fixture is
``NAME.onnx`` plus ``NAME.npz`` holding ``input/<onnx input name>`` and ``output/<onnx output
name>`` arrays: the sample inputs and what the framework itself computed on them. Before anything
is written the ONNX file is run with onnxruntime and compared with the framework's outputs, so a
fixture that does not equal its producer is never saved.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
MAX_BYTES = 200_000


def fixed_hash_seed() -> None:
    """Re-run this script with ``PYTHONHASHSEED=0``: exporters that walk sets (tf2onnx's merge of
    equal constants, skl2onnx's opset list) then write the same bytes on every run."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def manifest() -> dict:
    return json.loads((HERE / "manifest.json").read_text())["fixtures"]


def run_onnx(proto: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, dict(inputs)), strict=True))


def save(
    name: str,
    proto: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    *,
    atol: float,
    rtol: float,
    out_dir: Path = HERE,
) -> Path:
    """Check ``proto`` against the framework's ``outputs`` on ``inputs``, then write both files."""
    entry = manifest().get(name)
    if entry is None:
        sys.exit(f"{name}: not in manifest.json; add its hand-folded count first")
    opsets = sorted(proto.opset_import, key=lambda o: o.domain)
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    onnx.checker.check_model(proto, full_check=True)
    graph_inputs = [i.name for i in proto.graph.input]
    graph_outputs = [o.name for o in proto.graph.output]
    if sorted(graph_inputs) != sorted(inputs) or sorted(graph_outputs) != sorted(outputs):
        sys.exit(
            f"{name}: names differ: {graph_inputs} / {graph_outputs} vs {list(inputs)} / {list(outputs)}"
        )
    actual = run_onnx(proto, inputs)
    for key, want in outputs.items():
        got = actual[key]
        if got.dtype.kind in "iub":
            np.testing.assert_array_equal(got, want, err_msg=f"{name}:{key}")
        else:
            np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=f"{name}:{key}")
    data = proto.SerializeToString()
    if len(data) > MAX_BYTES:
        sys.exit(f"{name}: {len(data)} bytes, over {MAX_BYTES}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.onnx"
    path.write_bytes(data)
    arrays = {f"input/{k}": np.asarray(v) for k, v in inputs.items()}
    arrays.update({f"output/{k}": np.asarray(v) for k, v in outputs.items()})
    np.savez_compressed(out_dir / f"{name}.npz", **arrays)
    ops = Counter(
        (f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type
        for n in proto.graph.node
    )
    print(f"{name}: {len(data)} bytes, {dict(sorted(ops.items()))}")
    return path
