"""Tiny transformers language models with PEFT LoRA adapters, exported to ONNX by both exporters.

The models of issue 12, built from tiny configs with seeded random weights (nothing is loaded
from a hub, no tokenizer: inputs are random token ids):

* ``bert``: ``BertModel`` (no pooler), LoRA on ``query`` and ``value``;
* ``gpt2``: ``GPT2LMHeadModel``, LoRA on the fused qkv projection ``c_attn`` (a ``Conv1D``, whose
  weight is stored ``(in, out)``: PEFT needs ``fan_in_fan_out=True``);
* ``llama``: ``LlamaForCausalLM`` with grouped-query attention (2 key/value heads for 4 query
  heads), LoRA on ``q_proj``, ``v_proj`` and ``down_proj``.

Every adapter has ``r=8, lora_alpha=16, lora_dropout=0.0`` (so ``scaling = 2.0``) and a random
non-zero ``lora_B``: PEFT initialises ``lora_B`` to zero, which makes an adapter the identity and
hides every mistake in merging it. ``merged(model)`` is what ``merge_and_unload()`` gives,
``W = W0 + scaling * B @ A`` written into each base layer.

``export_lm`` exports with ``use_cache=False`` at a fixed batch 2 x sequence 8 and writes the
token ids it used to an ``.npz`` for ``onnx-fuse --inputs``. The legacy exporter also gets an
all-ones ``attention_mask`` for the causal LMs: without one, transformers checks ``position_ids``
for packed sequences with ``torch.diff``, which the legacy exporter cannot export.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

__all__ = [
    "BATCH",
    "LORA_ALPHA",
    "LORA_RANK",
    "MODELS",
    "OPSET_LEGACY",
    "SEQ",
    "ExporterCannot",
    "Exported",
    "build",
    "count_linear_ops",
    "export_lm",
    "merged",
    "run_onnx",
    "run_torch",
    "token_inputs",
]

log = logging.getLogger(__name__)

BATCH, SEQ = 2, 8
LORA_RANK, LORA_ALPHA = 8, 16
OPSET_LEGACY = 17
HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 128, 256, 2, 4, 512


class ExporterCannot(RuntimeError):
    """An exporter cannot export this model; the message says why (tests skip with it)."""


@dataclass(frozen=True)
class _Spec:
    make: Callable[[], PreTrainedModel]
    targets: tuple[str, ...]
    fan_in_fan_out: bool = False


def _bert() -> PreTrainedModel:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
        use_cache=False,
    )
    return BertModel(config, add_pooling_layer=False)


def _gpt2() -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=64,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        use_cache=False,
    )
    return GPT2LMHeadModel(config)


def _llama() -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,  # grouped-query attention
        max_position_embeddings=64,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


MODELS: dict[str, _Spec] = {
    "bert": _Spec(_bert, ("query", "value")),
    "gpt2": _Spec(_gpt2, ("c_attn",), fan_in_fan_out=True),
    "llama": _Spec(_llama, ("q_proj", "v_proj", "down_proj")),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """Model ``name`` of ``MODELS`` with seeded random weights and LoRA adapters (non-zero B), in eval mode."""
    spec = MODELS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = spec.make()
        lora = LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=list(spec.targets),
            fan_in_fan_out=spec.fan_in_fan_out,
        )
        with warnings.catch_warnings():  # peft calls a transformers method deprecated for v6
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(base, lora)
        _perturb(model)
    return model.eval()


_LAST_LAYER = re.compile(rf"\.(layer|layers|h)\.{LAYERS - 1}\.")


def _perturb(model: torch.nn.Module) -> None:
    """Non-zero LoRA B everywhere; random biases and norm weights outside the last layer.

    PEFT's zero ``lora_B`` makes every adapter the identity. transformers initialises biases to
    zero and norm weights to one, which hides a bias or scale mistake, but is also what makes
    the dynamo exporter deduplicate them into one shared initializer; the last layer keeps that
    initialisation so both cases are in every model.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.weight"):
                torch.nn.init.normal_(param, std=0.02)
            elif _LAST_LAYER.search(name) or "lora_" in name or param.dim() != 1:
                continue
            elif name.endswith("bias"):
                torch.nn.init.normal_(param, std=0.1)
            elif name.endswith("weight"):  # LayerNorm / RMSNorm scale
                param.copy_(1.0 + 0.1 * torch.randn_like(param))


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """``merge_and_unload()`` of a copy of ``model`` (the LoRA model itself is left as it was)."""
    return copy.deepcopy(model).merge_and_unload().eval()


