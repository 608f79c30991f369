"""``flatquant-lab quantize``: quantize a Hugging Face model and export it for vllm-ascend."""
from __future__ import annotations

import argparse
import json

import torch

from ..api import quantize
from ..recipe import FALLBACKS, PROFILES, RECIPES, QuantConfig
from .args import device_arg


def _recipe(text: str):
    """``--recipe``: a preset name, or a JSON object mapping fnmatch patterns to schemes."""
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object of pattern -> scheme ({e})") from None
        if not isinstance(mapping, dict):
            raise argparse.ArgumentTypeError("expected a JSON object of pattern -> scheme")
        return mapping
    if text not in RECIPES:
        raise argparse.ArgumentTypeError(f"expected a preset ({', '.join(RECIPES)}) or a JSON object "
                                         f"of pattern -> scheme, got {text!r}")
    return text


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
    p.add_argument("--e2e-epochs", type=int, help="epochs of the end-to-end stage after the layer-wise one "
                   "(0: none; profile default: fast/full 4, paper 0)")
    p.add_argument("--calib-data", default=None, help="jsonl/text file for calibration (bundled wiki_calib by default)")
    p.add_argument("--work-dir", default=None, help="keep per-layer results here; rerun to resume")
    p.add_argument("--skip", nargs="*", default=(), help="fnmatch patterns of linears to keep in float")
    p.add_argument("--recipe", type=_recipe, default="w4a4",
                   help="per-module schemes: w4a4 (FlatQuant everywhere), msmodelslim (FlatQuant on q/k/v and "
                        "gate/up, W8A8_DYNAMIC on o_proj and down_proj), or a JSON object pattern -> scheme "
                        "(w4a4_flatquant, w8a8_dynamic, float), first match wins")
    p.add_argument("--fallback", default="w8a8_dynamic", choices=FALLBACKS,
                   help="scheme of a linear whose size npu_kronecker_quant cannot run")
    p.add_argument("--tp-size", type=int, default=1,
                   help="vLLM tensor-parallel size to serve at: row-parallel FlatQuant transforms are sized for it "
                        "and the export is checked to load there")
    p.add_argument("--num-layers", type=int, default=None, help="truncate the model to its first N layers")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="dtype the model is loaded in (no float32 copy), calibrated from and exported in "
                        "(default: float32; a half dtype is also the activation dtype)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="where each decoder layer is calibrated: cpu, cuda, cuda:N, npu, npu:N (default: cpu, where "
                        "the model is loaded; the model stays there and one layer at a time moves)")
    p.add_argument("--activations", default="auto", choices=("auto", "device", "host"),
                   help="where the layer inputs and targets are held (auto: the device if they fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    from ..data import bundled_data_path, calibration_ids
    from ..hub import load_model
    from ..io import save_quantized

    cfg = QuantConfig(method=args.method, weight_quantizer=args.weight_quantizer, profile=args.profile,
                      samples=args.samples, seqlen=args.seqlen, epochs=args.epochs, lr=args.lr,
                      e2e_epochs=args.e2e_epochs, work_dir=args.work_dir, skip=tuple(args.skip), seed=args.seed, recipe=args.recipe,
                      fallback=args.fallback, tp_size=args.tp_size, device=args.device,
                      activations=args.activations,
                      **({"act_dtype": torch.float16} if args.dtype == "float16" else {}))
    if cfg.method != "flatquant":  # flags that would change nothing are an error, not a silent no-op
        flags = {"--epochs": args.epochs, "--lr": args.lr, "--e2e-epochs": args.e2e_epochs}
        if cfg.weight_quantizer != "gptq":
            flags.update({"--samples": args.samples, "--seqlen": args.seqlen, "--calib-data": args.calib_data})
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise SystemExit(f"flatquant-lab quantize: error: {', '.join(given)}: not used by --method {cfg.method} "
                             f"with --weight-quantizer {cfg.weight_quantizer}")
    model, tok = load_model(args.model, dtype=args.dtype or torch.float32, num_layers=args.num_layers)
    ids = None
    if cfg.method == "flatquant" or cfg.weight_quantizer == "gptq":
        source = args.calib_data or bundled_data_path("calib")
        ids = calibration_ids(source, tok, cfg.budget("samples"), cfg.budget("seqlen"), seed=cfg.seed)
    quantize(model, cfg, ids)
    save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite, tp_size=cfg.tp_size)
    print(json.dumps({"out": args.out, "seconds": round(model.flatquant_report["seconds"], 1),
                      "kept_float": model.flatquant_report["skipped"],
                      "fallbacks": model.flatquant_report["fallbacks"],
                      "e2e_kl": (model.flatquant_report["e2e"] or {}).get("kl")}, indent=1))
    return 0
