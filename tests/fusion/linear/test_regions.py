"""Maps of the last axis through reshapes of it (``converter.fusion.linear.regions``), issue 21.

Block-diagonal maps (OFT's ``Reshape -> Einsum -> Reshape``), rotations of pairs of features
(RoAd's ``Reshape -> Gather/Neg/Unsqueeze/Concat -> Reshape``; ``rotate_half``'s Slice/Neg/Concat)
and sums over blocks (MiSS's ``Reshape -> ReduceSum``) are linear ops that compose with the base
layer beside them. Each rewrite test checks the fusions, the structure, onnxruntime equivalence
and the checker; the negative tests the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import assert_equivalent, check, feeds, fuse_with_report, init, op_types, rng
from onnx import TensorProto, helper

from converter.fusion.core.context import Context
from converter.fusion.linear.regions import find_regions

FLOAT = TensorProto.FLOAT
ATOL, RTOL = 1e-5, 1e-4
ROWS = (2, 5)
N, M = 16, 12
BLOCKS, BLOCK = 4, 4  # N = BLOCKS * BLOCK


def _model(nodes: list, inits: list, out: int = M, opset: int = 18) -> onnx.ModelProto:
    """``x [2, 5, N] -> nodes -> y [2, 5, out]``, shapes inferred (an export records them)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [*ROWS, N])],
        [helper.make_tensor_value_info("y", FLOAT, [*ROWS, out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _shape(name: str, dims) -> onnx.TensorProto:
    return init(name, np.array(dims, np.int64))


def _weight(name: str, shape, seed: int) -> onnx.TensorProto:
    return init(name, (rng(seed).standard_normal(shape) / 3).astype(np.float32))


def _oft(nodes_out: str = "y", *, equation: str = "...rk,rkc->...rc") -> tuple[list, list]:
    """``x -> Reshape (..., r, b) -> Einsum by R (r, b, b) -> Reshape back -> MatMul W``."""
    inits = [
        _shape("split", [*ROWS, BLOCKS, BLOCK]),
        _shape("back", [*ROWS, N]),
        _weight("R", (BLOCKS, BLOCK, BLOCK), 1),
        _weight("W", (N, M), 2),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "split"], ["blocks"], name="split"),
        helper.make_node("Einsum", ["blocks", "R"], ["rotated"], equation=equation, name="oft"),
        helper.make_node("Reshape", ["rotated", "back"], ["xr"], name="back"),
        helper.make_node("MatMul", ["xr", "W"], [nodes_out], name="base"),
    ]
    return nodes, inits


def test_a_block_diagonal_map_before_a_layer_merges_into_it():
    model = _model(*_oft())
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].nodes == ["split", "oft", "back", "base"]
    assert op_types(fused) == ["MatMul"]
    assert fused.graph.node[0].input[0] == "x"
    check(fused)
    assert_equivalent(model, fused, feeds((*ROWS, N)), atol=ATOL, rtol=RTOL)
    again, report2 = fuse_with_report(fused)
    assert report2.fusions == [] and op_types(again) == op_types(fused)


def test_the_map_is_read_exactly_from_the_probe():
    """The region's float64 map is the block-diagonal matrix of R, and a zero row for the bias."""
    nodes, inits = _oft()
    model = ir.serde.deserialize_model(_model(nodes, inits))
    (region,), declined = find_regions(Context(model), model.graph)
    assert declined == []
    assert region.names == ["split", "oft", "back"] and region.region and not region.kept
    r = onnx.numpy_helper.to_array(inits[2]).astype(np.float64)
    expected = np.zeros((N, N))
    for i in range(BLOCKS):
        expected[i * BLOCK : (i + 1) * BLOCK, i * BLOCK : (i + 1) * BLOCK] = r[i]
    affine = region.affine
    np.testing.assert_array_equal(affine.weight, expected)
    assert affine.bias is None
    assert region.macs == BLOCKS * BLOCK * BLOCK  # the blocks, not a dense N x N


def test_a_region_with_nothing_to_merge_into_is_left_as_it_is():
    """A rotation alone would cost a dense matrix: only a merge with a matrix op writes it."""
    nodes, inits = _oft("y")
    nodes, inits = nodes[:3], inits[:3]
    nodes[-1].output[0] = "y"
    model = _model(nodes, inits, out=N)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)


