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

``calibrate`` runs named stages, top to bottom: ``plan_run`` (what each linear becomes; every refusal before
any work), ``planned_report``, ``calibration_ids`` (the budget), ``capture_activations`` (layer 0's inputs, the
held buffers); per layer (``calibrate_layer``) its targets, ``train_or_resume`` (the learned ``LayerState``) and
``fold_quantize_swap``; then ``tune_end_to_end`` (calibrate/e2e.py), which keeps the layer-wise model on failure.

The recipe scheme ``w4a4_mxfp4_flatquant`` makes a group W4A4_MXFP4_FLATQUANT: the same transforms, smoothing and
layer-wise loss with MXFP4 fake quantizers, finalized into ``W4A4MXFP4FlatQuantLinear`` (docs/mxfp4.md). The
end-to-end stage tunes int4 weight scales and clips through differentiable twins of the int4 layers, and the
transforms of the MXFP4 layers (whose E8M0 scales are powers of two) through twins of theirs.

``kv_cache="KV4"`` (calibrate/kv4.py) adds FlatQuant's KV transforms and KV clips to each layer's learned state:
trained in the same loss, ``T_v`` folded into ``v_proj``/``o_proj`` and a ``KV4Cache`` attached at finalize; the
model's attention reads the 4-bit cache from the start of the run (a layer without one computes as before), so the
quantized inputs of later layers and the end-to-end stage see it.
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
from ..models import ModelAdapter, ModelInfo, adapter_for, kv_caches, plain_attention, use_kv_cache_attention
from ..recipe import QuantConfig
from .e2e import TunableW4A4, clip_groups, tune_scales
from .capture import HeldActivations, capture_layer_inputs, choose_activations, float_forward, propagate
from .finalize import finalize_layer, w8a8_dynamic_layer
from .initialize import init_learned
from .modules import FakeQuantLinear, KronTransform, install_fake_quant, uninstall_fake_quant
from .plan import Group, fallback_notice, flatquant_linears, plan_layer, plan_model
from .train import fake_quant_pass, train_layer
from .memory import float_compute
from .state import GroupState, LayerState
from .workdir import WorkDir

log = logging.getLogger(__name__)

__all__ = [
    "Activations", "CalibrationIds", "CalibrationReport", "FakeQuantLinear", "Group", "GroupState", "HeldActivations",
    "KronTransform", "LayerState", "RunPlan", "WorkDir", "calibrate", "calibrate_layer", "calibration_ids",
    "capture_activations", "fold_quantize_swap", "plan_run", "planned_report", "train_or_resume", "tune_end_to_end",
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


def budget_ids(calib_ids: torch.Tensor, cfg: QuantConfig, stacklevel: int = 4) -> torch.Tensor:
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
                      "(set samples= / seqlen= to use more)", stacklevel=stacklevel)
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
    run = plan_run(model, cfg, calib_ids)
    report = planned_report(run)
    ids = calibration_ids(run, calib_ids, report)
    work = WorkDir(run.cfg.placement.work_dir, run.cfg, run.info.num_layers, ids.sha256) if run.cfg.placement.work_dir \
        else None
    acts = capture_activations(model, run, ids, report)
    if run.cfg.schemes.kv_learned is not None:  # KV4: each finished layer's attention reads its 4-bit cache from now on
        use_kv_cache_attention(model, allow_none=True)  # (C8 with T_v: only the training stand-ins are read)
    bar = tqdm(range(run.info.num_layers), desc=f"{run.cfg.method} layers", unit="layer")
    for i in bar:
        report.layers.append(calibrate_layer(i, run, acts, work, backend, bar))
        if after_layer is not None:
            after_layer(i)
    if acts is not None and run.cfg.tunes_end_to_end:
        report.e2e = tune_end_to_end(model, run, ids, acts.X)
    if run.cfg.schemes.kv_learned is not None and not kv_caches(model):
        plain_attention(model)  # C8 with T_v: no cache yet (its scales come after), the model's own attention
    report.seconds = time.perf_counter() - t0
    return report


