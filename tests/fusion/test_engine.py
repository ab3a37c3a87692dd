"""Tests of converter.fusion.engine: merges that compose, checked invariants, one constant answer.

The cases of issue 8, built with torch (both exporters) where torch can express them and by hand
otherwise: stacked residual blocks, LoRA adapters on consecutive layers, chains the cost model
splits into several segments, shared small constants, idempotence, independence from node order,
sizes counted through ``Identity`` without shape information, and the exit code when the engine
ever writes an inconsistent graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import (
    assert_equivalent,
    check,
    feeds,
    fuse_with_report,
    init,
    linear_chain,
    make_model,
    op_types,
    rng,
    run,
    xy_io,
)
from onnx import helper

import converter
from converter.errors import EngineError
from converter.fusion.core import invariants
from converter.fusion.linear import algebra
from converter.fusion.passes import FusionPassResult, fuse_model

torch = pytest.importorskip("torch")

EXPORTERS = {"legacy": False, "dynamo": True}
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _export(module: torch.nn.Module, x: torch.Tensor, path, dynamo: bool) -> onnx.ModelProto:
    module.eval()
    if dynamo:
        torch.onnx.export(module, (x,), dynamo=True, input_names=["x"]).save(str(path))
    else:
        torch.onnx.export(
            module, (x,), str(path), dynamo=False, input_names=["x"], opset_version=17
        )
    return onnx.load(str(path))


def _linear_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("Gemm", "MatMul") for n in model.graph.node)


class _StackedResidual(torch.nn.Module):
    """``h = x + L1(x); y = head(h + L2(h))``."""

    def __init__(self, d: int = 16, out: int = 5) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.l1(x)
        return self.head(h + self.l2(h))


class _Lora(torch.nn.Module):
    """A PEFT-style adapted Linear: ``base(x) + scale * B(A(x))``."""

    def __init__(self, d_in: int, d_out: int, r: int = 2, scale: float = 0.5) -> None:
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out)
        self.a = torch.nn.Linear(d_in, r, bias=False)
        self.b = torch.nn.Linear(r, d_out, bias=False)
        torch.nn.init.normal_(self.b.weight)  # non-zero: PEFT's zero init hides mistakes
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x)) * self.scale


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("rank", [2, 3])
def test_stacked_residual_blocks_merge_into_one_valid_op(tmp_path, exporter, rank):
    torch.manual_seed(0)
    module = _StackedResidual()
    x = torch.randn(4, 16) if rank == 2 else torch.randn(2, 3, 16)
    model = _export(module, x, tmp_path / "m.onnx", EXPORTERS[exporter])
    fused, report = fuse_with_report(model)
    check(fused)
    assert _linear_count(fused) == 1
    assert len(report.fusions) == 3  # two residual sums, then the chain they form with the head
    live = [r for r in report.fusions if r.output is not None]
    assert len(live) == 1 and live[0].output == model.graph.output[0].name
    assert all(r.merged_into == live[0].new_nodes[0] for r in report.fusions if r not in live)
    expected = module(x).detach().numpy()
    (got,) = run(fused, {model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_lora_adapters_on_consecutive_layers(tmp_path, exporter):
    torch.manual_seed(1)
    module = torch.nn.Sequential(_Lora(12, 10), _Lora(10, 8), torch.nn.ReLU(), _Lora(8, 6))
    x = torch.randn(2, 3, 12)
    model = _export(module, x, tmp_path / "m.onnx", EXPORTERS[exporter])
    fused, report = fuse_with_report(model)
    check(fused)
    # Each adapter merges into its base; the first two layers then merge into one.
    assert _linear_count(fused) == 2
    assert sum(r.note is not None and r.note.startswith("LoRA") for r in report.fusions) == 3
    (got,) = run(fused, {model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(got, module(x).detach().numpy(), **TOL)


def test_chain_split_by_the_cost_model_stays_consistent():
    model = linear_chain([32, 32, 4, 32, 32], form="matmul", rank=3)
    fused, report = fuse_with_report(model)
    check(fused)
    # 32->32->4 | 4->32->32: two segments that meet at the bottleneck, the second reading the
    # output of the first after it was rewritten.
    assert [r.widths for r in report.fusions] == [[32, 32, 4], [4, 32, 32]]
    assert _linear_count(fused) == 2
    assert any(d.reason.startswith("cost model") for d in report.declined)
    assert_equivalent(model, fused, feeds((2, 3, 32)), **TOL)


def test_fusing_twice_finds_nothing_more():
    model = linear_chain([8, 16, 16, 8, 4])
    once, report = fuse_with_report(model)
    twice, again = fuse_with_report(once)
    assert report.fusions and again.fusions == []
    assert twice.graph.node == once.graph.node


def _shuffled_topologically(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The same graph with its nodes listed in another valid topological order."""
    r = np.random.default_rng(seed)
    nodes = list(model.graph.node)
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    order = []
    while nodes:
        candidates = [n for n in nodes if all(i in ready or not i for i in n.input)]
        pick = candidates[r.integers(len(candidates))]
        nodes.remove(pick)
        order.append(pick)
        ready.update(pick.output)
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(order)
    return shuffled


