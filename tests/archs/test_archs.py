"""Issue 10's and 11's structures, exported by both torch exporters, checked and measured.

For every block of :mod:`archs.vision` and :mod:`archs.reparam`:

* ``test_deploy_form_equals_training_form``: each ``reparameterize()`` is exact (float64);
* ``test_export_matches_torch``: both exporters' graphs equal torch under onnxruntime;
* ``test_fuse_keeps_outputs``: ``converter.fuse_file`` (validation on) writes a model that passes
  the checker and still equals torch;
* ``test_fuse_reaches_target``: the fused model has the block's target number of constant-weight
  linear ops (Gemm/MatMul/Conv; for issue 11 the deploy form's Conv count), no BatchNormalization
  and no free fold left. The few pairs the engine does not reach yet (``NOT_YET``) are
  ``xfail(strict=True)``: each turns into a failure the day it passes, and the mark goes;
* ``test_unsorted_export_fuses_as_the_sorted_one`` (issue 19): a few representative blocks with
  their exported nodes listed in a seeded random order (as graph-surgery tools leave them) fuse
  to the same result as the export itself, written in topological order.

Exports are cached per run in a folder shared by xdist workers (``archs.cache``, shared with
``test_runtime_kernels.py``). Every test appends one JSON record
(name, exporter, op counts, free folds, ...) to ``archs-record.jsonl`` in pytest's base temp
folder, for reading after a run; nothing is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import zlib  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from builders import in_topological_order, scrambled  # noqa: E402

import converter  # noqa: E402

from . import cache, reparam, vision  # noqa: E402
from .export import count_linear, count_ops, free_folds  # noqa: E402

EXPORTERS = {"legacy": False, "dynamo": True}
BLOCKS = {**vision.BLOCKS, **reparam.BLOCKS}
ATOL = RTOL = 1e-4

# Constant-weight linear ops a complete engine leaves (issue 10: merged chains and branch sums;
# issue 11: the deploy form's Conv count, checked against reparameterize() below).
TARGET_LINEAR = {
    "linear_bn_tokens": 1,
    "levit_attention": 2,
    "levit_mlp": 2,
    "layer_scale": 1,
    "class_attention": 6,
    "affine_linear": 1,
    "token_mixing": 1,
    "token_mixing_left": 1,
    "resmlp_token": 1,
    "channels_last_mlp": 1,
    "conv_channels_last_mlp": 1,
    "gelu_linear": 2,
    "neg_linear": 1,
    "identity_dropout": 1,
    "stack_sum": 1,
    "three_branches": 1,
    "scaled_branches": 1,
    "linear_bn1d": 1,
    "linear_bn1d_tied": 1,
    "repvgg": 1,
    "repvgg_stride2": 1,
    "repvgg_grouped": 1,
    "acnet": 1,
    "mobileone_k2": 2,
    "mobileone_k4": 2,
    "repvit_dw": 1,
    "repmixer": 1,
    "cpe": 1,
    "repconv_yolo": 1,
    # issue 18: the GELU between two layers stays (the layers around it do not merge)
    "vit_block": 4,
    "vit_block_tanh": 4,
    "convnext_block": 3,
    "efficientformer_mlp": 2,
    "efficientformer_meta4d": 2,
    "mixer_block": 4,
    "repvit_block": 3,
    "fastvit_block": 4,
}
# (block, exporter) pairs the engine does not bring to the target yet: xfail, strictly, so that
# each flips to a failure the day it passes. Everything else must reach its target. Empty now
# (conv_channels_last_mlp was the last: its 1x1 Conv moves past the Transpose into the Linear,
# converter.fusion.conv_to_linear); a structure the engine cannot reach yet goes here with its why.
NOT_YET: set[tuple[str, str]] = set()
# Extra op types that must be gone after fusion (a fold that the free-fold heuristic cannot see).
GONE = {
    "affine_linear": ("Mul",),
    "channels_last_mlp": ("Mul",),
    "conv_channels_last_mlp": ("Mul",),
    "neg_linear": ("Neg",),
    "stack_sum": ("ReduceSum",),
    "repvgg": ("Add",),
    "repvgg_grouped": ("Add",),
    "acnet": ("Add",),
    "repmixer": ("Sub", "Mul", "Add"),
    "cpe": ("Add",),
}


def _cases(names):
    for name in names:
        for exporter in EXPORTERS:
            marks = []
            if (name, exporter) in NOT_YET:
                marks.append(pytest.mark.xfail(reason="issue 10/11: engine", strict=True))
            yield pytest.param(name, exporter, id=f"{name}-{exporter}", marks=marks)


PAIRS = [pytest.param(n, e, id=f"{n}-{e}") for n in BLOCKS for e in EXPORTERS]


def _record(cache_dir: Path, **fields) -> None:
    with open(cache_dir.parent / "archs-record.jsonl", "a") as f:
        f.write(json.dumps(fields, default=str) + "\n")


def _exported(cache_dir: Path, name: str, exporter: str) -> Path:
    """The block exported once per run (``archs.cache``: written beside, moved into place)."""
    return cache.exported(cache_dir, name, exporter)


def _run(path: Path, args: tuple) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return session.run(None, feeds)[0]


def _torch(name: str) -> tuple[tuple, np.ndarray]:
    case = BLOCKS[name]()
    with torch.no_grad():
        return case.args, case.module(*case.args).numpy()


def _fused(cache_dir: Path, name: str, exporter: str) -> tuple[Path, dict]:
    """The block fused once per run by ``converter.fuse_file`` (validation on), and its report."""
    return cache.fused(cache_dir, _exported(cache_dir, name, exporter))


@pytest.mark.parametrize("name", [*reparam.BLOCKS, *reparam.NETWORKS])
def test_deploy_form_equals_training_form(name):
    build = reparam.BLOCKS.get(name) or reparam.NETWORKS[name]
    case = build()
    training = case.module.double()
    x = case.args[0].double()

    deploy = training.reparameterize().eval()

    with torch.no_grad():
        expected, actual = training(x), deploy(x)
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in deploy.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    if name in TARGET_LINEAR:
        assert convs == TARGET_LINEAR[name], "the target is the deploy form's Conv count"


@pytest.mark.parametrize(("name", "exporter"), PAIRS)
def test_export_matches_torch(cache_dir, name, exporter):
    path = _exported(cache_dir, name, exporter)
    args, expected = _torch(name)

    actual = _run(path, args)

    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL)
    folds, bn, where = free_folds(path)
    _record(
        cache_dir,
        test="export",
        name=name,
        exporter=exporter,
        ops=dict(count_ops(path)),
        linear=count_linear(path),
        free_folds=folds,
        batchnorm=bn,
        where=where,
        value_info=len(onnx.load(path).graph.value_info),
    )


@pytest.mark.parametrize(("name", "exporter"), PAIRS)
def test_fuse_keeps_outputs(cache_dir, name, exporter):
    dst, report = _fused(cache_dir, name, exporter)
    args, expected = _torch(name)

    assert report["validated"] is not False, "validation ran and failed"
    fused = onnx.load(dst)
    onnx.checker.check_model(fused, full_check=True)
    np.testing.assert_allclose(_run(dst, args), expected, atol=ATOL, rtol=RTOL)
    folds, bn, where = free_folds(fused)
    _record(
        cache_dir,
        test="fuse",
        name=name,
        exporter=exporter,
        fusions=report["fusions"],
        ops=dict(count_ops(fused)),
        linear=count_linear(fused),
        free_folds=folds,
        batchnorm=bn,
        where=where,
        declined=report["declined"],
    )


@pytest.mark.parametrize(("name", "exporter"), list(_cases(TARGET_LINEAR)))
def test_fuse_reaches_target(cache_dir, name, exporter):
    dst, _ = _fused(cache_dir, name, exporter)

    folds, bn, where = free_folds(dst)
    ops = count_ops(dst)

    assert count_linear(dst) == TARGET_LINEAR[name]
    assert bn == 0, "BatchNormalization left"
    assert folds == 0, where
    assert not {op: ops[op] for op in GONE.get(name, ()) if ops[op]}


# Attention with its scale behind views, BatchNorm after a Linear, a stacked sum, RepVGG and
# MobileOne conv branches: each exporter's graph, its nodes listed out of order.
UNSORTED = ("levit_attention", "linear_bn1d", "stack_sum", "repvgg", "mobileone_k2")


@pytest.mark.parametrize(
    ("name", "exporter"), [pytest.param(n, e, id=f"{n}-{e}") for n in UNSORTED for e in EXPORTERS]
)
def test_unsorted_export_fuses_as_the_sorted_one(cache_dir, tmp_path, name, exporter):
    sorted_fused, facts = _fused(cache_dir, name, exporter)
    model = onnx.load(_exported(cache_dir, name, exporter))
    unsorted = scrambled(model, np.random.default_rng(zlib.crc32(f"{name}-{exporter}".encode())))
    assert not in_topological_order(unsorted)
    src, dst = tmp_path / "unsorted.onnx", tmp_path / "fused.onnx"
    onnx.save(unsorted, src)

    report = converter.fuse_file(src, dst, validate=True)

    assert report.sorted_graphs == ["main graph"]
    assert len(report.fusions) == facts["fusions"]  # 0 for linear_bn1d-dynamo: sorted only
    assert report.validated is (True if report.fusions else None)  # nothing merged: not run
    fused = onnx.load(dst)
    onnx.checker.check_model(fused, full_check=True)  # in topological order again
    assert count_ops(fused) == count_ops(sorted_fused)
    assert count_linear(fused) == TARGET_LINEAR[name]
    args, expected = _torch(name)
    np.testing.assert_allclose(_run(dst, args), expected, atol=ATOL, rtol=RTOL)
