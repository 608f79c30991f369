"""Layer-wise FlatQuant calibration, and the RTN / Hadamard baselines on the same machinery.

Per decoder layer, one transform per linear input: q/k/v share one, o_proj has one, gate/up share
one, down_proj has one. A transform is ``x -> (x / d) @ kron(L, R)`` followed by per-token int4
fake quantization with clip ``c = sigmoid(alpha)``; its linears hold
``Q4((W * d) @ kron(L, R)^{-T})`` with per-channel clip ``sigmoid(beta)``.
Training minimises ``MSE(layer_fp(X), layer_q(X_q))`` with ``X`` the full-precision model's input and
``X_q`` the quantized model's (``train_inputs="quantized"``; ``"float"``: ``X_q = X``), AdamW and a
cosine schedule. The training forward rounds where the Ascend kernels round (x, ``x @ R`` to the
activation dtype, ``L^T (x R)`` to fp16, the output to the activation dtype) with straight-through
gradients, so what was trained is what the int4 path computes.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import module_device, peak_memory, require_available, reset_peak, return_freed_host_memory
from ..models import adapter_for
from ..recipe import QuantConfig
from .e2e import TunableW4A4, clip_groups, tune_scales
from .capture import HeldActivations, capture_layer_inputs, choose_activations, float_forward, propagate
from .finalize import finalize_layer, w8a8_dynamic_layer
from .initialize import init_learned
from .modules import FakeQuantLinear, KronTransform, install_fake_quant, uninstall_fake_quant
from .plan import Group, fallback_notice, flatquant_linears, plan_layer, plan_model
from .train import fake_quant_pass, train_layer
from .memory import float_compute
from .workdir import WorkDir

log = logging.getLogger(__name__)

__all__ = [
    "CalibrationReport", "FakeQuantLinear", "Group", "HeldActivations", "KronTransform", "WorkDir", "calibrate",
    "capture_layer_inputs", "fake_quant_pass", "finalize_layer", "float_forward", "init_learned",
    "install_fake_quant", "plan_layer", "plan_model", "fallback_notice", "flatquant_linears", "tp_split_problem",
    "train_layer", "TunableW4A4", "clip_groups", "tune_scales",
    "uninstall_fake_quant", "w8a8_dynamic_layer",
]


@dataclass
class CalibrationReport:
    """What ``calibrate`` did: per layer, losses and seconds; the linears kept in float and why."""

    method: str
    layers: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    calibration: dict | None = None  # what the layers were calibrated on: samples, seqlen, ids digest
    schemes: dict[str, str] = field(default_factory=dict)  # decoder linear -> its recipe scheme
    fallbacks: dict[str, str] = field(default_factory=dict)  # linear -> why FlatQuant could not serve it
    placement: dict | None = None  # where: the device, and where the activations were held (bytes)
    e2e: dict | None = None  # the end-to-end stage: KL per epoch, seconds, the tuned clips (None: not run)

    def to_dict(self) -> dict:
        return {"method": self.method, "layers": self.layers, "skipped": self.skipped, "seconds": self.seconds,
                "calibration": self.calibration, "schemes": self.schemes, "fallbacks": self.fallbacks,
                "placement": self.placement, "e2e": self.e2e}


def budget_ids(calib_ids: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The calibration budget applied to the data: the first ``samples`` sequences, cut to ``seqlen`` tokens.

    Fewer sequences, or shorter ones, than the budget asks for are refused; more is used only up to the
    budget, with a warning, so that ``QuantConfig`` always says what calibration ran on.
    """
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise ValueError(f"calib_data: expected a LongTensor [n, seqlen], got {getattr(calib_ids, 'shape', calib_ids)}")
    samples, seqlen = cfg.data.samples, cfg.data.seqlen
    n, length = calib_ids.shape
    src = f"QuantConfig(profile={cfg.profile!r}, samples={samples}, seqlen={seqlen})"
    if n < samples or length < seqlen:
        raise ValueError(f"calib_data: {n} x {length} token ids given, but {src} calibrates on {samples} x {seqlen}; "
                         "pass at least that much, or set samples= / seqlen= to what you have")
    if n > samples or length > seqlen:
        warnings.warn(f"calib_data: {n} x {length} token ids given; {src} uses the first {samples} x {seqlen} "
                      "(set samples= / seqlen= to use more)", stacklevel=4)
    return calib_ids[:samples, :seqlen].contiguous()


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of the token ids and their shape: a resumed run must see the same data."""
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def calibrate(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor | None = None,
              backend: str | None = None, after_layer=None) -> CalibrationReport:
    """Quantize every decoder linear of ``model`` in place, layer by layer (see module docstring).

    ``calib_ids``: token ids ``[n, seqlen]``; needed for ``flatquant`` and for GPTQ weights.
    ``after_layer(i)``: called after each finished layer (progress hooks, tests of resumption).
    The model stays on its device and in its dtype; each decoder layer moves to ``cfg.placement.device`` (default:
    the model's device) for capture, training, GPTQ and finalisation, computes there in float32 (its
    weights kept in their dtype, upcast per use: ``float_compute``), and then goes back.
    """
    t0 = time.perf_counter()
    cfg = cfg.for_model(model)  # act_dtype None: the model's own half dtype, bfloat16 for a float32 model
    home = module_device(model)
    dev = require_available(cfg.placement.device) if cfg.placement.device is not None else home
    if cfg.placement.release_host_memory and (dev.type == "cpu" or home.type == "cpu"):  # the host holds the model
        return_freed_host_memory()
    adapter = adapter_for(model)
    info = adapter.info(model)
    layers = adapter.decoder_layers(model)
    report = CalibrationReport(cfg.method)
    need_data = cfg.method == "flatquant" or cfg.weight_quantizer == "gptq"
    if need_data and calib_ids is None:
        raise ValueError(f"calib_data: method={cfg.method!r} with weight_quantizer={cfg.weight_quantizer!r} "
                         "needs calibration token ids [n, seqlen]")
    if not need_data and calib_ids is not None:
        warnings.warn(f"calib_data: method={cfg.method!r} with weight_quantizer={cfg.weight_quantizer!r} uses no "
                      "calibration data; it is ignored", stacklevel=3)
    unused = [n for n in ("epochs", "lr", "e2e_epochs", "e2e_samples", "e2e_holdout", "e2e_lr", "e2e_batch_size")
              if n in cfg.given and cfg.method != "flatquant"]
    if unused:
        warnings.warn(f"{', '.join(unused)}: only method='flatquant' trains; ignored for method={cfg.method!r}",
                      stacklevel=3)
    model_dtype = next(model.parameters()).dtype
    if model_dtype in (torch.float16, torch.bfloat16) and model_dtype != cfg.schemes.act_dtype:
        # The W4A4 layers take the model's hidden states as they are (vllm-ascend: act dtype = model dtype).
        raise ValueError(f"act_dtype: the model is {model_dtype}, so its W4A4 layers must compute in it; "
                         f"expected act_dtype={model_dtype} (or a float32 model), got {cfg.schemes.act_dtype}")
    split = tp_split_problem(model, cfg.schemes.tp_size)
    if split:
        raise ValueError(f"tp_size: {split}; choose a tensor-parallel size that divides them")
    torch.manual_seed(cfg.seed)
    plans = plan_model(model, cfg, info)
    names = [f"{adapter.layer_prefix(i)}.{lin}" for i, groups in enumerate(plans) for g in groups for lin in g.linears]
    unmatched = [p for p in cfg.schemes.skip if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"skip: {unmatched} match no decoder linear (their names look like {names[-1]!r}; "
                         "e.g. '*.o_proj' or 'model.layers.0.*'); the output head always stays float")
    cfg.check_recipe(names)
    for i, groups in enumerate(plans):
        for g in groups:
            for lin in g.linears:
                name = f"{adapter.layer_prefix(i)}.{lin}"
                report.schemes[name] = g.scheme
                if g.scheme == "float":
                    report.skipped[name] = g.skip_reason
                if g.fallback:
                    report.fallbacks[name] = g.skip_reason
    notice = fallback_notice(plans, cfg)
    if notice:  # one line for the whole model, before any work
        log.warning("%s", notice)
    if report.skipped:
        reasons = {}
        for name, why in report.skipped.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            log.info("kept in float (%s): %s", why, ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""))
    log.info("lm_head stays in float: the NPU W4A4 path serves decoder linears only")
    report.skipped["lm_head"] = "output head: kept in float"
    digest = None
    if need_data:
        calib_ids = budget_ids(calib_ids, cfg)
        digest = ids_digest(calib_ids)
        report.calibration = {"samples": calib_ids.shape[0], "seqlen": calib_ids.shape[1], "ids_sha256": digest}
    work = WorkDir(cfg.placement.work_dir, cfg, info.num_layers, digest) if cfg.placement.work_dir else None
    X = Y = XQ = kwargs_by_bs = None
    bs = cfg.train.batch_size
    report.placement = {"device": str(dev), "model_device": str(home), "activations": None}
    if need_data:
        # Held in the model's dtype: a float32 model keeps float32 inputs and targets (as before).
        shape = (*calib_ids.shape, info.hidden_size)
        nbytes = 2 * shape[0] * shape[1] * shape[2] * torch.finfo(model_dtype).bits // 8
        on_host = choose_activations(cfg.placement.activations, nbytes, dev)
        X, kwargs_by_bs = capture_layer_inputs(model, calib_ids, bs, dev, model_dtype, on_host)
        Y = HeldActivations(tuple(X.shape), model_dtype, dev, on_host)
        if cfg.train.train_inputs == "quantized":  # the quantized model's states, starting as layer 0's inputs
            XQ = HeldActivations(tuple(X.shape), model_dtype, dev, on_host)
            XQ.buf.copy_(X.buf)
        report.placement.update(activations="host" if on_host else "device",
                                activation_bytes=sum(h.nbytes for h in (X, Y, XQ) if h is not None),
                                activation_dtype=str(model_dtype).replace("torch.", ""))
    bar = tqdm(range(info.num_layers), desc=f"{cfg.method} layers", unit="layer")
    for i in bar:
        lt0 = time.perf_counter()
        layer, groups = layers[i], plans[i]
        reset_peak(dev)
        layer.to(dev)
        with float_compute(layer):  # float32 compute, the linear weights kept in the model's dtype
            entry, learned, Y = _calibrate_layer(layer, groups, i, cfg, X if XQ is None else XQ, X, Y, kwargs_by_bs,
                                                 work, backend, bar)
        layer.to(model_dtype)
        if XQ is not None:  # the next layer's inputs: this layer as it will serve, on its own inputs, in place
            propagate(layer, XQ, kwargs_by_bs, bs, model_dtype)
        layer.to(home)
        entry["clip_ratios"] = {g.name: float(torch.sigmoid(learned[f"{g.name}.act_clip"]).item())
                                for g in groups if g.quantized}
        entry["seconds"] = time.perf_counter() - lt0
        if i == 0:
            _warn_if_long(entry["seconds"], info.num_layers, cfg)
        where, peak = peak_memory(dev)
        entry[f"peak_{where}_bytes"] = peak
        report.layers.append(entry)
        loss = entry.get("fake_quant_mse")
        bar.set_postfix(layer=i, loss="-" if loss is None else f"{loss:.3g}", s=f"{entry['seconds']:.1f}",
                        **{f"peak_{where}": f"{peak / 2**30:.2f}GiB"})
        if need_data:
            X, Y = Y, X  # these outputs are the next layer's float inputs; its targets overwrite the old inputs
        if after_layer is not None:
            after_layer(i)
    if need_data and cfg.tunes_end_to_end:
        if dev != home:  # the stage backpropagates through the whole model: it goes to the device for it
            model.to(dev)
        try:
            report.e2e = tune_scales(model, calib_ids, X, cfg)
        except Exception as exc:  # the layer-wise model is already whole: a failed stage must not lose it
            warnings.warn(f"end-to-end stage failed ({type(exc).__name__}: {exc}); keeping the layer-wise model",
                          stacklevel=2)
            log.debug("end-to-end stage failure", exc_info=True)
            report.e2e = {"error": f"{type(exc).__name__}: {exc}", "kept_epoch": 0}
        finally:
            model.to(home)
        if "error" not in report.e2e:
            log.info("end-to-end stage: training KL %s; held-out KL %s, kept epoch %d, in %.0f s",
                     " -> ".join(f"{v:.4f}" for v in report.e2e["kl"]),
                     " -> ".join(f"{v:.4f}" for v in report.e2e["heldout_kl"]), report.e2e["kept_epoch"],
                     report.e2e["seconds"])
    report.seconds = time.perf_counter() - t0
    return report


# A calibration expected to run longer than this says so (once, after its first layer).
LONG_RUN_SECONDS = 30 * 60


def _warn_if_long(layer0_seconds: float, num_layers: int, cfg: QuantConfig) -> None:
    """After layer 0: a warning when the layer-wise calibration of all ``num_layers`` (the same shapes each)
    will take longer than ``LONG_RUN_SECONDS`` at layer 0's pace."""
    total = layer0_seconds * num_layers
    if total <= LONG_RUN_SECONDS:
        return
    pace = f"{total / 3600:.1f} h" if total >= 3600 else f"{total / 60:.0f} min"
    stage = " (then the end-to-end stage)" if cfg.tunes_end_to_end else ""
    log.warning("calibration of %d layers will take about %s at this pace (layer 0: %.0f s, profile %r)%s",
                num_layers, pace, layer0_seconds, cfg.profile, stage)