@pytest.mark.parametrize("seed", range(4))
def test_result_does_not_depend_on_node_order(tmp_path, seed):
    torch.manual_seed(2)
    module = torch.nn.Sequential(_Lora(8, 8), torch.nn.Linear(8, 8), torch.nn.Tanh(), _Lora(8, 4))
    x = torch.randn(3, 8)
    model = _export(module, x, tmp_path / "m.onnx", dynamo=False)
    reference, ref_report = fuse_with_report(model)
    fused, report = fuse_with_report(_shuffled_topologically(model, seed))
    check(fused)
    assert sorted(op_types(fused)) == sorted(op_types(reference))
    assert sorted(r.widths for r in report.fusions) == sorted(r.widths for r in ref_report.fusions)
    feed = {model.graph.input[0].name: x.numpy()}
    np.testing.assert_allclose(run(fused, feed)[0], run(reference, feed)[0], atol=1e-6)


def _identity_weight_model() -> onnx.ModelProto:
    """``y = x @ W0 @ W1`` with ``W0`` handed out through ``Identity`` and no value_info."""
    r = rng(3)
    nodes = [
        helper.make_node("Identity", ["W0_src"], ["W0"], name="dedup"),
        helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
        helper.make_node("MatMul", ["h", "W1"], ["y"], name="mm1"),
    ]
    inits = [
        init("W0_src", r.standard_normal((16, 17)).astype(np.float32)),
        init("W1", r.standard_normal((17, 16)).astype(np.float32)),
    ]
    return make_model(nodes, *xy_io(["n", 16], ["n", 16]), inits)


def test_sizes_count_weights_behind_identity_without_shapes():
    model = _identity_weight_model()
    assert not model.graph.value_info
    fused, report = fuse_with_report(model)
    assert report.params_before == 16 * 17 * 2
    assert report.macs_before == 16 * 17 * 2
    (record,) = report.fusions
    assert record.params_before == 16 * 17 * 2 and record.params_after == 16 * 16
    assert report.params_after == 16 * 16
    assert op_types(fused) == ["Gemm"]  # a 2-D input: the merged op is a Gemm
    assert [t.name for t in fused.graph.initializer] == [f"{record.new_nodes[0]}.weight"]
    assert_equivalent(model, fused, feeds((3, 16)), **TOL)


def _shared_scale_and_bias_model() -> onnx.ModelProto:
    """Two LoRA adapters reading one scale, base biases sharing one zero vector with a
    LayerNorm, as the dynamo exporter deduplicates them."""
    r = rng(4)
    d, rank = 8, 2
    inits = [init("scale", np.array(2.0, np.float32)), init("zero", np.zeros(d, np.float32))]
    inits.append(init("gamma", r.standard_normal(d).astype(np.float32)))
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "zero"], ["n"], name="ln")]
    prev = "n"
    for i in range(2):
        inits += [
            init(f"W{i}", r.standard_normal((d, d)).astype(np.float32)),
            init(f"A{i}", r.standard_normal((d, rank)).astype(np.float32)),
            init(f"B{i}", r.standard_normal((rank, d)).astype(np.float32)),
        ]
        nodes += [
            helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"base{i}"),
            helper.make_node("Add", [f"m{i}", "zero"], [f"b{i}"], name=f"bias{i}"),
            helper.make_node("MatMul", [prev, f"A{i}"], [f"a{i}"], name=f"lora_A{i}"),
            helper.make_node("MatMul", [f"a{i}", f"B{i}"], [f"ab{i}"], name=f"lora_B{i}"),
            helper.make_node("Mul", [f"ab{i}", "scale"], [f"s{i}"], name=f"scaling{i}"),
            helper.make_node("Add", [f"b{i}", f"s{i}"], [f"o{i}"], name=f"sum{i}"),
            helper.make_node("Relu", [f"o{i}"], [f"r{i}" if i == 0 else "y"], name=f"act{i}"),
        ]
        prev = f"r{i}"
    return make_model(nodes, *xy_io(["b", "s", d], ["b", "s", d]), inits)


