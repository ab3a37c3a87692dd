"""Issue 18: what onnxruntime runs of a fused model, checked against what it runs of the original.

onnxruntime's graph optimiser turns patterns of standard ops into one kernel: exact GELU's
``Div -> Erf -> Add -> Mul -> Mul`` into ``Gelu``, a norm decomposition into
``(Simplified)LayerNormalization``, a residual ``Add`` before a norm into
``SkipLayerNormalization``... A fold that takes one constant out of such a pattern (GELU's final
``* 0.5`` into the next projection, an RMSNorm's weight into the LM head) removes one op from the
graph and costs the runtime the whole kernel. For every block and network of :mod:`archs.vision`
and :mod:`archs.reparam` and the LoRA language models of :mod:`archs.language` (BERT with exact
GELU, GPT-2 with tanh GELU, LLaMA with RMSNorm and SiLU), exported by both torch exporters and
fused by ``converter.fuse_file`` with validation on:

* ``test_keeps_fused_kernels``: the fused model gets at least as many of each fused kernel as the
  original (``lost_kernels(fused_kernels(original), fused_kernels(fused)) == []``; the kernels of
  ``converter.equivalence.kernels.FUSED_KERNELS``, CPU, extended optimisations);
* ``test_every_exact_gelu_is_one_kernel``: each exact GELU of the original (an ``Erf`` pattern,
  or opset 20's ``Gelu`` op) runs as one ``Gelu`` (or ``BiasGelu``) in the fused model, in
  whichever order the exporter wrote it: ``torch.export``'s opset-18 order,
  ``Mul(x, Mul(0.5, Add(Erf(Div(x, sqrt 2)), 1)))``, is one onnxruntime does not fuse, and the
  fused model must be in one it does (``Mul(Mul(x, Add(...)), 0.5)``);
* ``test_no_free_fold_left``: no BatchNormalization left, and every fold the shared
  ``free_folds`` heuristic still finds is one the report keeps for the runtime (the heuristic
  leaves out GELU's 0.5 and a norm weight right after its ``Mul``/``Div``, not one reached
  through a ``Cast`` or ``Div(1, Sqrt)``, as in LLaMA's RMSNorm);
* ``test_validates``: validation passed (or there was nothing to fuse).

Which models: every block of both registries and the three language models, with both exporters.
Of the whole networks only a representative subset runs here (:data:`NETWORKS`: DeiT-III-like
ViT, the issue's example, and EfficientFormer, BatchNorm in conv and token MLPs); each network
is built of blocks tested here, and exporting one costs about 2 s of CPU. All networks, both
exporters, with latency, are in ``benchmarks/runtime.py``.

Exports and fusions come from :mod:`archs.cache`, shared with ``test_archs.py`` (the blocks are
exported once per run for both); each file's kernels are counted once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from converter.equivalence.kernels import lost_kernels

from . import cache, reparam, vision
from .export import count_ops, free_folds, unexplained_folds

# the representative subset of the whole networks (the rest: benchmarks/runtime.py)
NETWORKS = ("deit_distilled", "efficientformer")
# archs.language.MODELS, named here so that collecting needs no transformers
LANGUAGE_MODELS = ("bert", "gpt2", "llama")
_MODELS = [*vision.BLOCKS, *reparam.BLOCKS, *NETWORKS, *(f"lm:{n}" for n in LANGUAGE_MODELS)]
PAIRS = [
    pytest.param(n, e, id=f"{n.removeprefix('lm:')}-{e}") for n in _MODELS for e in cache.EXPORTERS
]
_GELU_KERNELS = ("Gelu", "BiasGelu")


def _original(cache_dir: Path, name: str, exporter: str) -> Path:
    if not name.startswith("lm:"):
        return cache.exported(cache_dir, name, exporter)
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return cache.exported_lm(cache_dir, name.removeprefix("lm:"), exporter)


def _pair(cache_dir: Path, name: str, exporter: str) -> tuple[Path, Path, dict]:
    """(original, fused, report facts) of one model and exporter, made once per run."""
    src = _original(cache_dir, name, exporter)
    dst, facts = cache.fused(cache_dir, src)
    return src, dst, facts


def test_the_subsets_name_real_models():
    assert set(NETWORKS) <= set(vision.NETWORKS) | set(reparam.NETWORKS)


def test_language_models_are_archs_language_models():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from . import language

    assert set(LANGUAGE_MODELS) == set(language.MODELS)


@pytest.mark.parametrize(("name", "exporter"), PAIRS)
def test_keeps_fused_kernels(cache_dir, name, exporter):
    src, dst, _ = _pair(cache_dir, name, exporter)

    before, after = cache.kernels(src), cache.kernels(dst)

    lost = lost_kernels(before, after)
    assert lost == [], (
        f"{name} ({exporter}): onnxruntime fuses fewer kernels after onnx-fuse: {lost} "
        f"(original {before}, fused {after}); a fold took a constant out of a pattern it fuses"
    )


@pytest.mark.parametrize(("name", "exporter"), PAIRS)
def test_every_exact_gelu_is_one_kernel(cache_dir, name, exporter):
    src, dst, _ = _pair(cache_dir, name, exporter)
    ops = count_ops(src)
    gelus = ops["Erf"] + ops["Gelu"]  # none in most models: then none may appear either

    fused = cache.kernels(dst)

    kernels = sum(fused.get(k, 0) for k in _GELU_KERNELS)
    assert kernels == gelus, (
        f"{name} ({exporter}): {gelus} exact GELU in the original, {kernels} Gelu/BiasGelu "
        f"kernels in the fused model (original {cache.kernels(src)}, fused {fused})"
    )


@pytest.mark.parametrize(("name", "exporter"), PAIRS)
def test_no_free_fold_left(cache_dir, name, exporter):
    _, dst, facts = _pair(cache_dir, name, exporter)

    _, batchnorm, where = free_folds(dst)

    assert batchnorm == 0
    assert unexplained_folds(where, set(facts["kept"])) == [], f"{name} ({exporter}): {where}"


@pytest.mark.parametrize(("name", "exporter"), PAIRS)
def test_validates(cache_dir, name, exporter):
    _, _, facts = _pair(cache_dir, name, exporter)

    assert facts["validated"] is True or (facts["validated"] is None and facts["fusions"] == 0), (
        facts
    )