# ============================================================================================ plan
@dataclass
class RunPlan:
    """What the plan stage decided, before any work: the config resolved for the model, where each layer
    computes, what each decoder linear becomes (``groups[i]``: layer ``i``'s transform groups) and whether
    the run needs calibration data."""

    cfg: QuantConfig  # for the model: act_dtype resolved
    adapter: ModelAdapter
    info: ModelInfo
    layers: nn.ModuleList
    groups: list[list[Group]]
    home: torch.device  # where the model stays
    device: torch.device  # where each layer is calibrated
    model_dtype: torch.dtype  # the dtype the activations are held in and the layers serve in
    need_data: bool  # flatquant trains, and GPTQ needs inputs: both need calibration ids


def decoder_linear_names(adapter: ModelAdapter, groups: list[list[Group]]) -> list[tuple[str, Group]]:
    """Every decoder linear's full name (``model.layers.0.self_attn.q_proj``) with its group, in layer order."""
    return [(f"{adapter.layer_prefix(i)}.{lin}", g) for i, layer_groups in enumerate(groups)
            for g in layer_groups for lin in g.linears]


def plan_run(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor | None) -> RunPlan:
    """Plan stage: what each decoder linear becomes, and every check that needs only the model and the config.

    Refused here, before any work: missing calibration data, an act dtype other than a half model's own
    (its W4A4 layers take its hidden states as they are), a ``tp_size`` vLLM cannot split the model over,
    ``skip`` patterns that match nothing, a recipe at odds with the fused modules.
    """
    cfg = cfg.for_model(model)  # act_dtype None: the model's own half dtype, bfloat16 for a float32 model
    home = module_device(model)
    dev = require_available(cfg.placement.device) if cfg.placement.device is not None else home
    if cfg.placement.release_host_memory and (dev.type == "cpu" or home.type == "cpu"):  # the host holds the model
        return_freed_host_memory()
    adapter = adapter_for(model)
    info = adapter.info(model)
    layers = adapter.decoder_layers(model)
    need_data = cfg.method == "flatquant" or cfg.weight_quantizer == "gptq"
    if need_data and calib_ids is None:
        raise ValueError(f"calib_data: method={cfg.method!r} with weight_quantizer={cfg.weight_quantizer!r} "
                         "needs calibration token ids [n, seqlen]")
    if not need_data and calib_ids is not None:
        warnings.warn(f"calib_data: method={cfg.method!r} with weight_quantizer={cfg.weight_quantizer!r} uses no "
                      "calibration data; it is ignored", stacklevel=4)
    unused = [n for n in ("epochs", "lr", "e2e_epochs", "e2e_samples", "e2e_holdout", "e2e_lr", "e2e_batch_size",
                          "e2e_clip_lr_mult", "e2e_transform_lr_mult") if n in cfg.given and cfg.method != "flatquant"]
    if unused:
        warnings.warn(f"{', '.join(unused)}: only method='flatquant' trains; ignored for method={cfg.method!r}",
                      stacklevel=4)
    model_dtype = next(model.parameters()).dtype
    if model_dtype in (torch.float16, torch.bfloat16) and model_dtype != cfg.schemes.act_dtype:
        # The W4A4 layers take the model's hidden states as they are (vllm-ascend: act dtype = model dtype).
        raise ValueError(f"act_dtype: the model is {model_dtype}, so its W4A4 layers must compute in it; "
                         f"expected act_dtype={model_dtype} (or a float32 model), got {cfg.schemes.act_dtype}")
    split = tp_split_problem(model, cfg.schemes.tp_size)
    if split:
        raise ValueError(f"tp_size: {split}; choose a tensor-parallel size that divides them")
    torch.manual_seed(cfg.seed)
    groups = plan_model(model, cfg, info)
    if mx_linears(groups):
        if cfg.schemes.tp_size > cfg.schemes.mx_max_tp:
            raise ValueError(f"tp_size: {cfg.schemes.tp_size} exceeds mx_max_tp = {cfg.schemes.mx_max_tp} (the "
                             "max_supported_tp of W4A4_MXFP4_FLATQUANT linears; vLLM refuses a TP above it)")
        if cfg.schemes.mx_max_tp % cfg.schemes.tp_size:
            raise ValueError(f"tp_size: {cfg.schemes.tp_size} does not divide mx_max_tp = {cfg.schemes.mx_max_tp}: "
                             "each rank would keep a diagonal block of left_trans that cuts across the learned ones "
                             "(choose mx_max_tp a multiple of tp_size)")
        if cfg.trains and cfg.train.factor_param != "plain":
            raise ValueError(f"factor_param: W4A4_MXFP4_FLATQUANT groups learn plain block-diagonal factors; "
                             f"expected 'plain' for a recipe with them, got {cfg.train.factor_param!r}")
    names = [name for name, _ in decoder_linear_names(adapter, groups)]
    unmatched = [p for p in cfg.schemes.skip if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"skip: {unmatched} match no decoder linear (their names look like {names[-1]!r}; "
                         "e.g. '*.o_proj' or 'model.layers.0.*'); the output head always stays float")
    cfg.check_recipe(names)
    return RunPlan(cfg, adapter, info, layers, groups, home, dev, model_dtype, need_data)


