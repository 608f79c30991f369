"""Write a checkpoint the way msModelSlim lays one out (docs/checkpoint-format.md), without our saver.

    path = write_msmodelslim(tmp_path / "ckpt", float_model, layout="v1", shards=2)

Per decoder layer, by default: q/k/v and gate/up ``W4A4_FLATQUANT_DYNAMIC`` (one shared transform and
clip ratio per fused module), o_proj and down_proj ``W8A8_DYNAMIC`` (float32 scales, as msModelSlim
writes them; float32 bias), and the last layer's MLP ``FLOAT``. Float tensors are bfloat16 and
``config.json`` says so. ``layout``:

- ``"v1"``: ``quant_model_description.json``, ``quant_model_weights-0000N-of-0000M.safetensors`` and
  ``quant_model_weights.safetensors.index.json`` (``index=False`` leaves the index out);
- ``"legacy"``: ``quant_model_description_w4a4_flatquant_dynamic.json``,
  ``quant_model_weight_w4a4_flatquant_dynamic-000NN-of-000MM.safetensors`` and its
  ``.safetensors.index.json``; with ``weight_packed=True`` the W4A4 weights are stored as ``weight_packed``.

``static_w8a8`` makes that prefix a static ``W8A8`` layer (quant_bias, input_scale, input_offset, deq_scale).
``kv_c8`` adds vllm-ascend's C8 KV cache as msModelSlim writes it (docs/kv-cache.md): per layer
``self_attn.{k,v}_proj.kv_cache_{scale,offset}`` of shape ``[C, 1]`` in bfloat16 (offset 0), each tagged ``"C8"``,
and ``"kv_cache_type"`` / ``"kv_quant_type"`` ``"C8"`` at the top of the description; without it the description
says ``"kv_quant_type": null`` as msModelSlim's W4A4 example does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from flatquant_lab.kronecker import decompose_dim

FLATQUANT = "W4A4_FLATQUANT_DYNAMIC"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
FLOAT = "FLOAT"
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
ROW = ("self_attn.o_proj", "mlp.down_proj")


def _factor(n: int, seed: int) -> torch.Tensor:
    """A well-conditioned, non-orthogonal, non-symmetric factor (a Kronecker factor need not be orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.linspace(0.6, 1.4, n, dtype=torch.float64)


def _int_rtn(w: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(1, keepdim=True) / qmax).float()
    q = torch.round(w / scale.double()).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, scale


def _flatquant(linears: list[nn.Linear], n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """One transform for the fused linears; ``W' = L^{-1} W_o R^{-T}`` per output row, int4 RTN per channel."""
    n1, n2 = decompose_dim(n)
    lt, rt = _factor(n1, seed).to(torch.bfloat16), _factor(n2, seed + 1).to(torch.bfloat16)
    li, ri = torch.linalg.inv(lt.double()), torch.linalg.inv(rt.double()).T
    out = []
    for lin in linears:
        w = lin.weight.detach().double().reshape(-1, n1, n2)
        q, scale = _int_rtn((li @ w @ ri).reshape(lin.weight.shape), 7.0)
        t = {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale),
             "left_trans": lt.clone(), "right_trans": rt.clone(), "clip_ratio": torch.tensor([0.9])}
        if lin.bias is not None:
            t["bias"] = lin.bias.detach().to(torch.bfloat16)
        out.append(t)
    return out


def _w8a8_dynamic(lin: nn.Linear) -> dict[str, torch.Tensor]:
    q, scale = _int_rtn(lin.weight.detach().double(), 127.0)
    t = {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale)}
    if lin.bias is not None:
        t["bias"] = lin.bias.detach().float()  # msModelSlim writes float32
    return t


def _w8a8_static(lin: nn.Linear) -> dict[str, torch.Tensor]:
    q, scale = _int_rtn(lin.weight.detach().double(), 127.0)
    return {"weight": q, "quant_bias": torch.zeros(lin.out_features, dtype=torch.int32),
            "input_scale": torch.tensor([0.05]), "input_offset": torch.tensor([0.0]),
            "deq_scale": (scale.view(-1) * 0.05).float()}