def test_small_shared_constants_are_copied_not_a_reason_to_refuse():
    model = _shared_scale_and_bias_model()
    fused, report = fuse_with_report(model)
    check(fused)
    assert len(report.fusions) == 2 and report.declined == []
    assert _linear_count(fused) == 2
    names = {t.name for t in fused.graph.initializer}
    assert {"zero", "gamma"} <= names and "scale" not in names  # LayerNorm keeps its bias
    assert_equivalent(model, fused, feeds((2, 3, 8)), **TOL)


def test_a_shared_weight_is_read_and_the_cost_model_keeps_the_model_from_growing():
    """A weight another op also reads (VeRA's one frozen pair, a tied weight) is read by the
    merge, which writes its own; it stays for the other reader. The cost model counts only what
    the merge frees: fc1 + fc2 frees V for a merged matrix of its size (made), a scale folded
    into fc1 frees 6 numbers for a new 36-element weight (refused, ``always`` makes it)."""
    r = rng(5)
    w = r.standard_normal((6, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "V"], ["y"], name="fc2"),
        helper.make_node("MatMul", ["x", "W"], ["z"], name="tied"),
    ]
    z = helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["n", 6])
    x, (y,) = xy_io(["n", 6], ["n", 6])
    model = make_model(nodes, x, [y, z], [init("W", w), init("V", w.T.copy())])
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and report.fusions[0].nodes == ["fc1", "fc2"]
    assert report.params_after == report.params_before == 72
    assert [n.name for n in fused.graph.node if n.input[1] == "W"] == ["tied"]
    assert_equivalent(model, fused, {"x": r.standard_normal((3, 6)).astype(np.float32)})
    nodes[1] = helper.make_node("Mul", ["h", "s"], ["y"], name="scale")
    scaled = make_model(nodes, x, [y, z], [init("W", w), init("s", w[0].copy())])
    fused, report = fuse_with_report(scaled)
    assert report.fusions == []
    assert any(
        "cost model: the merged weight and bias would hold 36 parameters, more than the 6"
        in d.reason
        for d in report.declined
    )
    assert fused.graph.node == scaled.graph.node
    fused, report = fuse_with_report(scaled, policy="always")
    assert len(report.fusions) == 1


def test_declined_merges_are_decided_without_multiplying_weights(monkeypatch):
    calls = []
    real = algebra.compose
    monkeypatch.setattr(algebra, "compose", lambda a, b: calls.append(1) or real(a, b))
    # A wide bias on a narrow chain: merging would hold more parameters than it frees.
    r = rng(6)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "W2"], ["m"], name="mm2"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
    ]
    inits = [
        init("W1", r.standard_normal((2, 3)).astype(np.float32)),
        init("W2", r.standard_normal((3, 4)).astype(np.float32)),
        init("b", r.standard_normal((5, 1, 4)).astype(np.float32)),  # not a last-axis bias
    ]
    model = make_model(nodes, *xy_io([5, 7, 2], [5, 7, 4]), inits)
    _, report = fuse_with_report(model)
    assert calls == [1]  # only the merge that was made composed its maps
    assert len(report.fusions) == 1


def test_pass_returns_a_pass_result_carrying_the_report():
    model = ir.serde.deserialize_model(linear_chain([4, 8, 4]))
    result = converter.FuseLinearChainsPass()(model)
    assert isinstance(result, FusionPassResult) and result.modified
    assert len(result.report.fusions) == 1
    again = converter.FuseLinearChainsPass()(result.model)
    assert not again.modified and again.report.fusions == []


def test_invariant_checker_finds_a_dangling_input():
    model = ir.serde.deserialize_model(linear_chain([4, 8, 4]))
    first = next(iter(model.graph))
    model.graph.remove(first)  # the second Gemm now reads a value nothing produces
    with pytest.raises(EngineError, match="not defined before it"):
        invariants.check_model(model)


def test_an_inconsistent_rewrite_is_exit_3_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from converter.cli import main
    from converter.fusion.linear.rewrite import LinearMerge

    src = tmp_path / "m.onnx"
    onnx.save(linear_chain([4, 8, 4]), src)

    def broken(self, round, plan, computed):  # a merge that leaves a node reading nothing
        written = real_write(self, round, plan, computed)
        round.graph.append(ir.node("Relu", [ir.Value(name="ghost")], name="dangling"))
        return written

    real_write = LinearMerge.write
    monkeypatch.setattr(LinearMerge, "write", broken)
    code = main([str(src), "-o", str(tmp_path / "out.onnx"), "--no-validate"])
    assert code == 3
    assert "inconsistent" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_fuse_model_checks_the_whole_model_at_the_end():
    model = ir.serde.deserialize_model(linear_chain([4, 8, 4]))
    report = fuse_model(model)
    invariants.check_model(model)
    assert report.linear_ops_after == 1
