"""Do-no-harm corpus (issue #3): every ONNX operator conformance case through ``converter.fuse``.

ONNX defines its ~1,900 conformance models in Python (``onnx.backend.test.case``): one node, or
its function expansion, with inputs and expected outputs. As shipped none holds a chain (every
operand is a graph input), so each case runs in up to four forms:

- ``as-is``: the model as ONNX builds it;
- ``frozen``: for a model with a Gemm/MatMul, every input but the first becomes an initializer,
  so the op's operands are constant as in an exported network;
- ``chain-after`` / ``chain-before``: a frozen single Gemm/MatMul case followed / preceded by a
  ``MatMul`` with a square constant, so the case's own attributes and shapes go through a merge.

For each form and both policies: ``fuse`` never raises and leaves its argument alone, graph
inputs and outputs keep their names and order, Gemm+MatMul nodes never increase, the result
passes ``onnx.checker`` (full check) wherever the original does, and wherever onnxruntime (CPU,
no graph optimisations) runs the original the outputs agree: bit for bit when nothing was merged,
within the dtype's tolerance when something was. Cases onnxruntime cannot run are counted with
the reason. ``--corpus=sample`` (or ``ONNX_FUSE_CORPUS=sample``) runs a fifth of the as-is cases.
"""

from __future__ import annotations

import collections
import functools
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import converter

N_SHARDS = 8
SAMPLE_EVERY = 5
POLICIES = ("cost", "always")
LINEAR_OPS = ("Gemm", "MatMul")
# (atol, rtol) for outputs of a model in which something was merged.
TOLERANCES = {
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.float16): (2.5e-3, 1e-3),
    np.dtype(np.float64): (1e-8, 1e-7),
}


@dataclass(frozen=True)
class Variant:
    name: str
    form: str
    model: onnx.ModelProto
    feeds: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.form}:{self.name}"


@dataclass
class Outcome:
    fused: bool = False  # some policy merged something
    checked: bool = False  # the original passes the checker, so the result had to
    compared: bool = False  # outputs compared under onnxruntime
    skipped: str | None = None  # why outputs were not compared


# --- the corpus -------------------------------------------------------------------------------


@functools.cache
def _conformance_cases() -> tuple[Any, ...]:
    from onnx.backend.test.case import model as model_cases
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators divide by zero on purpose
        cases = list(node_cases.collect_testcases(None))
        # "real" model cases are URLs of large downloads; the "simple" ones are built in memory.
        cases += [c for c in model_cases.collect_testcases() if c.kind == "simple"]
    return tuple(cases)


@functools.cache
def _variants() -> tuple[Variant, ...]:
    variants = []
    for case in _conformance_cases():
        inputs = case.data_sets[0][0]
        variants.append(Variant(case.name, "as-is", case.model, _feeds(case.model, inputs)))
        frozen = _frozen(case.model, inputs)
        if frozen is not None:
            variants.append(Variant(case.name, "frozen", *frozen))
            variants.extend(_chained(case.name, *frozen))
    return tuple(variants)


def _selected(mode: str) -> list[Variant]:
    """All variants, or (``sample``) every SAMPLE_EVERY-th as-is case and every other form."""
    return [
        v
        for i, v in enumerate(_variants())
        if mode == "full" or v.form != "as-is" or i % SAMPLE_EVERY == 0
    ]


def _feed(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value) if isinstance(value, np.generic) else value


def _feeds(model: onnx.ModelProto, inputs: Sequence[Any]) -> dict[str, Any]:
    # ONNX pairs graph inputs with data the same way (zip, not strict).
    return {vi.name: _feed(v) for vi, v in zip(model.graph.input, inputs, strict=False)}


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _nodes(sub)


def _linear_ops(model: onnx.ModelProto) -> int:
    return sum(n.op_type in LINEAR_OPS and n.domain in ("", "ai.onnx") for n in _nodes(model.graph))


def _frozen(
    model: onnx.ModelProto, inputs: Sequence[Any]
) -> tuple[onnx.ModelProto, dict[str, Any]] | None:
    """``model`` with every array input but the first as an initializer, if it has a Gemm/MatMul."""
    if _linear_ops(model) == 0 or len(model.graph.input) < 2 or model.ir_version < 4:
        return None
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    del frozen.graph.input[:]
    feeds = {}
    for i, (vi, value) in enumerate(zip(model.graph.input, inputs, strict=False)):
        if i > 0 and isinstance(value, np.ndarray | np.generic):
            frozen.graph.initializer.append(numpy_helper.from_array(np.asarray(value), vi.name))
        else:
            frozen.graph.input.append(vi)
            feeds[vi.name] = _feed(value)
    return frozen, feeds


