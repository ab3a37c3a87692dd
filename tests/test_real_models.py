"""Real published models, as a new user would run them: onnx-fuse with --inputs / --input-shape.

The models come from PyPI wheels that ship them (``pip download --no-deps``, nothing installed):
Silero VAD (an ``If`` graph and a scalar sample-rate input that must be 16000 or 8000), PaddleOCR
via rapidocr (dynamic height and width, ``dim_value -1``), and NudeNet's YOLOv8n detector (needs
a real image size). Random inputs with every dynamic dim set small crash these *originals*, which
is the point: validation must say so, and run with the inputs the user gives.

Set ``ONNX_FUSE_REAL_MODELS=skip`` to skip them (they download about 37 MB once per machine).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converter import check_equivalence
from converter.cli import main

WHEELS = {
    "silero-vad==6.2.3": ["silero_vad/data/silero_vad.onnx"],
    "rapidocr-onnxruntime==1.4.4": [
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ],
    "nudenet==3.4.2": ["nudenet/320n.onnx"],
}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnx-fuse-test-models"

pytestmark = pytest.mark.skipif(
    os.environ.get("ONNX_FUSE_REAL_MODELS") == "skip", reason="ONNX_FUSE_REAL_MODELS=skip"
)


def _fetch(requirement: str) -> Path:
    """The folder holding the requirement's .onnx files, downloading the wheel once."""
    folder = CACHE / requirement.replace("==", "-")
    if folder.is_dir():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {requirement}: {proc.stderr.strip()[-200:]}")
        staging = Path(tmp) / "models"
        staging.mkdir()
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in WHEELS[requirement]:
                (staging / Path(member).name).write_bytes(wheel.read(member))
        with contextlib.suppress(OSError):  # another test worker got there first
            os.replace(staging, folder)
    return folder


def _model(requirement: str, name: str) -> Path:
    return _fetch(requirement) / name


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_silero_vad_needs_real_inputs_and_validates_with_them(tmp_path, capsys):
    model = _model("silero-vad==6.2.3", "silero_vad.onnx")
    out = tmp_path / "vad.onnx"
    # Synthesised inputs crash the original (reflect padding, sample rate): exit 2, one line.
    code, _, err = _run([str(model), "-o", str(out), "--policy", "always", "--trials", "1"], capsys)
    if code == 0:  # nothing merged, so nothing was run: prove it with `check` instead
        out.unlink()
        code, _, err = _run(["check", str(model), str(model)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "fails to run" in err and "--inputs" in err and "'sr' needs a real value" in err

    rng = np.random.default_rng(0)
    npz = tmp_path / "vad_inputs.npz"
    np.savez(
        npz,
        input=rng.uniform(-1, 1, (1, 512)).astype(np.float32),
        state=np.zeros((2, 1, 128), np.float32),
        sr=np.array(16000, np.int64),
    )
    code, _, err = _run([str(model), "-o", str(out), "--inputs", str(npz)], capsys)
    assert code == 0, err
    assert check_equivalence(model, out, inputs=npz).passed


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("ch_PP-OCRv4_rec_infer.onnx", "x:1,3,48,320"),
        ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "x:2,3,48,192"),
    ],
)
def test_ocr_models_with_dynamic_height_and_width(tmp_path, capsys, name, shape):
    model = _model("rapidocr-onnxruntime==1.4.4", name)
    out = tmp_path / name
    code, _, err = _run([str(model), "-o", str(out), "--input-shape", shape], capsys)
    assert code == 0, err
    input_name, dims = shape.split(":")
    shapes = {input_name: [int(d) for d in dims.split(",")]}
    result = check_equivalence(model, out, input_shapes=shapes)
    assert result.passed, str(result)


def test_yolo_detector_needs_an_image_size(tmp_path, capsys):
    model = _model("nudenet==3.4.2", "320n.onnx")
    code, _, err = _run(["check", str(model), str(model), "--trials", "1"], capsys)
    assert code == 2 and "--input-shape" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "det.onnx"
    code, _, err = _run([str(model), "-o", str(out), "--input-shape", "images:1,3,320,320"], capsys)
    assert code == 0, err
    result = check_equivalence(model, out, input_shapes={"images": [1, 3, 320, 320]}, trials=1)
    assert result.passed, str(result)
