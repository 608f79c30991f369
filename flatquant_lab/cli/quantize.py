"""``flatquant-lab quantize``: quantize a Hugging Face model and export it for vllm-ascend."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..api import quantize
from ..calibrate.plan import fallback_notice
from ..recipe import (FALLBACKS, KV_CACHE_CLIPS, KV_CACHE_TYPES, KV_TRANSFORMS, METHODS, MX_DEFAULTS, MX_RECIPES,
                      MX_SCALE_RULES, PRESETS, PROFILES, RECIPES, WEIGHT_QUANTIZERS, QuantConfig)
from .args import DTYPE_CHOICES, UsageError, device_arg, non_negative_int, positive_int


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
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"expected a preset ({', '.join(RECIPES)}), an MXFP4 preset "
                                         f"({', '.join(MX_RECIPES)}) or a JSON object "
                                         f"of pattern -> scheme, got {text!r}")
    return text


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model alias (smollm2-135m) or a local Hugging Face directory")
    p.add_argument("--out", required=True, help="output directory (written atomically; must not exist unless "
                   "--overwrite)")
    p.add_argument("--method", default="flatquant", choices=METHODS,
                   help="flatquant (learned transforms), hadamard or rtn (fixed transforms, the baselines)")
    p.add_argument("--weight-quantizer", default="gptq", choices=WEIGHT_QUANTIZERS,
                   help="how the int4 weights are rounded: gptq (needs calibration text, for every --method) or "
                        "rtn (round to nearest)")
    p.add_argument("--profile", default="fast", choices=tuple(PROFILES),
                   help="calibration budget: " + "; ".join(
                       f"{name} {b['samples']} x {b['seqlen']} tokens, {b['epochs']} epochs" for name, b in
                       PROFILES.items()))
    p.add_argument("--samples", type=positive_int, help="calibration sequences (default: the --profile's)")
    p.add_argument("--seqlen", type=positive_int, help="tokens per calibration sequence (default: the --profile's)")
    p.add_argument("--epochs", type=non_negative_int, help="training epochs per layer (default: the --profile's)")
    p.add_argument("--lr", type=float, help="learning rate of the transforms (default: the --profile's)")
    p.add_argument("--e2e-epochs", type=non_negative_int,
                   help="epochs of the end-to-end stage after the layer-wise one (0: none; default: the --profile's: "
                        + ", ".join(f"{name} {b['e2e_epochs']}" for name, b in PROFILES.items()) + ")")
    p.add_argument("--calib-data", default=None,
                   help="jsonl (a 'text' field per line) or plain text file of calibration text (default: the "
                        "bundled wiki_calib.jsonl)")
    p.add_argument("--work-dir", default=None, help="keep per-layer results here; rerun to resume (default: none)")
    p.add_argument("--skip", nargs="*", default=(), help="fnmatch patterns of linears to keep in float")
    p.add_argument("--recipe", type=_recipe, default="w4a4",
                   help="per-module schemes: w4a4 (FlatQuant everywhere), msmodelslim (FlatQuant on q/k/v and "
                        "gate/up, W8A8_DYNAMIC on o_proj and down_proj), mxfp4 (W4A4_MXFP4_FLATQUANT everywhere, "
                        "Ascend 950), or a JSON object pattern -> scheme (w4a4_flatquant, w8a8_dynamic, float, "
                        "w4a4_mxfp4_flatquant), first match wins")
    p.add_argument("--mx-scale-rule", default=MX_DEFAULTS["mx_scale_rule"], choices=MX_SCALE_RULES,
                   help="W4A4_MXFP4_FLATQUANT linears: the rule of their weights' E8M0 scales (docs/mxfp4.md)")
    p.add_argument("--mx-apply-clip", action="store_true",
                   help="W4A4_MXFP4_FLATQUANT linears: assume the FP4 kernel applies clip_ratio (searched, not "
                        "learned); default: it does not, and clip_ratio is 1")
    p.add_argument("--mx-max-tp", type=positive_int, default=MX_DEFAULTS["mx_max_tp"],
                   help="W4A4_MXFP4_FLATQUANT linears: max_supported_tp, the largest TP size the export serves at "
                        "(row-parallel transforms block-diagonal over that many blocks)")
    p.add_argument("--fallback", default="w8a8_dynamic", choices=FALLBACKS,
                   help="scheme of a linear whose size npu_kronecker_quant cannot run")
    p.add_argument("--accept-fallback", action="store_true",
                   help="quantize a model none of whose linears can be W4A4 FlatQuant (each then takes --fallback); "
                        "without it such a model is refused before anything loads")
    p.add_argument("--tp-size", type=positive_int, default=1,
                   help="vLLM tensor-parallel size to serve at: row-parallel FlatQuant transforms are sized for it "
                        "and the export is checked to load there")
    p.add_argument("--kv-cache", default=None, choices=KV_CACHE_TYPES,
                   help="also quantize the KV cache: C8 (vllm-ascend's static per-channel int8 cache), its scales "
                        "calibrated on the same windows after the linears; or KV4 (FlatQuant's 4-bit research mode, "
                        "trained with the linears; vllm-ascend cannot serve it) (docs/kv-cache.md); default: none")
    p.add_argument("--kv-transforms", default=None, choices=KV_TRANSFORMS,
                   help="with --kv-cache KV4: learn T_k and T_v (kv, the default) or none (the clips alone); with "
                        "--kv-cache C8: v learns T_v with the linears, folded into v_proj/o_proj (it still serves)")
    p.add_argument("--kv-cache-clip", default=None, choices=KV_CACHE_CLIPS,
                   help="with --kv-cache: max (msModelSlim's per-channel max|x|/127; the default) or search (that "
                        "times a clip minimising each layer's attention-output error; docs/kv-cache.md)")
    p.add_argument("--num-layers", type=positive_int, default=None,
                   help="truncate the model to its first N layers (default: all)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype the model is loaded in (no float32 copy of a half model), calibrated from and exported "
                        "in; auto: the one its config.json declares (float32 if none; the bundled smollm2-135m "
                        "GGUF: float32). A float16/bfloat16 model's W4A4 layers compute in its dtype, a float32 "
                        "model's in bfloat16")
    p.add_argument("--device", type=device_arg, default=None,
                   help="where each decoder layer is calibrated: cpu, cuda, cuda:N, npu, npu:N (default: cpu, where "
                        "the model is loaded; the model stays there and one layer at a time moves)")
    p.add_argument("--activations", default="auto", choices=("auto", "device", "host"),
                   help="where the layer inputs and targets are held (auto: the device if they fit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _unused_flags(args) -> None:
    """Flags that would change nothing are an error, not a silent no-op."""
    if args.kv_cache_clip is not None and args.kv_cache is None:
        raise UsageError("--kv-cache-clip: not used without --kv-cache; leave it out or add --kv-cache C8")
    if args.kv_transforms is not None and args.kv_cache is None:
        raise UsageError("--kv-transforms: only used with --kv-cache; leave it out or add --kv-cache KV4 or C8")
    if args.method == "flatquant":
        return
    flags = {"--epochs": args.epochs, "--lr": args.lr, "--e2e-epochs": args.e2e_epochs}
    if args.weight_quantizer != "gptq" and args.kv_cache != "C8":  # C8 reads the windows; KV4 learns only with data
        flags.update({"--samples": args.samples, "--seqlen": args.seqlen, "--calib-data": args.calib_data})
    given = [f for f, v in flags.items() if v is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: not used by --method {args.method} with --weight-quantizer "
                         f"{args.weight_quantizer}; leave {'them' if len(given) > 1 else 'it'} out")


def _check_out(args) -> None:
    """--out (and --calib-data) before anything is loaded."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory; choose another --out")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out: {out} already exists; pass --overwrite to replace it, or choose another --out")
    if args.calib_data is not None and not Path(args.calib_data).is_file():
        raise UsageError(f"--calib-data: {args.calib_data} is not a file (expected .jsonl with a 'text' field per "
                         "line, .json, or plain text)")