def _last_dim(vi: onnx.ValueInfoProto) -> int | None:
    dims = vi.type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].dim_value > 0 else None


def _square(name: str, n: int, dtype: np.dtype) -> np.ndarray:
    r = np.random.default_rng(zlib.crc32(name.encode()))
    return (r.standard_normal((n, n)) / np.sqrt(n)).astype(dtype)


def _chained(name: str, model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Variant]:
    """A single Gemm/MatMul case with a square ``MatMul`` after it and one before it."""
    graph = model.graph
    if len(graph.node) != 1 or graph.node[0].op_type not in LINEAR_OPS or not graph.input:
        return []
    node, x, y = graph.node[0], graph.input[0], graph.output[0]
    dtype = helper.tensor_dtype_to_np_dtype(y.type.tensor_type.elem_type)
    if dtype not in TOLERANCES or node.input[0] != x.name:
        return []
    variants = []
    if (n := _last_dim(y)) is not None:
        after = onnx.ModelProto()
        after.CopyFrom(model)
        after.graph.node[0].output[0] = f"{y.name}.pre"
        after.graph.initializer.append(numpy_helper.from_array(_square(name, n, dtype), "R"))
        after.graph.node.append(
            helper.make_node("MatMul", [f"{y.name}.pre", "R"], [y.name], name="chain_after")
        )
        variants.append(Variant(name, "chain-after", after, feeds))
    if (k := _last_dim(x)) is not None:
        before = onnx.ModelProto()
        before.CopyFrom(model)
        before.graph.node[0].input[0] = f"{x.name}.post"
        before.graph.initializer.append(numpy_helper.from_array(_square(name, k, dtype), "R"))
        before.graph.node.insert(
            0, helper.make_node("MatMul", [x.name, "R"], [f"{x.name}.post"], name="chain_before")
        )
        variants.append(Variant(name, "chain-before", before, feeds))
    return variants


# --- running and comparing --------------------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_reason(step: str, error: Exception) -> str:
    code = re.search(r"\[ONNXRuntimeError\] : \d+ : (\w+)", str(error))
    if code:
        why = code.group(1)
    elif re.search(r"Numpy_type \d+ can't be converted|No corresponding Numpy type", str(error)):
        why = "its Python API has no numpy type for bfloat16/float8/int4/int2 tensors"
    else:
        why = f"{type(error).__name__}: {str(error)[:80]}"
    return f"onnxruntime cannot {step} the original ({why})"


def _run_original(variant: Variant) -> tuple[list[Any] | None, str | None]:
    try:
        session = _session(variant.model)
    except Exception as e:
        return None, _ort_reason("load", e)
    try:
        return session.run(None, variant.feeds), None
    except Exception as e:
        return None, _ort_reason("run", e)


def _assert_match(expected: Any, got: Any, merged: bool, where: str) -> None:
    """Same structure, dtype and shape; bit-identical unless merged (then per-dtype tolerance)."""
    if isinstance(expected, list) or expected is None:
        assert type(got) is type(expected), f"{where}: {type(got)} != {type(expected)}"
        for i, (a, b) in enumerate(zip(expected or [], got or [], strict=True)):
            _assert_match(a, b, merged, f"{where}[{i}]")
        return
    a, b = np.asarray(expected), np.asarray(got)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), (
        f"{where}: {b.dtype}{b.shape} != {a.dtype}{a.shape}"
    )
    if merged and a.dtype in TOLERANCES:
        atol, rtol = TOLERANCES[a.dtype]
        np.testing.assert_allclose(b, a, atol=atol, rtol=rtol, err_msg=where)
    elif a.dtype == object:
        assert np.array_equal(a, b), f"{where}: values differ"
    else:
        assert a.tobytes() == b.tobytes(), f"{where}: not bit-identical (nothing was merged)"


def _passes_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception:
        return False
    return True


