"""The progress line: quiet for quick runs, a bar where the total is known, cleared at the end."""

from __future__ import annotations

import io
import time

from converter.model_io.progress import ProgressLine


def test_render_shows_stage_count_and_bar():
    line = ProgressLine(io.StringIO(), width=10)
    line("merging", 3, 6)
    text = line.render()
    assert text.startswith("onnx-fuse: merging [#####.....] 3/6 ")
    line("writing", None, None)
    assert line.render().startswith("onnx-fuse: writing ")


def test_nothing_drawn_before_the_delay_or_when_disabled():
    stream = io.StringIO()
    with ProgressLine(stream, delay=60) as line:
        line("loading")
        time.sleep(0.3)
    assert stream.getvalue() == ""
    with ProgressLine(stream, enabled=False, delay=0) as line:
        time.sleep(0.3)
    assert stream.getvalue() == ""


def test_drawn_after_the_delay_and_cleared():
    stream = io.StringIO()
    with ProgressLine(stream, delay=0) as line:
        line("validating")
        time.sleep(0.5)
    out = stream.getvalue()
    assert "onnx-fuse: validating" in out
    assert out.endswith("\r\033[K")


def test_fuse_file_reports_every_stage(tmp_path):
    from pathlib import Path

    import converter

    calls = []
    models = Path(__file__).resolve().parents[2] / "models"
    converter.fuse_file(
        models / "four_layer.onnx",
        tmp_path / "o.onnx",
        progress=lambda stage, done=None, total=None: calls.append((stage, done, total)),
    )
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == ["loading", "analysing", "merging", "writing", "validating"]
    assert ("merging", 4, 4) in calls  # four ops composed, counted one by one