def mx_linears(groups: list[list[Group]]) -> int:
    """How many decoder linears the plan puts on W4A4_MXFP4_FLATQUANT."""
    return sum(len(g.linears) for layer_groups in groups for g in layer_groups if g.mx)


def planned_report(run: RunPlan) -> CalibrationReport:
    """The report as the plan fills it (each linear's scheme, what stays float and why, the fallbacks), and
    the plan's notices in the log, once for the whole model before any work."""
    report = CalibrationReport(run.cfg.method)
    for name, g in decoder_linear_names(run.adapter, run.groups):
        report.schemes[name] = g.scheme
        if g.scheme == "float":
            report.skipped[name] = g.skip_reason
        if g.fallback:
            report.fallbacks[name] = g.skip_reason
    notice = fallback_notice(run.groups, run.cfg)
    if notice:
        log.warning("%s", notice)
    if report.skipped:
        reasons = {}
        for name, why in report.skipped.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            log.info("kept in float (%s): %s", why, ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""))
    log.info("lm_head stays in float: the NPU W4A4 path serves decoder linears only")
    report.skipped["lm_head"] = "output head: kept in float"
    return report


@dataclass
class CalibrationIds:
    """The token ids calibration runs on (the budget applied; ``None`` where the run needs no data) and their
    sha256 (a resumed run must see the same data)."""

    ids: torch.Tensor | None
    sha256: str | None


def calibration_ids(run: RunPlan, calib_ids: torch.Tensor | None, report: CalibrationReport) -> CalibrationIds:
    """The first ``samples`` x ``seqlen`` token ids (``budget_ids``) and their digest, recorded in the report."""
    if not run.need_data:
        return CalibrationIds(None, None)
    ids = budget_ids(calib_ids, run.cfg, stacklevel=5)
    digest = ids_digest(ids)
    report.calibration = {"samples": ids.shape[0], "seqlen": ids.shape[1], "ids_sha256": digest}
    return CalibrationIds(ids, digest)


# ============================================================================================ capture
@dataclass
class Activations:
    """The buffers each layer is trained and checked on, ``[n, seqlen, hidden]`` in the model's dtype.

    ``X``: the full-precision model's inputs of the current layer; ``Y``: its targets ``layer_fp(X)``, written
    per layer; ``XQ``: the quantized model's inputs (``train_inputs="quantized"``; ``None``: train on ``X``);
    ``kwargs_by_bs``: the decoder layer's keyword arguments per batch size.
    """

    X: HeldActivations
    Y: HeldActivations
    XQ: HeldActivations | None
    kwargs_by_bs: dict

    @property
    def inputs(self) -> HeldActivations:
        """What the layer is trained and checked on: ``XQ``, or ``X`` when training on float inputs."""
        return self.X if self.XQ is None else self.XQ

    def advance(self) -> None:
        """To the next layer: this layer's targets are its float inputs; its old inputs take its targets."""
        self.X, self.Y = self.Y, self.X


