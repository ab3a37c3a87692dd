"""The tiny language models of ``archs.language`` with one PEFT adapter type at a time.

``ADAPTERS`` has one config per PEFT tuner type whose layers merge into an ``nn.Linear``
(``merge_and_unload()`` writes the adapter into the base weight, or bias for BEFT and GLoRA's
bias terms), with DoRA (``LoraConfig(use_dora=True)``) as its own entry. ``build(model,
adapter)`` puts it on the targets of ``language.MODELS[model]`` (``query, value`` for bert;
``q_proj, v_proj, down_proj`` for llama). IA3 on bert also gets ``output.dense`` (the
attention output and feed-forward down projections, both ``feedforward_modules``), so that it
scales inputs there as it does llama's ``down_proj``.

PEFT initialises almost every type to the identity (a zero ``B``, a zero spectrum, an identity
rotation, unit scales), which hides every mistake in merging it. So each type is built with
its non-identity initialisation where it has one (``init_weights=False`` or the like), and
then every adapter parameter (trainable and not a base-model parameter) gets seeded noise,
``NOISE * rms(param) * randn`` (``NOISE * randn`` for a parameter that is all zeros). Where a
non-identity initialisation is ``randn`` (hundreds of times the base weights, std 0.02), the
values are scaled down first (``_SCALE``); OSF starts from the SVD of the base weight with
more noise; scalings sized for large models (RandLoRA's ``randlora_alpha=640``, FourierFT's
150, WaveFT's 25) are lowered. Each merged update is then about 0.1 to 4 times the base weight
in Frobenius norm (BEFT changes biases only), and hidden states and logits stay below 5. The base model's biases and norm
weights are randomised as in ``language.build``.

Ranks and block sizes divide the models' widths (64 for llama's grouped ``v_proj``, 128, 256).
Types PEFT cannot merge into a Linear are in ``UNMERGEABLE`` with the reason, (model,
adapter) pairs that build but cannot merge in ``UNMERGEABLE_ON``; ``REQUIRES`` names the
module a type needs beyond peft (tests ``pytest.importorskip`` it). ``EXPORTER_CANNOT`` is
what the exporters did with the adapter models (not their merges, which both export) with
torch 2.13 and onnxscript 0.7.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from peft import (
    AdaLoraConfig,
    AdamssConfig,
    BeftConfig,
    BOFTConfig,
    C3AConfig,
    DeftConfig,
    DeloraConfig,
    FourierFTConfig,
    FrodConfig,
    GloraConfig,
    GraloraConfig,
    HiraConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MissConfig,
    OFTConfig,
    OSFConfig,
    PeanutConfig,
    PeftConfig,
    PsoftConfig,
    PveraConfig,
    RandLoraConfig,
    RoadConfig,
    ShiraConfig,
    SupertuningConfig,
    TinyLoraConfig,
    UniLoraConfig,
    VBLoRAConfig,
    VeraConfig,
    WaveFTConfig,
    get_peft_model,
)

from archs import language

__all__ = [
    "ADAPTERS",
    "EXPORTER_CANNOT",
    "NOISE",
    "REQUIRES",
    "UNMERGEABLE",
    "UNMERGEABLE_ON",
    "adapter_parameters",
    "build",
    "merged",
    "targets",
]

NOISE = 0.05

#: Feed-forward "down" projections: IA3 scales their input (``feedforward_modules``), not their output.
_FEEDFORWARD = ("down_proj", "output.dense")

Factory = Callable[[tuple[str, ...]], PeftConfig]


def _lora(targets: tuple[str, ...], **kwargs: object) -> LoraConfig:
    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=list(targets),
        **kwargs,
    )


def _ia3(targets: tuple[str, ...]) -> IA3Config:
    return IA3Config(
        target_modules=list(targets),
        feedforward_modules=[t for t in targets if t in _FEEDFORWARD],
        init_ia3_weights=False,  # randn scales instead of ones
    )


ADAPTERS: dict[str, Factory] = {
    "lora": _lora,
    "dora": lambda t: _lora(t, use_dora=True),
    "adalora": lambda t: AdaLoraConfig(
        init_r=8,
        target_r=4,
        lora_alpha=16,
        lora_dropout=0.0,
        total_step=10,
        tinit=2,
        tfinal=2,
        init_lora_weights=False,
        target_modules=list(t),
    ),
    "loha": lambda t: LoHaConfig(r=8, alpha=64, init_weights=False, target_modules=list(t)),
    "lokr": lambda t: LoKrConfig(r=8, alpha=16, init_weights=False, target_modules=list(t)),
    "ia3": _ia3,
    "oft": lambda t: OFTConfig(r=0, oft_block_size=16, init_weights=False, target_modules=list(t)),
    # without its CUDA extension PEFT forces boft_n_butterfly_factor=1 (one block-diagonal factor)
    "boft": lambda t: BOFTConfig(
        boft_block_size=8, boft_n_butterfly_factor=1, init_weights=False, target_modules=list(t)
    ),
    "vera": lambda t: VeraConfig(r=8, init_weights=False, target_modules=list(t)),
    "fourierft": lambda t: FourierFTConfig(
        n_frequency=64, scaling=10.0, init_weights=False, target_modules=list(t)
    ),
    "hra": lambda t: HRAConfig(r=8, init_weights=False, target_modules=list(t)),
    "vblora": lambda t: VBLoRAConfig(
        r=4,
        num_vectors=64,
        vector_length=32,
        topk=2,
        init_vector_bank_bound=0.2,
        target_modules=list(t),
    ),
    "randlora": lambda t: RandLoraConfig(
        r=8, randlora_alpha=2, init_weights=False, target_modules=list(t)
    ),
    "shira": lambda t: ShiraConfig(r=8, init_weights=False, target_modules=list(t)),
    "c3a": lambda t: C3AConfig(block_size=32, init_weights="gaussian", target_modules=list(t)),
    "road": lambda t: RoadConfig(
        variant="road_2", group_size=16, init_weights=False, target_modules=list(t)
    ),
    "miss": lambda t: MissConfig(r=16, init_weights=False, target_modules=list(t)),
    "waveft": lambda t: WaveFTConfig(
        n_frequency=64, scaling=5.0, init_weights=False, target_modules=list(t)
    ),
    "delora": lambda t: DeloraConfig(r=8, init_weights=False, target_modules=list(t)),
    "gralora": lambda t: GraloraConfig(
        r=8, gralora_k=2, alpha=16, init_weights=False, target_modules=list(t)
    ),
    "hira": lambda t: HiraConfig(r=8, init_weights=False, target_modules=list(t)),
    "glora": lambda t: GloraConfig(r=4, init_weights=False, target_modules=list(t)),
    "adamss": lambda t: AdamssConfig(
        r=16, num_subspaces=4, subspace_rank=2, target_modules=list(t)
    ),
    "beft": lambda t: BeftConfig(init_weights=False, target_modules=list(t)),
    "deft": lambda t: DeftConfig(r=8, init_scale=5.0, init_weights=False, target_modules=list(t)),
    "frod": lambda t: FrodConfig(
        sparse_rate=0.05, init_weights=False, progressbar=False, target_modules=list(t)
    ),
    "osf": lambda t: OSFConfig(effective_rank=8, target_modules=list(t)),
    "peanut": lambda t: PeanutConfig(r=8, depth=1, init_weights=False, target_modules=list(t)),
    "psoft": lambda t: PsoftConfig(r=8, psoft_alpha=8, init_weights=False, target_modules=list(t)),
    "pvera": lambda t: PveraConfig(r=8, init_weights=False, target_modules=list(t)),
    "supertuning": lambda t: SupertuningConfig(
        sparsity=0.9, r=4, init_weights=False, target_modules=list(t)
    ),
    "tinylora": lambda t: TinyLoraConfig(
        r=2, u=16, init_weights="uniform", init_v_bound=0.5, target_modules=list(t)
    ),
    "unilora": lambda t: UniLoraConfig(
        r=4, theta_d_length=256, init_weights=False, target_modules=list(t)
    ),
}

#: PEFT types left out of ``ADAPTERS``, and why.
UNMERGEABLE: dict[str, str] = {
    "lily": "Lily's merge raises NotImplementedError (its B experts are routed by the input)",
    "poly": "Poly has no merge (a per-task mixture of LoRA skills, chosen by task ids)",
    "xlora": "X-LoRA has no merge (a classifier mixes LoRA experts per token)",
    "shadow": "ShadowPEFT's merge raises NotImplementedError (an input-dependent side network)",
    "ln_tuning": "merges into LayerNorm / RMSNorm modules, no nn.Linear",
    "trainable_tokens": "merges rows into the embedding, no nn.Linear",
    "adaption_prompt": "prompt learning: learned prefixes in attention, nothing to merge",
    "prompt_tuning": "prompt learning: virtual tokens, nothing to merge",
    "multitask_prompt_tuning": "prompt learning: virtual tokens, nothing to merge",
    "p_tuning": "prompt learning: virtual tokens from a prompt encoder, nothing to merge",
    "prefix_tuning": "prompt learning: past key/values, nothing to merge",
    "cpt": "prompt learning: context-aware virtual tokens, nothing to merge",
    "cartridge": "prompt learning: a trained KV-cache prefix, nothing to merge",
}

#: (adapter, exporter) -> the failure, the same on bert and llama (torch 2.13, onnxscript 0.7).
EXPORTER_CANNOT: dict[tuple[str, str], str] = {
    ("boft", "dynamo"): "no ONNX function for aten._linalg_solve_ex (Cayley transform)",
    ("boft", "legacy"): "aten::linalg_solve not supported (Cayley transform)",
    ("psoft", "dynamo"): "no ONNX function for aten._linalg_solve_ex (Cayley transform)",
    ("psoft", "legacy"): "aten::linalg_solve not supported (Cayley transform)",
    ("c3a", "dynamo"): "no ONNX function for aten.einsum on complex inputs (FFT)",
    ("c3a", "legacy"): "Couldn't export operator aten::size (complex FFT)",
    ("fourierft", "legacy"): "aten::fft_ifft2 not supported",
    ("lokr", "legacy"): "aten::kron not supported",
    ("shira", "dynamo"): "torch.export: a fake tensor in the constants (torch.sparse_coo_tensor)",
    ("shira", "legacy"): "aten::sparse_coo_tensor not supported",
    ("frod", "dynamo"): "torch.export: data-dependent shape (sparse_coo_tensor().coalesce())",
    ("frod", "legacy"): "aten::sparse_coo_tensor not supported",
    ("hra", "dynamo"): "serialising: a FakeTensor initializer (lifted torch.eye of the forward)",
}

#: (model, adapter) pairs of ``ADAPTERS`` that ``build`` makes but ``merge_and_unload()`` cannot merge.
UNMERGEABLE_ON: dict[tuple[str, str], str] = {
    ("llama", "beft"): "BEFT adapts biases and llama's Linear layers have none: "
    "merge raises 'Base layer has no bias, cannot merge bias adapter default'",
}

REQUIRES: dict[str, str] = {"adamss": "sklearn"}

#: Factors for the random values of ``init_weights=False`` where they are far larger than the
#: base weights (std 0.02): parameter-name fragment -> factor, applied before the noise.
_SCALE: dict[str, dict[str, float]] = {
    "adalora": {"lora_A": 0.05, "lora_B": 0.05},  # randn A, E, B
    "shira": {"shira_weight": 0.05},  # randn sparse entries
    "supertuning": {"supertuning_values": 0.03, "supertuning_lora_B": 0.1},
    "vera": {"vera_lambda_b": 0.15},
    "pvera": {"pvera_lambda_b": 0.1},
    "unilora": {"unilora_theta_d": 0.4},  # randn shared vector, read twice (A and B)
}

#: Relative noise where ``NOISE`` is not enough: OSF starts from the SVD of the base weight
#: (its ``init_weights=False`` is randn factors, hundreds of times the base weight).
_NOISE: dict[str, float] = {"osf": 0.2}

#: Targets added to ``language.MODELS[model].targets`` for one adapter type.
_EXTRA_TARGETS: dict[tuple[str, str], tuple[str, ...]] = {
    # bert's feed-forward down projection, so IA3 scales an input there too
    ("bert", "ia3"): ("output.dense",),
}


def targets(model: str, adapter: str) -> tuple[str, ...]:
    """The module names ``adapter`` is put on in ``model``."""
    return language.MODELS[model].targets + _EXTRA_TARGETS.get((model, adapter), ())


def adapter_parameters(
    model: torch.nn.Module, base: set[int] | None = None
) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters of ``model`` that are not base-model parameters (ids in ``base``)."""
    base = base or set()
    return {
        name: param
        for name, param in model.named_parameters()
        if param.requires_grad and id(param) not in base
    }


def build(model: str, adapter: str, seed: int = 0) -> torch.nn.Module:
    """``language.MODELS[model]`` with ``adapter`` on its targets, seeded, non-identity, in eval mode."""
    spec = language.MODELS[model]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = spec.make()
        language._perturb(base)  # biases and norm weights (base names have no lora_B)
        base_ids = {id(p) for p in base.parameters()}
        config = ADAPTERS[adapter](targets(model, adapter))
        with warnings.catch_warnings():  # peft calls a transformers method deprecated for v6
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(base, config)
        scale, noise = _SCALE.get(adapter, {}), _NOISE.get(adapter, NOISE)
        with torch.no_grad():
            for name, param in adapter_parameters(peft_model, base_ids).items():
                for fragment, factor in scale.items():
                    if fragment in name:
                        param.mul_(factor)
                rms = param.float().pow(2).mean().sqrt().item()
                param.add_(noise * (rms or 1.0) * torch.randn_like(param))
    return peft_model.eval()


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """``merge_and_unload()`` of a copy of ``model`` (the adapter model itself is left as it was)."""
    return copy.deepcopy(model).merge_and_unload().eval()
