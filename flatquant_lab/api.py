"""``quantize(model, config, calib_data)``: the one verb, and the ``flatquant-lab quantize`` command."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import torch
from torch import nn

from .calibration import calibrate
from .config import PROFILES, QuantConfig

log = logging.getLogger(__name__)


def _as_ids(calib_data) -> torch.Tensor | None:
    """Token ids ``[n, seqlen]`` from a tensor or an iterable of such batches."""
    if calib_data is None:
        return None
    if isinstance(calib_data, torch.Tensor):
        batches = [calib_data]
    elif isinstance(calib_data, Iterable):
        batches = list(calib_data)
    else:
        raise ValueError(f"calib_data: expected a LongTensor [n, seqlen] or an iterable of them, got {type(calib_data).__name__}")
    if not batches:
        raise ValueError("calib_data: expected at least one batch of token ids, got none")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"calib_data: expected integer tensors [n, seqlen], got {getattr(b, 'dtype', type(b))} "
                             f"{tuple(getattr(b, 'shape', ()))}")
        if b.shape[1] != batches[0].shape[1]:
            raise ValueError(f"calib_data: all batches need one seqlen, got {batches[0].shape[1]} and {b.shape[1]}")
    return torch.cat(batches).long()


def quantize(model: nn.Module, config: QuantConfig | None = None, calib_data=None, backend: str | None = None,
             after_layer=None) -> nn.Module:
    """Quantize ``model`` in place to W4A4 FlatQuant and return it.

    Every supported decoder linear becomes a ``W4A4FlatQuantLinear``; the calibration report
    (losses, clip ratios, what stayed float and why) is left on ``model.flatquant_report``.
    """
    config = config or QuantConfig()
    ids = _as_ids(calib_data)
    if ids is not None and config.method == "flatquant":
        want = config.budget("samples")
        if ids.shape[0] < want:
            log.warning("calib_data has %d samples; the %r profile asks for %d", ids.shape[0], config.profile, want)
    model.eval()
    report = calibrate(model, config, ids, backend=backend, after_layer=after_layer)
    model.flatquant_report = report.to_dict()
    model.flatquant_config = config
    return model


@torch.no_grad()
def quantize_weights_only(model: nn.Module) -> nn.Module:
    """W4A16 reference: round every decoder linear's weight to per-channel symmetric int4 and back.

    ``W <- rint(W / s) * s`` with ``s = max|W_row| / 7``; activations stay in float. This is the row
    that W4A4 methods are judged against; it is a fake-quant model, not an export format.
    """
    from .models import LINEAR_NAMES, decoder_layers, model_info
    from .quantizers import quantize_weight

    model_info(model)
    for layer in decoder_layers(model):
        for path in LINEAR_NAMES:
            lin = layer.get_submodule(path)
            q, scale = quantize_weight(lin.weight)
            lin.weight.copy_((q.double() * scale.double()).to(lin.weight.dtype))
    return model


# ---------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model alias (smollm2-135m) or a local Hugging Face directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--method", default="flatquant", choices=("flatquant", "hadamard", "rtn"))
    p.add_argument("--weight-quantizer", default="rtn", choices=("rtn", "gptq"))
    p.add_argument("--profile", default="fast", choices=tuple(PROFILES))
    p.add_argument("--samples", type=int, help="calibration sequences (profile default)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration sequence (profile default)")
    p.add_argument("--epochs", type=int, help="training epochs per layer (profile default)")
    p.add_argument("--lr", type=float, help="learning rate of the transforms (profile default)")
    p.add_argument("--calib-data", default=None, help="jsonl/text file for calibration (bundled wiki_calib by default)")
    p.add_argument("--work-dir", default=None, help="keep per-layer results here; rerun to resume")
    p.add_argument("--skip", nargs="*", default=(), help="fnmatch patterns of linears to keep in float")
    p.add_argument("--num-layers", type=int, default=None, help="truncate the model to its first N layers")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="dtype of the float tensors in the export (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    from .data import bundled_data_path, calibration_ids
    from .export import save_quantized
    from .hub import load_model

    cfg = QuantConfig(method=args.method, weight_quantizer=args.weight_quantizer, profile=args.profile,
                      samples=args.samples, seqlen=args.seqlen, epochs=args.epochs, lr=args.lr,
                      work_dir=args.work_dir, skip=tuple(args.skip), seed=args.seed)
    if cfg.method != "flatquant":  # flags that would change nothing are an error, not a silent no-op
        flags = {"--epochs": args.epochs, "--lr": args.lr}
        if cfg.weight_quantizer != "gptq":
            flags.update({"--samples": args.samples, "--seqlen": args.seqlen, "--calib-data": args.calib_data})
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise SystemExit(f"flatquant-lab quantize: error: {', '.join(given)}: not used by --method {cfg.method} "
                             f"with --weight-quantizer {cfg.weight_quantizer}")
    model, tok = load_model(args.model, num_layers=args.num_layers)
    ids = None
    if cfg.method == "flatquant" or cfg.weight_quantizer == "gptq":
        source = args.calib_data or bundled_data_path("calib")
        ids = calibration_ids(source, tok, cfg.budget("samples"), cfg.budget("seqlen"), seed=cfg.seed)
    quantize(model, cfg, ids)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    save_quantized(model, args.out, tokenizer=tok, dtype=dtype, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "seconds": round(model.flatquant_report["seconds"], 1),
                      "kept_float": model.flatquant_report["skipped"]}, indent=1))
    return 0