def _transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _TokensToTensor(torch.nn.Module):
    """``input_ids`` (and ``attention_mask``) -> the model's first output as a plain tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out[0]


def token_inputs(model: torch.nn.Module, *, dynamo: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random token ids (batch ``BATCH`` x ``SEQ``), plus an all-ones mask where needed."""
    lm = _transformers_model(model)
    rng = np.random.default_rng(seed)
    inputs = {"input_ids": rng.integers(0, lm.config.vocab_size, (BATCH, SEQ), dtype=np.int64)}
    if not dynamo and lm.can_generate():
        # without a mask transformers looks for packed sequences with torch.diff (no legacy symbolic)
        inputs["attention_mask"] = np.ones((BATCH, SEQ), dtype=np.int64)
    return inputs


def run_onnx(path: str | Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of the ONNX model at ``path`` on ``inputs`` under onnxruntime, with its
    graph optimisations off (what the file says, not what the runtime rewrites)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def run_torch(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output (logits or last hidden state) on ``inputs``, as numpy."""
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        return _TokensToTensor(model)(**tensors).numpy()


@dataclass(frozen=True)
class Exported:
    """An exported model: the ``.onnx`` path and the ``.npz`` of the inputs it was exported with."""

    path: Path
    inputs_path: Path
    inputs: dict[str, np.ndarray]


def export_lm(model: torch.nn.Module, path: str | Path, *, dynamo: bool, seed: int = 0) -> Exported:
    """Export ``model`` to ``path`` (weights inline, ``use_cache=False``) with the chosen exporter.

    The legacy exporter writes opset ``OPSET_LEGACY``; ``torch.export`` its own default opset.
    Shapes are fixed (batch ``BATCH`` x ``SEQ``). Raises ``ExporterCannot`` when the legacy
    exporter has no symbolic for an op of this model.
    """
    path = Path(path)
    _transformers_model(model).config.use_cache = False
    inputs = token_inputs(model, dynamo=dynamo, seed=seed)
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    wrapper = _TokensToTensor(model).eval()
    output = "last_hidden_state" if not _transformers_model(model).can_generate() else "logits"
    with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")  # torch's and transformers' notices about tracing
        if dynamo:
            program = torch.onnx.export(
                wrapper, args, dynamo=True, verbose=False, output_names=[output]
            )
            program.save(str(path), external_data=False)
        else:
            _export_legacy(wrapper, args, path, list(inputs), output)
    inputs_path = path.with_suffix(".inputs.npz")
    np.savez(inputs_path, **inputs)
    log.debug(
        "exported %s (%s exporter), inputs %s", path, "dynamo" if dynamo else "legacy", list(inputs)
    )
    return Exported(path, inputs_path, inputs)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors from these loggers: the exporters warn about torchvision and constant folding."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _export_legacy(
    wrapper: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output: str
) -> None:
    try:
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET_LEGACY,
            input_names=input_names,
            output_names=[output],
        )
    except torch.onnx.errors.UnsupportedOperatorError as e:
        raise ExporterCannot(f"the legacy exporter cannot export this model: {e}") from e


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    """Initializers (not graph inputs) and Constant outputs, followed through Identity and Transpose.

    torch's legacy exporter writes deduplicated weights as ``Identity``; the dynamo exporter
    writes a tied ``lm_head`` weight (shared with the embedding ``Gather``) as ``Transpose(W)``.
    """
    inputs = {i.name for i in graph.input}
    names = {i.name for i in graph.initializer if i.name not in inputs}
    for node in graph.node:  # topological order: a node's constant inputs are known before it
        through = node.op_type in ("Identity", "Transpose") and node.input[0] in names
        if node.op_type == "Constant" or through:
            names.update(node.output)
    return names


def count_linear_ops(model: onnx.ModelProto) -> int:
    """Gemm nodes plus MatMul nodes with a constant operand, in the main graph.

    The attention products (``q @ k.T``, ``p @ v``) have no constant operand and do not count.
    """
    constant = _constant_names(model.graph)
    return sum(
        node.op_type == "Gemm"
        or (node.op_type == "MatMul" and any(i in constant for i in node.input))
        for node in model.graph.node
    )
