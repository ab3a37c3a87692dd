"""A run's state lives in its Context: caches, names, trained weights, inferred shapes.

Two runs in one process (a test suite, batch mode, a notebook) must not see each other's
answers: each Context resolves, names and infers on its own, and nothing is left behind.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from builders import linear_chain, op_types

import converter
from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context, Names
from converter.fusion.core.declined import Declined
from converter.model_io import training


def _model(widths=(4, 6, 6, 3)) -> ir.Model:
    return ir.serde.deserialize_model(linear_chain(list(widths)))


def _with_training_info(proto: onnx.ModelProto, weight: str) -> onnx.ModelProto:
    info = onnx.TrainingInfoProto()
    info.algorithm.CopyFrom(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", [weight], [f"{weight}_new"])],
            "step",
            [],
            [onnx.helper.make_tensor_value_info(f"{weight}_new", onnx.TensorProto.FLOAT, None)],
        )
    )
    info.update_binding.add(key=weight, value=f"{weight}_new")
    proto.training_info.append(info)
    return proto


def test_each_context_resolves_on_its_own():
    model = _model()
    weight = model.graph.initializers["W0"]
    first = Context(model)
    assert isinstance(first.constants.resolve(weight), Constant)
    model.graph.inputs.append(weight)  # now a graph input: it can be overridden at run time
    assert isinstance(first.constants.resolve(weight), Constant)  # a run's answers hold for it
    second = Context(model).constants.resolve(weight)
    assert isinstance(second, Declined)
    assert second.reason == "weight 'W0' is a graph input (it can be overridden at run time)"


def test_a_weight_trained_in_one_run_is_not_trained_in_the_next():
    proto = _with_training_info(linear_chain([4, 6, 6, 3]), "W1")
    model = ir.serde.deserialize_model(proto)
    training.stash(model, proto)
    first = converter.FuseLinearChainsPass()(model).report
    assert first.fusions == []  # fc1 stays, so fc0 and fc2 are not neighbours
    assert any("'W1' is trained" in d.reason for d in first.declined)
    assert op_types(ir.serde.serialize_model(model)) == ["Gemm", "Gemm", "Gemm"]
    model.meta.pop("onnx_fuse.training_info")  # the next run's model has no training_info
    second = converter.FuseLinearChainsPass()(model).report
    assert not any("trained" in d.reason for d in second.declined)
    assert op_types(ir.serde.serialize_model(model)) == ["Gemm"]


def test_the_trained_weights_are_the_runs():
    proto = _with_training_info(linear_chain([4, 6, 6, 3]), "W1")
    model = ir.serde.deserialize_model(proto)
    training.stash(model, proto)
    trained = training.mark_trained(model)
    assert trained == {model.graph.initializers["W1"]}
    found = Context(model, trained=trained).constants.resolve(model.graph.initializers["W1"])
    assert isinstance(found, Declined)
    assert found.reason == "weight 'W1' is trained by the model's training_info"
    assert isinstance(Context(model).constants.resolve(model.graph.initializers["W1"]), Constant)


def test_shapes_are_inferred_only_within_the_run_and_put_back():
    model = _model()
    hidden = next(iter(model.graph)).outputs[0]
    assert hidden.shape is None  # the builder records no value_info
    ctx = Context(model)
    assert not ctx.shapes.request()  # outside a run: nothing inferred
    with ctx.shapes.on_demand():
        assert ctx.shapes.request()  # the first request infers
        assert hidden.shape is not None and list(hidden.shape)[-1] == 6
        assert not ctx.shapes.request()  # once per run
        assert ctx.shapes.rank(hidden) == 2
    assert hidden.shape is None  # put back: the written model gains no value_info
    assert not Context(model).shapes.request()


def test_ranks_are_carried_back_through_the_ops_that_made_a_value():
    model = _model()
    out = model.graph.outputs[0]
    out.shape = None
    # y = Gemm(...): a Gemm's output has rank 2, whatever the model records
    assert Context(model).shapes.rank(out) == 2


def test_names_are_fresh_across_the_whole_model():
    model = _model()
    names = Names([model.graph])
    assert names.fresh("fc0") == "fc0_1"
    assert names.fresh("fc0") == "fc0_2"
    assert names.fresh("new") == "new"
    assert names.fresh("new") == "new_1"
    assert Context(model).names.fresh("fc0") == "fc0_1"  # a run's names start from the model


def test_opset_is_the_models():
    assert Context(_model()).opset == 17
    assert Context(ir.serde.deserialize_model(linear_chain([4, 6, 3], opset=13))).opset == 13
