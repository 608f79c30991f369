"""The main job: full precision vs W4A16 RTN vs W4A4 RTN / Hadamard / FlatQuant on the bundled model.

Each method starts from a fresh copy of the model, is evaluated through lm-eval on the bundled
evaluation articles (word perplexity; token perplexity from the same log-likelihoods), and lands in
one table, ``demo.json`` and ``demo.png`` in the output folder. The three FlatQuant rows (the default
recipe, msModelSlim's mixed recipe, and TP-N-aware transforms) are exported to ``export-<method>``
there (what vllm-ascend loads), and each export goes through ``serve_check`` (docs/tensor-parallel.md): the
table says at which tensor-parallel sizes vLLM would load it. The msModelSlim row plus a C8 KV cache
(docs/kv-cache.md) reuses that row's quantized model when both run: its cache scales are calibrated on the same
windows, it is evaluated with every forward reading K and V through the int8 cache, and exported with them.

The MXFP4 rows (``MX_METHODS``, W4A4_MXFP4_FLATQUANT for Ascend 950; run only when named in ``methods``): MXFP4
without transforms (identity, round to nearest), with fixed Hadamard transforms, and FlatQuant with MXFP4
quantizers (GPTQ weights); each is exported and serve-checked like the FlatQuant rows.

The KV4 rows (``KV4_METHODS``, FlatQuant's W4A4KV4 research mode, docs/kv-cache.md; run only when named): W4A4
FlatQuant with a 4-bit KV cache whose ``T_k``, ``T_v`` and clips are trained with the linears, and the same without
the KV transforms (clips only); evaluated with every forward reading the 4-bit cache, exported (vllm-ascend serves
neither: serve-check says so).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from .api import quantize, quantize_weights_only
from .files import atomic_write_bytes, save_figure
from .recipe import QuantConfig

log = logging.getLogger(__name__)

METHODS = ("fp", "rtn_w4a16", "rtn", "hadamard", "flatquant", "flatquant_msmodelslim", "flatquant_msmodelslim_c8",
           "flatquant_tp")
LABELS = {"fp": "full precision (dequantized GGUF)", "rtn_w4a16": "W4A16 RTN (weights only)",
          "rtn": "W4A4 RTN", "hadamard": "W4A4 Hadamard", "flatquant": "W4A4 FlatQuant (GPTQ)",
          "flatquant_msmodelslim": "W4A4 FlatQuant + W8A8 o/down (msModelSlim recipe)",
          "flatquant_msmodelslim_c8": "W4A4 FlatQuant msModelSlim recipe + C8 KV cache",
          "flatquant_tp": "W4A4 FlatQuant, TP-{tp}-aware"}
FLATQUANT_ROWS = ("flatquant", "flatquant_msmodelslim", "flatquant_tp")
C8_ROW = "flatquant_msmodelslim_c8"  # the msModelSlim row's model with a calibrated C8 KV cache
# W4A4_MXFP4_FLATQUANT rows: not in any profile's default (their MX reference ops are slow on a CPU)
MX_METHODS = ("mxfp4_rtn", "mxfp4_hadamard", "flatquant_mxfp4")
# W4A4KV4 rows (a research mode vllm-ascend cannot serve): opt-in like the MXFP4 ones
KV4_METHODS = ("flatquant_kv4", "flatquant_kv4_notrans")
ALL_METHODS = METHODS + KV4_METHODS + MX_METHODS
LABELS.update({"mxfp4_rtn": "MXFP4 RTN (no transform)", "mxfp4_hadamard": "MXFP4 Hadamard",
               "flatquant_mxfp4": "MXFP4 FlatQuant (GPTQ)",
               "flatquant_kv4": "W4A4KV4 FlatQuant (T_k, T_v, learned KV clips)",
               "flatquant_kv4_notrans": "W4A4KV4 FlatQuant without KV transforms"})
EXPORTED_ROWS = FLATQUANT_ROWS + KV4_METHODS + MX_METHODS  # exported to export-<method> and serve-checked
# What each profile runs by default: the serving rows (msModelSlim recipe, TP-aware) show where an
# export loads and at what cost; the full profile would triple its 18-minute calibration with them.
DEFAULT_METHODS = {"fast": METHODS, "full": ("fp", "rtn_w4a16", "rtn", "hadamard", "flatquant")}
# The TP sizes serve_check tries on every export (plus the TP-aware row's own size).
SERVE_TP_SIZES = (1, 2, 4)
TASK = "wiki_fq_eval"
# The QuantConfig profiles the demo offers for FlatQuant (its weights GPTQ'd); "paper" would take
# about a day on a 2-core CPU (bench/bench_calibration.py).
DEMO_PROFILES = ("fast", "full")


def decoder_linear_params(model) -> int:
    from .models import adapter_for

    adapter = adapter_for(model)
    return sum(layer.get_submodule(p).weight.numel() for layer in adapter.decoder_layers(model)
               for p in adapter.linear_names)


def demo_tp_size(model) -> int:
    """The smallest TP size above 1 at which vLLM can split the model (2 for most models; 3 for
    SmolLM2-135M's 9 heads and 3 kv heads), by serve-check's own rule."""
    from .models.tp import model_split_problem

    config = model.config.to_dict()
    return next((tp for tp in range(2, config["num_attention_heads"] + 1)
                 if not model_split_problem(config, tp)), 1)


def demo_mx_max_tp(model) -> int:
    """The MXFP4 rows' ``mx_max_tp``: the largest TP size up to vllm-ascend's default ``max_supported_tp`` (4) at
    which vLLM can split the model and the plan keeps every decoder linear MXFP4 (each row-parallel rank holding
    whole groups of 32): 3 for SmolLM2-135M (9 heads; o_proj's 576 inputs are 4 x 144)."""
    from .calibrate import plan_model
    from .models.tp import model_split_problem

    config = model.config.to_dict()
    for tp in range(4, 1, -1):
        if model_split_problem(config, tp):
            continue
        plans = plan_model(model, QuantConfig(recipe="mxfp4", mx_max_tp=tp))
        if not any(g.fallback for groups in plans for g in groups):
            return tp
    return 1


def flatquant_config(method: str, profile: str, seed: int, samples=None, epochs=None, seqlen=None,
                     tp_size: int = 1, mx_max_tp: int = 4) -> QuantConfig:
    """The demo's FlatQuant config (GPTQ weights) for one of FLATQUANT_ROWS, KV4_METHODS or ``flatquant_mxfp4``."""
    extra = {"flatquant": {}, "flatquant_msmodelslim": {"recipe": "msmodelslim"},
             "flatquant_tp": {"tp_size": tp_size},
             "flatquant_mxfp4": {"recipe": "mxfp4", "mx_max_tp": mx_max_tp},
             "flatquant_kv4": {"kv_cache": "KV4"},
             "flatquant_kv4_notrans": {"kv_cache": "KV4", "kv_transforms": "none"}}[method]
    return QuantConfig(method="flatquant", weight_quantizer="gptq", profile=profile, seed=seed,
                       samples=samples, epochs=epochs, seqlen=seqlen, **extra)


def kv_cache_bytes(model, cache_type: str | None = None) -> dict:
    """KV-cache bytes per token (all layers, K and V) as vLLM holds them: bf16 (2 bytes), or int8 with C8; C8's
    scales and offsets are per model (four ``[C]`` vectors per layer, in bf16 as served), not per token. KV4: two
    4-bit codes a byte, and an fp16 scale and zero per token and head (its kernel's layout)."""
    from .models import decoder_layers, kv_sizes

    heads, head_dim = kv_sizes(model)
    values = 2 * len(decoder_layers(model)) * heads * head_dim  # K and V values per token
    per_token = values * (1 if cache_type == "C8" else 2)
    if cache_type == "KV4":
        per_token = values // 2 + 2 * len(decoder_layers(model)) * heads * 4
    return {"kv_bytes_per_token": per_token, "kv_vs_bf16": per_token / (2 * values),
            "kv_scale_bytes": 2 * values * 2 if cache_type == "C8" else 0}


def serving_sizes(export_dir, tp_sizes) -> tuple[list[int], list[str]]:
    """The TP sizes at which vLLM would load ``export_dir`` (and compute what we load), with serve_check's lines."""
    from .io.serving import serve_check

    checks = serve_check(export_dir, tp_sizes=sorted(set(tp_sizes)), tokens=4)
    return [c.tp_size for c in checks if c.loads and (c.worst_rel_diff or 0.0) == 0.0], [c.line() for c in checks]


def evaluate_model(model, tokenizer, limit=None, batch_size=1, max_length=512, docs=None) -> dict:
    """lm-eval perplexity on the bundled eval task (the first ``limit`` documents, or the documents ``docs``);
    token perplexity from the same log-likelihoods."""
    from .eval import evaluate

    select = {"limit": limit} if docs is None else {"samples": {TASK: list(docs)}}
    t0 = time.perf_counter()
    res = evaluate(model, tokenizer, tasks=[TASK], batch_size=batch_size, max_length=max_length,
                   log_samples=True, **select)
    seconds = time.perf_counter() - t0
    metrics = res["results"][TASK]
    total_ll, total_tokens = 0.0, 0
    for sample in res["samples"][TASK]:
        ll = sample["filtered_resps"][0]
        ll = ll[0] if isinstance(ll, (list, tuple)) else ll
        total_ll += float(ll)
        # loglikelihood_rolling predicts every token of the document's encoding
        total_tokens += len(tokenizer(sample["doc"]["text"], add_special_tokens=False).input_ids)
    return {
        "word_perplexity": float(metrics["word_perplexity,none"]),
        "byte_perplexity": float(metrics["byte_perplexity,none"]),
        "bits_per_byte": float(metrics["bits_per_byte,none"]),
        "token_perplexity": math.exp(-total_ll / total_tokens),
        "eval_tokens": total_tokens,
        "eval_documents": len(res["samples"][TASK]),
        "eval_seconds": seconds,
    }


def run_demo(model_name: str = "smollm2-135m", profile: str = "fast", out_dir: str = "results",
             methods=None, limit=None, num_layers=None, batch_size: int = 1, seed: int = 0,
             samples=None, epochs=None, seqlen=None, device=None, docs=None) -> dict:
    """Run every method in ``methods``; write ``demo.json`` and ``demo.png`` to ``out_dir``; return the summary.

    Evaluation covers every document of the task, the first ``limit``, or the documents ``docs`` (indices).
    """
    from .data import bundled_data_path, calibration_ids
    from .api import quantize_kv_cache
    from .hub import load_model
    from .io import save_quantized
    from .models import linear_weight_bytes, use_kv_cache_attention

    from .extras import require

    if profile not in DEMO_PROFILES:
        raise ValueError(f"profile: expected one of {DEMO_PROFILES}, got {profile!r}")
    for module in ("lm_eval", "matplotlib"):  # before an hour of calibration, not after it
        require(module, "eval", "the demo")
    methods = DEFAULT_METHODS[profile] if methods is None else tuple(methods)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad}; expected some of {ALL_METHODS}")
    if docs is not None:
        if limit is not None:
            raise ValueError(f"docs: expected None when limit is given (limit={limit!r}, docs={docs!r}); pick one")
        docs = list(docs)
        n_docs = sum(1 for line in bundled_data_path("eval").read_text().splitlines() if line.strip())
        if not docs or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_docs for i in docs):
            raise ValueError(f"docs: expected a non-empty list of document indices in [0, {n_docs}) "
                             f"({TASK} has {n_docs} documents), got {docs!r}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    fq_cfg = flatquant_config("flatquant", profile, seed, samples, epochs, seqlen)
    results = {}
    configs = {}
    t_all = time.perf_counter()
    kept = None  # the msModelSlim row's model, kept for the C8 row when it comes later
    for i, method in enumerate(methods):
        # dtype "auto": the model's own; the bundled GGUF model is float32 (its published figures ran on that)
        reuse = method == C8_ROW and kept is not None
        if reuse:
            model, kept = kept, None  # bf16_bytes: the msModelSlim row's, from the same float model
        else:
            model, tok = load_model(model_name, num_layers=num_layers)
            bf16_bytes = 2 * decoder_linear_params(model)
        fq_cfg = fq_cfg.for_model(model)  # act_dtype: the model's if float16/bfloat16, else bfloat16
        calib_s = 0.0
        model_tp = demo_tp_size(model)  # the smallest TP size above 1 this model can be split over
        tp = model_tp if method == "flatquant_tp" else 1
        label = LABELS[method].format(tp=tp)
        log.info("=== %s ===", label)
        serving = None
        learned = FLATQUANT_ROWS + KV4_METHODS + ("flatquant_mxfp4",)
        if method == C8_ROW:
            # msModelSlim's recipe (reused from its row, else quantized here), then the C8 scales on the same windows
            cfg = flatquant_config("flatquant_msmodelslim", profile, seed, samples, epochs, seqlen).for_model(model)
            ids = calibration_ids(bundled_data_path("calib"), tok, cfg.data.samples, cfg.data.seqlen, seed=seed)
            t0 = time.perf_counter()
            if not reuse:
                quantize(model, cfg, ids, device=device)
            cfg = cfg.replace(kv_cache="C8")
            configs[method] = cfg.to_dict()
            kv_report = quantize_kv_cache(model, ids, cfg)
            use_kv_cache_attention(model)  # evaluated as decode reads the int8 cache
            calib_s = time.perf_counter() - t0
            export = out / f"export-{method.replace('_', '-')}"
            save_quantized(model, export, tokenizer=tok, overwrite=True)
            sizes, lines = serving_sizes(export, SERVE_TP_SIZES + (model_tp,))
            serving = {"serves_at_tp": sizes, "serve_check": lines, "export": str(export),
                       "kv_cache": {"clip": kv_report["clip"], "seconds": kv_report["seconds"],
                                    "reused_msmodelslim_model": reuse,
                                    "attention_rel_error": [r["rel_error"] for r in kv_report["layers"]],
                                    "attention_rel_error_max_scales": [r["rel_error_max"]
                                                                       for r in kv_report["layers"]]}}
            for line in lines:
                log.info("%s export: %s", method, line)
        elif method in ("rtn", "hadamard") + EXPORTED_ROWS:
            # The baselines as defined (fixed transforms, clip 1.0, round-to-nearest weights) need no
            # data; FlatQuant learns on the calibration set and GPTQs its weights.
            mx_baseline = {"mxfp4_rtn": "rtn", "mxfp4_hadamard": "hadamard"}.get(method)
            mx_tp = demo_mx_max_tp(model) if method in MX_METHODS else 4
            cfg = (flatquant_config(method, profile, seed, samples, epochs, seqlen, tp_size=tp, mx_max_tp=mx_tp)
                   if method in learned
                   else QuantConfig(method=mx_baseline, weight_quantizer="rtn", seed=seed, recipe="mxfp4",
                                    mx_max_tp=mx_tp)
                   if mx_baseline else QuantConfig(method=method, weight_quantizer="rtn", seed=seed))
            cfg = cfg.for_model(model)
            configs[method] = cfg.to_dict()
            ids = None
            if method in learned:
                ids = calibration_ids(bundled_data_path("calib"), tok, cfg.data.samples,
                                      cfg.data.seqlen, seed=seed)
            t0 = time.perf_counter()
            quantize(model, cfg, ids, device=device)
            calib_s = time.perf_counter() - t0
            if method in EXPORTED_ROWS:
                export = out / f"export-{method.replace('_', '-')}"
                # a KV4 export claims no TP size: vLLM loads none (saving warns, serve-check says why)
                save_quantized(model, export, tokenizer=tok, overwrite=True,
                               tp_size=None if method in KV4_METHODS else tp)
                sizes, lines = serving_sizes(export, SERVE_TP_SIZES + (model_tp,))
                serving = {"serves_at_tp": sizes, "serve_check": lines, "export": str(export)}
                for line in lines:
                    log.info("%s export: %s", method, line)
        elif method == "rtn_w4a16":
            t0 = time.perf_counter()
            quantize_weights_only(model)
            calib_s = time.perf_counter() - t0
        row = evaluate_model(model, tok, limit=limit, batch_size=batch_size, docs=docs)
        lin_bytes = linear_weight_bytes(model) if method not in ("fp", "rtn_w4a16") else bf16_bytes
        row.update({"label": label, "calib_seconds": calib_s, "linear_bytes": lin_bytes,
                    "linear_bytes_vs_bf16": lin_bytes / bf16_bytes,
                    **kv_cache_bytes(model, "C8" if method == C8_ROW else "KV4" if method in KV4_METHODS else None)})
        if serving is not None:
            row.update(serving)
        if method in ("rtn", "hadamard", C8_ROW) + EXPORTED_ROWS:
            row["clip_ratios"] = [l["clip_ratios"] for l in model.flatquant_report["layers"]]
            row["fake_quant_mse"] = [l.get("fake_quant_mse") for l in model.flatquant_report["layers"]]
            row["epoch_losses"] = [l["epoch_losses"] for l in model.flatquant_report["layers"]]
            if method in KV4_METHODS:
                row["kv_clip"] = [l["kv_clip"] for l in model.flatquant_report["layers"]]
            if model.flatquant_report.get("e2e"):  # the end-to-end stage: KL per epoch, its seconds, the served clips
                row["e2e"] = model.flatquant_report["e2e"]
        results[method] = row
        log.info("%s: word PPL %.3f, token PPL %.3f (calib %.0f s, eval %.0f s)", method,
                 row["word_perplexity"], row["token_perplexity"], calib_s, row["eval_seconds"])
        if method == "flatquant_msmodelslim" and C8_ROW in methods[i + 1:]:
            kept = model  # the C8 row calibrates its cache on this model instead of quantizing again
        del model
    fp = results.get("fp")
    for row in results.values():
        row["token_ppl_vs_fp"] = row["token_perplexity"] / fp["token_perplexity"] if fp else None
        row["word_ppl_vs_fp"] = row["word_perplexity"] / fp["word_perplexity"] if fp else None
    summary = {
        "model": model_name,
        "profile": profile,
        "settings": {"flatquant": fq_cfg.to_dict(), "configs": configs, "task": TASK, "limit": limit, "docs": docs,
                     "max_length": 512,
                     "num_layers": num_layers, "baselines": "rtn/hadamard: fixed transforms, clip 1.0, RTN weights",
                     "torch_threads": torch.get_num_threads()},
        "results": results,
        "checks": _checks(results, profile),
        "total_seconds": time.perf_counter() - t_all,
    }
    atomic_write_bytes(out / "demo.json", json.dumps(summary, indent=1).encode())
    _plot(summary, out / "demo.png")
    return summary


# Token-perplexity targets of FlatQuant against full precision, per profile (issue 13; the paper
# reaches 1.06x-1.14x on 7B-8B models with 128 x 2048 tokens and 15 epochs).
MAX_RATIO = {"fast": 1.35, "full": 1.25}


def _checks(results: dict, profile: str = "fast") -> dict:
    """The issue's targets, evaluated on what was measured (None where a row or the profile does not apply)."""
    def ppl(m):
        return results[m]["token_perplexity"] if m in results else None

    fq, had, rtn, w4a16, fp = ppl("flatquant"), ppl("hadamard"), ppl("rtn"), ppl("rtn_w4a16"), ppl("fp")
    ratio = MAX_RATIO.get(profile)
    checks = {
        "flatquant_below_w4a16_rtn": None if None in (fq, w4a16) else fq < w4a16,
        "flatquant_lt_hadamard_lt_rtn": None if None in (fq, had, rtn) else fq < had < rtn,
        "flatquant_linear_bytes_at_most_bf16_over_3.5": (
            results["flatquant"]["linear_bytes_vs_bf16"] <= 1 / 3.5 if "flatquant" in results else None),
        f"flatquant_at_most_{ratio}x_fp_{profile}_profile": (
            None if ratio is None or None in (fq, fp) else fq <= ratio * fp),
    }
    ms, c8 = ppl("flatquant_msmodelslim"), ppl(C8_ROW)
    kv4, kv4_plain = ppl("flatquant_kv4"), ppl("flatquant_kv4_notrans")
    if c8 is not None:  # the KV-cache targets (issue 26), where a KV-cache row ran
        checks["c8_at_most_0.5pct_over_msmodelslim"] = None if ms is None else c8 <= 1.005 * ms
    if kv4 is not None:
        checks["kv4_at_most_3pct_over_flatquant"] = None if fq is None else kv4 <= 1.03 * fq
        checks["kv4_below_kv4_without_transforms"] = None if kv4_plain is None else kv4 < kv4_plain
    mx, mx_had, mx_rtn = ppl("flatquant_mxfp4"), ppl("mxfp4_hadamard"), ppl("mxfp4_rtn")
    if mx is not None:  # the MXFP4 targets (issue 27), where its FlatQuant row ran
        checks["mxfp4_flatquant_below_mxfp4_rtn_and_hadamard"] = (
            None if mx_had is None and mx_rtn is None else all(mx < v for v in (mx_had, mx_rtn) if v is not None))
        checks["mxfp4_flatquant_at_most_10pct_over_flatquant"] = None if fq is None else mx <= 1.10 * fq
    return checks


def format_table(summary: dict) -> str:
    width = max(34, *(len(r["label"]) for r in summary["results"].values()))
    head = (f"{'method':{width}} {'word PPL':>10} {'token PPL':>10} {'x FP':>7} {'linear MiB':>11} "
            f"{'x bf16':>7} {'KV x bf16':>9} {'serves at TP':>12} {'calib s':>8} {'eval s':>7}")
    lines = [head, "-" * len(head)]
    for m, r in summary["results"].items():
        x = f"{r['token_ppl_vs_fp']:.2f}" if r.get("token_ppl_vs_fp") else "-"
        tps = ",".join(map(str, r["serves_at_tp"])) or "none" if "serves_at_tp" in r else "-"
        lines.append(f"{r['label']:{width}} {r['word_perplexity']:10.3f} {r['token_perplexity']:10.3f} {x:>7} "
                     f"{r['linear_bytes'] / 2**20:11.1f} {r['linear_bytes_vs_bf16']:7.3f} "
                     f"{r.get('kv_vs_bf16', 1.0):9.2f} {tps:>12} "
                     f"{r['calib_seconds']:8.0f} {r['eval_seconds']:7.0f}")
    lines.append("")
    lines.append("x FP: token perplexity ratio to full precision; x bf16: linear weight bytes in memory "
                 "relative to bf16 (the fp rows are counted at bf16); KV x bf16: KV-cache bytes per token relative "
                 "to a bf16 cache (C8: int8 values, its scales a few KiB per model, not per token; KV4: 4-bit "
                 "values and an fp16 scale and zero per token and head); "
                 "serves at TP: the tensor-parallel sizes "
                 f"of {list(SERVE_TP_SIZES)} (and the model's smallest split above 1) at which vLLM loads the export "
                 "(flatquant_lab.io.serving.serve_check).")
    for k, v in summary["checks"].items():
        lines.append(f"check {k}: {'n/a' if v is None else ('PASS' if v else 'MISS')}")
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = summary["results"]
    names = list(res)
    vals = [res[m]["token_perplexity"] for m in names]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = ["#555555" if m == "fp" else "#8c8cd9" if m == "rtn_w4a16" else "#3b9c5a"
              if m in FLATQUANT_ROWS + (C8_ROW,) else "#2b6c9c" if m == "flatquant_mxfp4" else "#d98c8c" for m in names]
    bars = ax.bar([res[m]["label"].replace(" (", "\n(") for m in names], vals, color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("token perplexity (log scale)")
    ax.set_title(f"{summary['model']}: W4A4 on the bundled Wikipedia eval set ({summary['profile']} profile)")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
    if "fp" in res:
        ax.axhline(res["fp"]["token_perplexity"], color="#555555", lw=0.8, ls="--")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
