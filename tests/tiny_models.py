"""Tiny random Hugging Face models for tests, a calibration-free W4A4 quantization of them, and the
builders the test files share (one definition each).

    model = tiny_model("qwen2")            # fp32, 2 layers, hidden 64, with planted outlier channels
    random_quantize(model, seed=0)         # every decoder linear -> W4A4FlatQuantLinear
    quantized_copy(model, config())        # a calibrated copy on the small budget of CALIB
    rel(logits(q), logits(model))          # relative logit error on the held-out ids HELD

Sizes: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocab 256.
``llama`` and ``qwen3`` tie their embeddings, ``qwen2`` does not (so both export paths run);
``qwen2`` has q/k/v biases, ``qwen3`` q_norm/k_norm.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from flatquant_lab.api import quantize
from flatquant_lab.kronecker import decompose_dim
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.models import GROUPS, decoder_layers, set_submodule
from flatquant_lab.recipe import QuantConfig
from flatquant_lab.transforms import orthogonal_factor

MODEL_TYPES = ("llama", "qwen2", "qwen3")
TIED = {"llama": True, "qwen2": False, "qwen3": True}
# Input channels of every RMSNorm (and of the embedding) scaled up: the hidden-state outliers that
# make per-token int4 activation quantization hard without a transform.
OUTLIER_CHANNELS = (3, 17, 42)
OUTLIER_SCALES = (20.0, 35.0, 50.0)
# Calibration and held-out token ids: random tokens drawn from different generators.
CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(123))
HELD = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))
# 2 batches of 4 x 32 tokens, 2 epochs; the paper profile (no end-to-end stage) and RTN weights
BUDGET = dict(profile="paper", weight_quantizer="rtn", samples=8, seqlen=32, epochs=2, batch_size=4)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2 match tiny_config's pad/bos/eos


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


def tiny_model_with(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of ``tiny_config(model_type)`` with some config fields changed."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def random_linear(k: int, o: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    """An ``nn.Linear(k, o)`` with N(0, 1/k) weights and N(0, 1) bias from its own generator."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, o, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, k, generator=g) / math.sqrt(k))
        if bias:
            lin.bias.copy_(torch.randn(o, generator=g))
    return lin


def word_tokenizer():
    """A word-level tokenizer over the tiny models' 256 ids: "w4" ... "w255"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), 256)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def write_tiny_model_dir(path, model) -> None:
    """``save_pretrained`` plus :func:`word_tokenizer` (hub.load_model needs one)."""
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)


def save_random_llama(path, tokenizer, **config):
    """A random ``LlamaForCausalLM`` (seed 0) with ``tokenizer``'s vocabulary and tied embeddings, saved with
    the tokenizer as a local Hugging Face model directory ``path``; ``config``: the other LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **config)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def config(**kw) -> QuantConfig:
    """``QuantConfig`` on :data:`BUDGET`, ``kw`` overriding it (no ``epochs`` for a method that does not train)."""
    kw = {**BUDGET, **kw}
    if kw.get("method", "flatquant") != "flatquant":
        kw.pop("epochs")  # only flatquant trains (an epochs override elsewhere warns)
    return QuantConfig(**kw)


def quantized_copy(model, cfg: QuantConfig, ids=CALIB, **kw):
    """``quantize`` of a deep copy of ``model``, on ``ids`` where ``cfg`` needs calibration data."""
    needs_data = cfg.method == "flatquant" or cfg.weight_quantizer == "gptq"
    return quantize(copy.deepcopy(model), cfg, ids if needs_data else None, **kw)


def logits(model, ids=HELD, float32: bool = True) -> torch.Tensor:
    """The model's logits on ``ids``, without autograd; in float32, or as the model gives them (``float32=False``)."""
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return out.float() if float32 else out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def state(model) -> dict[str, torch.Tensor]:
    """Every tensor that defines the model: its state dict (W4A4 buffers included)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    """Same keys, and each tensor the same dtype and bit for bit."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