def _check_variant(variant: Variant) -> Outcome:
    outcome = Outcome(checked=_passes_checker(variant.model))
    before = variant.model.SerializeToString()
    results: dict[bytes, tuple[str, onnx.ModelProto, bool]] = {}
    for policy in POLICIES:
        fused = converter.fuse(variant.model, policy=policy)
        assert variant.model.SerializeToString() == before, f"{policy}: fuse() mutated its argument"
        for kind in ("input", "output"):
            names = [[v.name for v in getattr(m.graph, kind)] for m in (variant.model, fused)]
            assert names[0] == names[1], f"{policy}: graph {kind}s changed: {names}"
        ops_before, ops_after = _linear_ops(variant.model), _linear_ops(fused)
        assert ops_after <= ops_before, f"{policy}: Gemm+MatMul {ops_before} -> {ops_after}"
        if outcome.checked:
            onnx.checker.check_model(fused, full_check=True)
        merged = any(n.doc_string.startswith("onnx-fuse merged") for n in fused.graph.node)
        outcome.fused |= merged
        results.setdefault(fused.SerializeToString(), (policy, fused, merged))
    expected, outcome.skipped = _run_original(variant)
    if outcome.skipped:
        return outcome
    for policy, fused, merged in results.values():
        got = _session(fused).run(None, variant.feeds)
        try:
            _assert_match(expected, got, merged, f"{policy}: outputs")
        except AssertionError:
            rerun, _ = _run_original(variant)
            if rerun is not None and _differs(expected, rerun):
                outcome.skipped = "the original's outputs are random (differ between two runs)"
                return outcome
            raise
    outcome.compared = True
    return outcome


def _differs(a: list[Any], b: list[Any]) -> bool:
    try:
        _assert_match(a, b, False, "rerun")
    except AssertionError:
        return True
    return False


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", range(N_SHARDS))
def test_corpus_do_no_harm(shard: int, corpus_mode: str) -> None:
    variants = _selected(corpus_mode)[shard::N_SHARDS]
    failures, counts, skips = [], collections.Counter(), collections.Counter()
    for variant in variants:
        try:
            outcome = _check_variant(variant)
        except Exception as e:  # any exception, from fuse or a check, is a failure of this case
            failures.append(f"{variant}: {type(e).__name__}: {e}")
            continue
        counts.update(
            {"fused": outcome.fused, "checked": outcome.checked, "compared": outcome.compared}
        )
        if outcome.skipped:
            skips[outcome.skipped] += 1
    print(f"shard {shard}: {len(variants)} variants, {dict(counts)}, skipped {dict(skips)}")
    assert not failures, f"{len(failures)} of {len(variants)} cases harmed:\n" + "\n".join(failures)
    # If onnxruntime stopped running the corpus, this test would prove nothing.
    assert counts["compared"] >= 0.6 * len(variants), dict(skips)


# Gemm conformance cases (onnx 1.23 names); those with transA=1 can only start a chain.
GEMM_CASES = (
    "test_gemm_default_zero_bias",
    "test_gemm_default_no_bias",
    "test_gemm_default_scalar_bias",
    "test_gemm_default_single_elem_vector_bias",
    "test_gemm_default_vector_bias",
    "test_gemm_default_matrix_bias",
    "test_gemm_transposeB",
    "test_gemm_alpha",
    "test_gemm_beta",
)
TRANS_A_CASES = ("test_gemm_transposeA", "test_gemm_all_attributes")


def test_corpus_linear_cases_fuse_in_a_chain() -> None:
    """Guards against fusion silently stopping: the corpus's Gemm/MatMul cases merge in a chain.

    As shipped the corpus holds no chain at all (every operand is a graph input), so this counts
    the ``chain-after``/``chain-before`` forms: 22 of 35 merge with onnx 1.23.
    """
    fused = {
        (v.form, v.name)
        for v in _variants()
        if v.form.startswith("chain")
        and _linear_ops(converter.fuse(v.model)) < _linear_ops(v.model)
    }
    expected = {(form, n) for form in ("chain-after", "chain-before") for n in GEMM_CASES}
    expected |= {("chain-after", n) for n in TRANS_A_CASES}
    expected |= {("chain-after", "test_matmul_2d"), ("chain-before", "test_matmul_2d")}
    assert expected <= fused, sorted(expected - fused)
    assert not fused & {("chain-before", n) for n in TRANS_A_CASES}
