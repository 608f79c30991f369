"""Tiny random Hugging Face models for tests, and a calibration-free W4A4 quantization of them.

    model = tiny_model("qwen2")            # fp32, 2 layers, hidden 64, with planted outlier channels
    random_quantize(model, seed=0)         # every decoder linear -> W4A4FlatQuantLinear

Sizes: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocab 256.
``llama`` and ``qwen3`` tie their embeddings, ``qwen2`` does not (so both export paths run);
``qwen2`` has q/k/v biases, ``qwen3`` q_norm/k_norm.
"""
from __future__ import annotations

import torch
from torch import nn

from flatquant_lab.kronecker import decompose_dim
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.models import GROUPS, decoder_layers, set_submodule
from flatquant_lab.transforms import orthogonal_factor

MODEL_TYPES = ("llama", "qwen2", "qwen3")
TIED = {"llama": True, "qwen2": False, "qwen3": True}
# Input channels of every RMSNorm (and of the embedding) scaled up: the hidden-state outliers that
# make per-token int4 activation quantization hard without a transform.
OUTLIER_CHANNELS = (3, 17, 42)
OUTLIER_SCALES = (20.0, 35.0, 50.0)


def tiny_config(model_type: str, **overrides):
    """The Hugging Face config of :func:`tiny_model`; ``overrides`` replace its sizes (e.g. ``head_dim=32``)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if model_type not in classes:
        raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
    sizes = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
        tie_word_embeddings=TIED[model_type], initializer_range=0.05, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return classes[model_type](**{**sizes, **overrides})


def tiny_model(model_type: str, seed: int = 0, outliers: bool = True, **overrides) -> nn.Module:
    """A tiny random fp32 causal LM in eval mode; same ``seed``, same weights; ``overrides``: config sizes
    (:func:`tiny_config`).

    Norm weights are randomised around 1 (not all ones) and, with ``outliers``, a few channels of
    every RMSNorm weight and of the embedding are scaled by 20-50x. The global RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            if outliers:
                emb = model.get_input_embeddings().weight
                hidden = model.config.hidden_size
                for ch, s in zip(OUTLIER_CHANNELS, OUTLIER_SCALES):
                    emb[:, ch] *= s / 4  # the residual stream carries them into every layer
                    for layer in decoder_layers(model):
                        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                            if norm.weight.shape[0] == hidden:
                                norm.weight[ch] *= s
    return model.eval()


def group_factors(in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random orthogonal Kronecker factors (float64) for inputs of size ``in_features``."""
    n1, n2 = decompose_dim(in_features)
    return orthogonal_factor(n1, "random", seed=seed), orthogonal_factor(n2, "random", seed=seed + 1)


def random_quantize(model: nn.Module, seed: int = 0, clip_ratio: float = 0.9, groups=None,
                    act_dtype: torch.dtype | None = None, backend: str | None = None) -> nn.Module:
    """Replace decoder linears by ``W4A4FlatQuantLinear.from_float`` with random orthogonal factors.

    One pair of factors per transform group and layer (``models.GROUPS``: q/k/v share, gate/up
    share), so fused shards carry identical transforms, as vllm-ascend needs. ``groups`` limits it
    to some groups (e.g. ``("attn", "mlp")``, msModelSlim's recipe); default all. In place; returns
    ``model``.
    """
    names = tuple(GROUPS) if groups is None else tuple(groups)
    unknown = [g for g in names if g not in GROUPS]
    if unknown:
        raise ValueError(f"groups: unknown {unknown}, expected some of {list(GROUPS)}")
    for i, layer in enumerate(decoder_layers(model)):
        for g_index, group in enumerate(GROUPS):
            if group not in names:
                continue
            linears = [layer.get_submodule(n) for n in GROUPS[group]]
            left, right = group_factors(linears[0].in_features, seed * 10007 + i * 101 + g_index * 11)
            for name, lin in zip(GROUPS[group], linears):
                q = W4A4FlatQuantLinear.from_float(lin, left, right, clip_ratio=clip_ratio,
                                                   act_dtype=act_dtype, backend=backend)
                set_submodule(layer, name, q)
    return model


class Interrupt(Exception):
    """Raised by :func:`stop_after_layer_0`: a calibration cut short, for the resumption tests."""


def stop_after_layer_0(i: int) -> None:
    """``after_layer`` hook that interrupts a calibration once layer 0 is done (and saved to its work dir)."""
    if i == 0:
        raise Interrupt