def _check_shapes(args, path, cfg: QuantConfig) -> None:
    """What serving would refuse, from the model's config alone (no weights): a --tp-size vLLM cannot split it
    over, and a model none of whose linears can be W4A4 FlatQuant (unless --accept-fallback)."""
    from ..calibrate import flatquant_linears, plan_model, tp_split_problem
    from ..hub import empty_model
    from ..models.tp import model_split_problem

    model = empty_model(path, num_layers=args.num_layers)
    problem = tp_split_problem(model, cfg.schemes.tp_size)
    if problem:
        config = model.config.to_dict()
        fits = [tp for tp in range(1, config["num_attention_heads"] + 1) if not model_split_problem(config, tp)]
        raise UsageError(f"--tp-size: {problem} (given --tp-size {cfg.schemes.tp_size}); sizes that split this model: "
                         f"{', '.join(map(str, fits))}")
    plans = plan_model(model, cfg)
    notice = fallback_notice(plans, cfg)
    if notice and not flatquant_linears(plans) and not args.accept_fallback:
        raise UsageError(f"--model: {notice}. Pass --accept-fallback to quantize it so anyway (or another --fallback)")


def _calibration_ids(args, cfg: QuantConfig, tokenizer):
    """The calibration windows, or a UsageError naming --calib-data / --seqlen when the text is too short."""
    from ..data import bundled_data_path, calibration_ids

    source = args.calib_data or bundled_data_path("calib")
    try:
        return calibration_ids(source, tokenizer, cfg.data.samples, cfg.data.seqlen, seed=cfg.seed)
    except ValueError as exc:
        if not str(exc).startswith("seqlen:"):
            raise
        tokens = str(exc).split(" has ", 1)[-1].split(" tokens", 1)[0]
        raise UsageError(f"--calib-data: {source} has {tokens} tokens, fewer than one calibration window of "
                         f"--seqlen {cfg.data.seqlen}; give more text (at least --samples x --seqlen = "
                         f"{cfg.data.samples * cfg.data.seqlen} tokens for windows that do not overlap) "
                         "or a shorter --seqlen") from exc