def capture_activations(model: nn.Module, run: RunPlan, ids: CalibrationIds,
                        report: CalibrationReport) -> Activations | None:
    """Capture stage: the hidden states entering layer 0, and buffers for the targets (and the quantized
    inputs), on the device or on the host (``placement.activations``); ``None`` when the run needs no data."""
    report.placement = {"device": str(run.device), "model_device": str(run.home), "activations": None}
    if not run.need_data:
        return None
    dtype, dev = run.model_dtype, run.device
    # Held in the model's dtype: a float32 model keeps float32 inputs and targets.
    shape = (*ids.ids.shape, run.info.hidden_size)
    nbytes = 2 * shape[0] * shape[1] * shape[2] * torch.finfo(dtype).bits // 8
    on_host = choose_activations(run.cfg.placement.activations, nbytes, dev)
    X, kwargs_by_bs = capture_layer_inputs(model, ids.ids, run.cfg.train.batch_size, dev, dtype, on_host)
    Y = HeldActivations(tuple(X.shape), dtype, dev, on_host)
    XQ = None
    if run.cfg.train.train_inputs == "quantized":  # the quantized model's states, starting as layer 0's inputs
        XQ = HeldActivations(tuple(X.shape), dtype, dev, on_host)
        XQ.buf.copy_(X.buf)
    report.placement.update(activations="host" if on_host else "device",
                            activation_bytes=sum(h.nbytes for h in (X, Y, XQ) if h is not None),
                            activation_dtype=str(dtype).replace("torch.", ""))
    return Activations(X, Y, XQ, kwargs_by_bs)


# ============================================================================================ one layer
def calibrate_layer(i: int, run: RunPlan, acts: Activations | None, work: WorkDir | None, backend: str | None,
                    bar) -> dict:
    """Decoder layer ``i`` on its device, in float32: its targets, the train stage, the finalize stage; then, with
    quantized inputs, the next layer's inputs through the finished layer. Returns the layer's report entry."""
    lt0 = time.perf_counter()
    cfg, dev = run.cfg, run.device
    layer, groups = run.layers[i], run.groups[i]
    reset_peak(dev)
    layer.to(dev)
    with float_compute(layer):  # float32 compute, the linear weights kept in the model's dtype
        stats = layer_targets(layer, groups, acts, cfg)
        learned, losses, resumed = train_or_resume(layer, groups, i, cfg, acts, stats, work, bar)
        entry = {"layer": i, "epoch_losses": losses, "resumed": resumed}
        mse = fold_quantize_swap(layer, groups, learned, cfg, acts, backend)
        if mse is not None:
            entry["fake_quant_mse"] = mse
    layer.to(run.model_dtype)
    if acts is not None and acts.XQ is not None:  # the next layer's inputs: this layer as it will serve, in place
        propagate(layer, acts.XQ, acts.kwargs_by_bs, cfg.train.batch_size, run.model_dtype)
    layer.to(run.home)
    entry["clip_ratios"] = learned.clip_ratios()
    if learned.kv is not None and cfg.schemes.kv_cache == "KV4":
        entry["kv_clip"] = learned.kv.clip_ratios()
    entry["seconds"] = time.perf_counter() - lt0
    if i == 0:
        _warn_if_long(entry["seconds"], run.info.num_layers, cfg)
    where, peak = peak_memory(dev)
    entry[f"peak_{where}_bytes"] = peak
    loss = entry.get("fake_quant_mse")
    bar.set_postfix(layer=i, loss="-" if loss is None else f"{loss:.3g}", s=f"{entry['seconds']:.1f}",
                    **{f"peak_{where}": f"{peak / 2**30:.2f}GiB"})
    if acts is not None:
        acts.advance()
    return entry