def _rotation(y: str, out: str, half: int) -> tuple[list, list]:
    """RoAd's rotation of pairs: ``Reshape(y, (-1, 2, half)) -> [-y1, y0] -> Reshape back``."""
    inits = [
        _shape("pairs", [-1, 2, half]),
        _shape("rows", [*ROWS, 2 * half * (M // (2 * half))]),
        init("zero", np.array(0, np.int64)),
        init("one", np.array(1, np.int64)),
        init("axis1", np.array([1], np.int64)),
    ]
    nodes = [
        helper.make_node("Reshape", [y, "pairs"], ["p"], name="pairs"),
        helper.make_node("Gather", ["p", "zero"], ["p0"], axis=1, name="first"),
        helper.make_node("Gather", ["p", "one"], ["p1"], axis=1, name="second"),
        helper.make_node("Neg", ["p1"], ["n1"], name="neg"),
        helper.make_node("Unsqueeze", ["n1", "axis1"], ["u1"], name="u1"),
        helper.make_node("Unsqueeze", ["p0", "axis1"], ["u0"], name="u0"),
        helper.make_node("Concat", ["u1", "u0"], ["stack"], axis=1, name="stack"),
        helper.make_node("Reshape", ["stack", "rows"], [out], name="rotated"),
    ]
    return nodes, inits


def test_a_rotation_of_the_output_summed_with_a_scale_merges_into_the_base_layer():
    """RoAd: ``y * c1 + rotate(y) * c2`` with ``y = x @ W``: one MatMul (the base is composed
    into both branches, and goes with its last reader)."""
    inits = [_weight("W", (N, M), 3), _weight("c1", (M,), 4), _weight("c2", (M,), 5)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["base"], name="base")]
    rot_nodes, rot_inits = _rotation("base", "rot", M // 4)
    nodes += [
        *rot_nodes,
        helper.make_node("Mul", ["base", "c1"], ["scaled"], name="scale"),
        helper.make_node("Mul", ["rot", "c2"], ["rot_scaled"], name="rot_scale"),
        helper.make_node("Add", ["scaled", "rot_scaled"], ["y"], name="sum"),
    ]
    model = _model(nodes, inits + rot_inits)
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["MatMul"]
    check(fused)
    assert_equivalent(model, fused, feeds((*ROWS, N)), atol=ATOL, rtol=RTOL)


def _rotate_half(scaled_low: bool = False) -> tuple[list, list]:
    """``cat(-x[..., h:], x[..., :h]) @ W`` (the low half times a constant, if asked: a step
    after a Slice)."""
    h = N // 2
    inits = [
        _shape("zero", [0]),
        _shape("half", [h]),
        _shape("end", [N]),
        _shape("last", [-1]),
        _weight("W", (N, M), 6),
    ]
    low = "x0"
    nodes = [
        helper.make_node("Slice", ["x", "zero", "half", "last"], ["x0"], name="low"),
        helper.make_node("Slice", ["x", "half", "end", "last"], ["x1"], name="high"),
        helper.make_node("Neg", ["x1"], ["nx1"], name="neg"),
    ]
    if scaled_low:
        nodes.append(helper.make_node("Mul", ["x0", "c"], ["sx0"], name="scale"))
        inits.append(_weight("c", (h,), 7))
        low = "sx0"
    nodes += [
        helper.make_node("Concat", ["nx1", low], ["rot"], axis=-1, name="cat"),
        helper.make_node("MatMul", ["rot", "W"], ["y"], name="base"),
    ]
    return nodes, inits


def test_rotate_half_of_the_last_axis_before_a_layer_merges_into_it():
    """``cat(-x[..., h:], x[..., :h]) @ W``: Slice/Neg/Concat of rows, read twice from x."""
    nodes, inits = _rotate_half()
    model = _model(nodes, inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and op_types(fused) == ["MatMul"]
    check(fused)
    assert_equivalent(model, fused, feeds((*ROWS, N)), atol=ATOL, rtol=RTOL)


def test_a_sum_over_blocks_beside_the_base_layer_merges_into_it():
    """MiSS: ``x @ W + ReduceSum(Reshape(x, (..., r, b)), -2) @ B``."""
    inits = [
        _weight("W", (N, M), 7),
        _shape("split", [*ROWS, BLOCKS, BLOCK]),
        _shape("blocks_axis", [-2]),
        _weight("B", (BLOCK, M), 8),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["base"], name="base"),
        helper.make_node("Reshape", ["x", "split"], ["blocks"], name="split"),
        helper.make_node("ReduceSum", ["blocks", "blocks_axis"], ["s"], keepdims=0, name="sum"),
        helper.make_node("MatMul", ["s", "B"], ["delta"], name="miss"),
        helper.make_node("Add", ["base", "delta"], ["y"], name="join"),
    ]
    model = _model(nodes, inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and op_types(fused) == ["MatMul"]
    check(fused)
    assert_equivalent(model, fused, feeds((*ROWS, N)), atol=ATOL, rtol=RTOL)


def test_two_regions_sharing_their_reshape_both_merge_and_the_reshape_goes():
    """After common-subexpression elimination the q and v adapters read one ``Reshape(x)``."""
    nodes, inits = _oft("q")
    inits += [_weight("R2", (BLOCKS, BLOCK, BLOCK), 9), _weight("W2", (N, M), 10)]
    nodes += [
        helper.make_node(
            "Einsum", ["blocks", "R2"], ["rot2"], equation="...rk,rkc->...rc", name="oft2"
        ),
        helper.make_node("Reshape", ["rot2", "back"], ["xr2"], name="back2"),
        helper.make_node("MatMul", ["xr2", "W2"], ["v"], name="base2"),
        helper.make_node("Mul", ["q", "v"], ["y"], name="join"),
    ]
    model = _model(nodes, inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 2
    assert op_types(fused) == ["MatMul", "MatMul", "Mul"]
    assert "split" not in [n.name for n in fused.graph.node]
    check(fused)
    assert_equivalent(model, fused, feeds((*ROWS, N)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("equation", "reason"),
    [
        ("bsrk,rkc->bsrc", None),  # the rows named: a region too
        ("bsrk,bkc->bsrc", "Einsum 'oft' acts across rows"),
    ],
)
def test_an_einsum_of_rows_by_constant_blocks(equation, reason):
    nodes, inits = _oft(equation=equation)
    if reason:  # a weight that differs per batch row: (2, b, b)
        inits[2] = _weight("R", (ROWS[0], BLOCK, BLOCK), 1)
    model = _model(nodes, inits)
    fused, report = fuse_with_report(model)
    if reason is None:
        assert len(report.fusions) == 1 and op_types(fused) == ["MatMul"]
        assert_equivalent(model, fused, feeds((*ROWS, N)), atol=ATOL, rtol=RTOL)
        return
    assert report.fusions == [] and op_types(fused) == op_types(model)
    reasons = [d.reason for d in report.declined if "oft" in d.nodes]
    assert f"not a map of each row's features: {reason}" in reasons, reasons


def test_a_transpose_that_moves_the_rows_is_not_a_region():
    """``Reshape -> Transpose(perm moves a row axis) -> Einsum``: the reason names the Transpose."""
    inits = [
        _shape("split", [*ROWS, BLOCKS, BLOCK]),
        _weight("R", (BLOCKS, BLOCK, BLOCK), 1),
        _shape("back", [*ROWS, N]),
        _weight("W", (N, M), 2),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "split"], ["blocks"], name="split"),
        helper.make_node("Transpose", ["blocks"], ["moved"], perm=[1, 0, 2, 3], name="moves"),
        helper.make_node("Transpose", ["moved"], ["back_t"], perm=[1, 0, 2, 3], name="moves_back"),
        helper.make_node("Einsum", ["back_t", "R"], ["r"], equation="...rk,rkc->...rc", name="oft"),
        helper.make_node("Reshape", ["r", "back"], ["xr"], name="back"),
        helper.make_node("MatMul", ["xr", "W"], ["y"], name="base"),
    ]
    model = _model(nodes, inits)
    fused, report = fuse_with_report(model)
    assert report.fusions == []
    reasons = [d.reason for d in report.declined if "moves" in d.nodes]
    assert (
        "not a map of each row's features: Transpose 'moves' moves the rows (perm [1, 0, 2, 3])"
        in reasons
    )
    assert_equivalent(model, fused, feeds((*ROWS, N)), atol=ATOL, rtol=RTOL)


def test_subspace_branches_joined_and_scattered_merge_into_the_base_layer():
    """AdaMSS: ``x @ W + ScatterElements(0, idx, Concat_i(x @ A @ B_i @ C_i))``, the columns of
    the subspaces put back in order by constant per-row indices: one MatMul."""
    r = rng(11)
    widths = (5, 4, 3)  # the subspaces' columns: M = 12 in all
    order = r.permutation(M)
    inits = [_weight("W", (N, M), 12), _weight("A", (N, 4), 13)]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["base"], name="base"),
        helper.make_node("MatMul", ["x", "A"], ["h"], name="down"),
    ]
    parts = []
    for i, w in enumerate(widths):
        inits += [_weight(f"B{i}", (4, 2), 14 + i), _weight(f"C{i}", (2, w), 20 + i)]
        nodes += [
            helper.make_node("MatMul", ["h", f"B{i}"], [f"u{i}"], name=f"b{i}"),
            helper.make_node("MatMul", [f"u{i}", f"C{i}"], [f"p{i}"], name=f"c{i}"),
        ]
        parts.append(f"p{i}")
    inits += [
        init("zeros", np.zeros((*ROWS, M), np.float32)),
        init("idx", np.broadcast_to(order, (*ROWS, M)).astype(np.int64).copy()),
    ]
    nodes += [
        helper.make_node("Concat", parts, ["cat"], axis=-1, name="cat"),
        helper.make_node(
            "ScatterElements", ["zeros", "idx", "cat"], ["placed"], axis=-1, name="place"
        ),
        helper.make_node("Add", ["base", "placed"], ["y"], name="join"),
    ]
    model = _model(nodes, inits)
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and op_types(fused) == ["MatMul"]
    check(fused)
    assert_equivalent(model, fused, feeds((*ROWS, N)), atol=ATOL, rtol=RTOL)


def test_indices_that_differ_from_row_to_row_are_not_a_placement_of_features():
    r = rng(12)
    inits = [
        _weight("W", (N, M), 12),
        init("zeros", np.zeros((*ROWS, M), np.float32)),
        init(
            "idx", np.stack([r.permutation(M) for _ in range(ROWS[0] * ROWS[1])]).reshape(*ROWS, M)
        ),
        _weight("V", (M, M), 13),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="base"),
        helper.make_node(
            "ScatterElements", ["zeros", "idx", "h"], ["placed"], axis=-1, name="place"
        ),
        helper.make_node("MatMul", ["placed", "V"], ["y"], name="next"),
    ]
    model = _model(nodes, inits)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    reasons = [d.reason for d in report.declined if "place" in d.nodes]
    assert any("differ from row to row" in r for r in reasons), reasons


def _dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a dynamic batch (``x [B, 5, N]``), intermediate shapes not recorded."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    for info in [*copy.graph.input, *copy.graph.output]:
        info.type.tensor_type.shape.dim[0].dim_param = "B"
    check(copy)
    return copy


def test_rotate_half_on_rows_the_model_does_not_count_merges_into_the_layer():
    """A dynamic batch: the region is read with a stand-in for it, every shape inferred."""
    nodes, inits = _rotate_half(scaled_low=True)
    model = _dynamic(_model(nodes, inits))
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and op_types(fused) == ["MatMul"]
    check(fused)
    for batch in (1, 3):
        assert_equivalent(model, fused, feeds((batch, ROWS[1], N)), atol=ATOL, rtol=RTOL)


def test_a_reshape_of_rows_the_model_does_not_count_is_refused():
    """OFT's ``Reshape`` targets name the rows: with a dynamic batch they cannot be read."""
    model = _model(*_oft())
    dynamic = _dynamic(model)
    fused, report = fuse_with_report(dynamic)
    assert report.fusions == [] and op_types(fused) == op_types(dynamic)
    reasons = [d.reason for d in report.declined if "oft" in d.nodes]
    assert (
        "not a map of each row's features: Reshape 'split' has a target for a number of rows, "
        "and the model does not fix the number of rows (a dynamic axis)" in reasons
    ), reasons