def _kv_summary(report) -> dict:
    """The KV-cache calibration in the printed summary: its type, clip and mean attention-output error."""
    if not report:
        return {}
    rows = report["layers"]
    return {"kv_cache": report["cache_type"], "kv_cache_clip": report["clip"],
            "kv_attention_rel_error": sum(r["rel_error"] for r in rows) / len(rows),
            "kv_attention_rel_error_max_scales": sum(r["rel_error_max"] for r in rows) / len(rows)}


def run(args) -> int:
    from ..dtypes import HALF_DTYPES
    from ..hub import load_model, load_tokenizer, model_dtype, resolve
    from ..io import save_quantized

    # Everything save_quantized or serving would refuse is refused here, before any weight is read.
    _unused_flags(args)
    _check_out(args)
    path = resolve(args.model)
    dtype = model_dtype(path, args.dtype)
    cfg = QuantConfig(method=args.method, weight_quantizer=args.weight_quantizer, profile=args.profile,
                      samples=args.samples, seqlen=args.seqlen, epochs=args.epochs, lr=args.lr,
                      e2e_epochs=args.e2e_epochs, work_dir=args.work_dir, skip=tuple(args.skip), seed=args.seed,
                      recipe=args.recipe, fallback=args.fallback, tp_size=args.tp_size, device=args.device,
                      mx_scale_rule=args.mx_scale_rule, mx_apply_clip=args.mx_apply_clip, mx_max_tp=args.mx_max_tp,
                      activations=args.activations, act_dtype=dtype if dtype in HALF_DTYPES else None,
                      release_host_memory=True, kv_cache=args.kv_cache, kv_cache_clip=args.kv_cache_clip,
                      kv_transforms=args.kv_transforms)
    _check_shapes(args, path, cfg)
    tok = load_tokenizer(path)
    ids = None
    after_linears = cfg.schemes.kv_cache == "C8"  # C8's scales are calibrated on the windows after the linears
    if cfg.method == "flatquant" or cfg.weight_quantizer == "gptq" or after_linears:
        ids = _calibration_ids(args, cfg, tok)
    model, _ = load_model(path, dtype=dtype, num_layers=args.num_layers)
    quantize(model, cfg, ids)
    # a KV4 export claims no TP size: vLLM serves none (save_quantized warns so)
    save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite,
                   tp_size=None if cfg.schemes.kv_cache == "KV4" else cfg.schemes.tp_size)
    print(json.dumps({"out": args.out, "seconds": round(model.flatquant_report["seconds"], 1),
                      "dtype": str(dtype).replace("torch.", ""),
                      "kept_float": model.flatquant_report["skipped"],
                      "fallbacks": model.flatquant_report["fallbacks"],
                      "e2e_kl": (model.flatquant_report["e2e"] or {}).get("kl"),
                      "e2e_heldout_kl": (model.flatquant_report["e2e"] or {}).get("heldout_kl"),
                      "e2e_kept_epoch": (model.flatquant_report["e2e"] or {}).get("kept_epoch"),
                      **_kv_summary(model.flatquant_report.get("kv_cache")),
                      **({"kv_cache": cfg.schemes.kv_cache, "kv_transforms": cfg.schemes.kv_learned}
                         if cfg.schemes.kv_learned else {})}, indent=1))
    return 0