def layer_targets(layer: nn.Module, groups: list[Group], acts: Activations | None, cfg: QuantConfig) -> dict | None:
    """``Y = layer_fp(X)`` written into ``acts.Y``, and per group its inputs' abs-max and a token sample (the
    statistics the starting state is searched on); ``None`` without data."""
    if acts is None:
        return None
    _, stats = float_forward(layer, groups, acts.X, acts.kwargs_by_bs, cfg.train.batch_size, acts.Y)
    return stats


# ============================================================================================ train
def train_or_resume(layer: nn.Module, groups: list[Group], i: int, cfg: QuantConfig, acts: Activations | None,
          stats: dict | None, work: WorkDir | None, bar) -> tuple[LayerState, list[float], bool]:
    """Train stage: layer ``i``'s learned state and its per-epoch losses, and whether it was resumed.

    Resumed from ``work`` when it holds layer ``i``; else started (``init_learned``), trained on
    ``min MSE(layer_fp(X), layer_q(inputs))`` (``train_layer``, when the method trains) and saved to ``work``.
    """
    if work is not None and work.has(i):
        learned, losses = work.load_state(i, groups, module_device(layer))
        return learned, losses, True
    learned, losses = init_learned(layer, groups, cfg, stats, i), []
    if cfg.trains and any(g.quantized for g in groups):
        learned, losses = train_layer(layer, groups, learned, acts.inputs, acts.Y, acts.kwargs_by_bs, cfg, i,
                                      progress=bar)
    if work is not None:
        work.save(i, learned, losses)
    return learned, losses, False


# ============================================================================================ finalize
def fold_quantize_swap(layer: nn.Module, groups: list[Group], learned: LayerState, cfg: QuantConfig,
             acts: Activations | None, backend: str | None) -> float | None:
    """Finalize stage: fold the learned state into the weights, quantize them and swap in the quantized layers.

    With data, a fake-quant pass first: its mean ``MSE(layer_q(inputs), Y)`` (returned; ``None`` without data)
    and, for GPTQ weights, ``H = b^T b`` of each group's quantized inputs (the Hessian GPTQ rounds against).
    """
    mse, hess = None, None
    if acts is not None and any(g.quantized or g.scheme == "w8a8_dynamic" for g in groups):
        mse, hess = fake_quant_pass(layer, groups, learned, acts.inputs, acts.Y, acts.kwargs_by_bs, cfg,
                                    collect=cfg.weight_quantizer == "gptq")
    finalize_layer(layer, groups, learned, cfg, hess, backend=backend)
    return mse


# ============================================================================================ end-to-end
def tune_end_to_end(model: nn.Module, run: RunPlan, ids: CalibrationIds, teacher_hidden: HeldActivations) -> dict:
    """End-to-end stage (``e2e.tune_scales``): weight-scale multipliers and shared clips (int4), transforms
    (MXFP4) on ``KL(p_fp || p_q)``, ``teacher_hidden`` the float model's last-layer outputs. The layer-wise model
    is already whole: a failed stage warns and keeps it (the report's ``e2e`` then holds the error)."""
    if run.device != run.home:  # the stage backpropagates through the whole model: it goes to the device for it
        model.to(run.device)
    try:
        e2e = tune_scales(model, ids.ids, teacher_hidden, run.cfg)
    except Exception as exc:  # the layer-wise model is already whole: a failed stage must not lose it
        warnings.warn(f"end-to-end stage failed ({type(exc).__name__}: {exc}); keeping the layer-wise model",
                      stacklevel=3)
        log.debug("end-to-end stage failure", exc_info=True)
        e2e = {"error": f"{type(exc).__name__}: {exc}", "kept_epoch": 0}
    finally:
        model.to(run.home)
    if "error" not in e2e:
        log.info("end-to-end stage: training KL %s; held-out KL %s, kept epoch %d, in %.0f s",
                 " -> ".join(f"{v:.4f}" for v in e2e["kl"]),
                 " -> ".join(f"{v:.4f}" for v in e2e["heldout_kl"]), e2e["kept_epoch"], e2e["seconds"])
    return e2e


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