def tp_split_problem(model: nn.Module, tp_size: int) -> str:
    """Why vLLM cannot split ``model`` (its attention heads, kv heads, intermediate size) over ``tp_size``
    ranks, in serve-check's words; ``""`` when it can."""
    if tp_size == 1:
        return ""
    from ..models.tp import model_split_problem

    return model_split_problem(model.config.to_dict(), tp_size)


def _calibrate_layer(layer, groups, i, cfg: QuantConfig, inputs, X, Y, kwargs_by_bs, work, backend, bar):
    """One decoder layer, on its device: full-precision targets ``Y`` of the float inputs ``X``, the
    learned tensors (trained on ``inputs``, or resumed from ``work``), the fake-quant check, and the
    swap to quantized linears. Returns the report entry, the learned tensors and ``Y``."""
    need_data = X is not None
    stats = None
    if need_data:
        Y, stats = float_forward(layer, groups, X, kwargs_by_bs, cfg.train.batch_size, Y)
    dev = module_device(layer)
    losses, resumed = [], False
    if work is not None and work.has(i):
        learned, losses = work.load(i)
        learned = {k: v.to(dev) for k, v in learned.items()}
        resumed = True
    else:
        learned = init_learned(layer, groups, cfg, stats, i)
        if cfg.trains and any(g.quantized for g in groups):
            learned, losses = train_layer(layer, groups, learned, inputs, Y, kwargs_by_bs, cfg, i, progress=bar)
        if work is not None:
            work.save(i, learned, losses)
    entry = {"layer": i, "epoch_losses": losses, "resumed": resumed}
    hess = None
    if need_data and any(g.quantized or g.scheme == "w8a8_dynamic" for g in groups):
        entry["fake_quant_mse"], hess = fake_quant_pass(layer, groups, learned, inputs, Y, kwargs_by_bs, cfg,
                                                        collect=cfg.weight_quantizer == "gptq")
    finalize_layer(layer, groups, learned, cfg, hess, backend=backend)
    return entry, learned, Y