def c8_scales(model: nn.Module, layer: int, proj: str) -> torch.Tensor:
    """A C8 scale ``[C, 1]`` for ``proj`` of decoder layer ``layer``: positive, different on every channel,
    seeded by the layer and projection (msModelSlim's observer would compute ``max |x| / 127`` per channel)."""
    cfg = model.config
    channels = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    g = torch.Generator().manual_seed(1000 + 10 * layer + (proj == "v_proj"))
    return (0.01 + torch.rand(channels, 1, generator=g) / 20).to(torch.bfloat16)


def msmodelslim_tensors(model: nn.Module, static_w8a8: str | None = None, kv_c8: bool = False) -> tuple[dict, dict]:
    """``(tensors, description)`` of ``model`` in msModelSlim's recipe (see the module docstring)."""
    layers = model.model.layers
    tensors, desc = {}, {"model_quant_type": FLATQUANT, "version": "1.0.0", "group_size": 0,
                         "kv_quant_type": "C8" if kv_c8 else None, "fa_quant_type": None}
    if kv_c8:
        desc["kv_cache_type"] = "C8"
        for i in range(len(layers)):
            for proj in ("k_proj", "v_proj"):
                scale = c8_scales(model, i, proj)
                for name, v in (("kv_cache_scale", scale), ("kv_cache_offset", torch.zeros_like(scale))):
                    tensors[f"model.layers.{i}.self_attn.{proj}.{name}"] = v
                    desc[f"model.layers.{i}.self_attn.{proj}.{name}"] = "C8"
    done = set()
    for i, layer in enumerate(layers):
        pre = f"model.layers.{i}"
        last = i == len(layers) - 1
        for fused in FUSED:
            if last and fused[0].startswith("mlp"):
                continue  # FLOAT below
            parts = _flatquant([layer.get_submodule(p) for p in fused], layer.get_submodule(fused[0]).in_features,
                               seed=100 * i + len(fused))
            for path, t in zip(fused, parts):
                for name, v in t.items():
                    tensors[f"{pre}.{path}.{name}"] = v
                    desc[f"{pre}.{path}.{name}"] = FLATQUANT
                done.add(f"{pre}.{path}")
        for path in ROW:
            if last and path.startswith("mlp"):
                continue
            prefix = f"{pre}.{path}"
            kind = "W8A8" if prefix == static_w8a8 else W8A8_DYNAMIC
            t = (_w8a8_static if kind == "W8A8" else _w8a8_dynamic)(layer.get_submodule(path))
            for name, v in t.items():
                tensors[f"{prefix}.{name}"] = v
                desc[f"{prefix}.{name}"] = FLOAT if name == "bias" else kind  # msModelSlim labels bias FLOAT
            done.add(prefix)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, v in model.state_dict().items():
        if key.rpartition(".")[0] in done or (tied and key == "lm_head.weight"):
            continue
        tensors[key] = v.detach().to(torch.bfloat16) if v.is_floating_point() else v
        desc[key] = FLOAT
    if tied:
        desc["lm_head.weight"] = FLOAT  # listed, not stored (docs/checkpoint-format.md, 'Tied embeddings')
    return tensors, desc


def write_msmodelslim(out: Path, model: nn.Module, layout: str = "v1", shards: int = 2, index: bool = True,
                      weight_packed: bool = False, static_w8a8: str | None = None, kv_c8: bool = False) -> Path:
    out = Path(out)
    out.mkdir(parents=True)
    tensors, desc = msmodelslim_tensors(model, static_w8a8, kv_c8)
    if weight_packed:
        for key in [k for k, v in desc.items() if v == FLATQUANT and k.endswith(".weight")]:
            tensors[key[: -len("weight")] + "weight_packed"] = tensors.pop(key)
            desc[key[: -len("weight")] + "weight_packed"] = desc.pop(key)
    if layout == "v1":
        desc_name, stem, width, index_name = "quant_model_description.json", "quant_model_weights", 5, \
            "quant_model_weights.safetensors.index.json"
    elif layout == "legacy":
        desc_name, stem, width = "quant_model_description_w4a4_flatquant_dynamic.json", \
            "quant_model_weight_w4a4_flatquant_dynamic", 5
        index_name = f"{stem}.safetensors.index.json"
    else:
        raise ValueError(f"layout: expected 'v1' or 'legacy', got {layout!r}")
    keys = list(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"{stem}-{s + 1:0{width}d}-of-{shards:0{width}d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    if index:
        (out / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / desc_name).write_text(json.dumps(desc, indent=2))
    cfg = json.loads(model.config.to_json_string())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    cfg["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(cfg))
    return out
