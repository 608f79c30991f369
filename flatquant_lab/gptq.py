"""GPTQ for per-output-channel symmetric int4 (or int8) weights in the transformed basis.

Minimises ``||X W^T - X W_q^T||^2`` column by column: quantize column ``i``, then spread its error
``e = (w_i - q_i s) / [H^-1]_ii`` over the remaining columns with the Cholesky factor of ``H^-1``,
``H = X^T X``. Scales are fixed per row beforehand (what ``npu_quant_matmul`` consumes: no groups).
Where: ``H``'s Cholesky factorisations run in float64 on the CPU (a ``K x K`` matrix, seconds even at
``K = 11008``); the column loop runs on the weight's device, in float64 on the CPU and in float32
on an accelerator (no float64 there; the usual GPTQ precision on GPUs).

MXFP4 (:func:`gptq_quantize_mxfp4`): one E8M0 scale per row and 32 columns, fixed at the start of each group of 32
columns from the weights as GPTQ has updated them so far, then the group's columns quantized one by one against it.
"""
from __future__ import annotations

import torch

from .devices import exact_dtype
from .mxfp4 import (DEFAULT_OPTIONS as MX_DEFAULT_OPTIONS, E8M0_BIAS, GROUP as MX_GROUP, MxOptions, e2m1_codes,
                    element_ratios, pack_fp4, shared_codes, working_values)
from .quantizers import qrange, quantize_weight


class HessianAccumulator:
    """Running ``H = sum_t x_t^T x_t`` over calibration tokens, on the inputs' device: float64 on the CPU,
    float32 on an accelerator. ``h`` is allocated by the first ``add`` unless ``device`` is given. Each
    batch's product is taken in its inputs' dtype, at least float32 (a batch is a few hundred tokens)."""

    def __init__(self, k: int, device=None):
        self.k = k
        self.h = None if device is None else torch.zeros(k, k, dtype=exact_dtype(device), device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if self.h is None:
            self.h = torch.zeros(self.k, self.k, dtype=exact_dtype(x.device), device=x.device)
        x = x.reshape(-1, x.shape[-1])
        if x.dtype == self.h.dtype:
            self.h.addmm_(x.t(), x)
        else:  # this batch's product in float32 (about half float64's time on a CPU), the sum in h's dtype
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            self.h += (x.t() @ x).to(self.h.dtype)
        self.tokens += x.shape[0]


def _inverse_hessian_factor(h: torch.Tensor, damp: float, dev, wd) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp mean(diag H) I)^{-1}`` (float64 ``H`` on the CPU), on ``dev`` in ``wd``."""
    eye = torch.eye(h.shape[0], dtype=torch.float64, device="cpu")
    h = h + damp * torch.diagonal(h).mean() * eye
    # H^-1 by a Cholesky solve (torch.cholesky_inverse is ~10x slower on CPU), then its upper factor
    hinv = torch.cholesky_solve(eye, torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True).to(dev, wd)


def _error_feedback(w: torch.Tensor, hinv: torch.Tensor, block: int, quantize_column) -> None:
    """GPTQ's column loop over ``w`` in place, in lazy blocks of ``block`` columns: column ``j`` (as the earlier
    columns' errors have left it) is quantized by ``quantize_column(j, w1, i)`` (``w1``: the block's working
    columns, ``i``: ``j``'s place in it), which returns its dequantized value and keeps the codes; its error
    ``(w_j - deq_j) / hinv_jj`` is spread over the columns not yet quantized."""
    k = w.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        dinv = 1.0 / torch.diagonal(hinv1)
        for i in range(i2 - i1):  # few ops per column: this loop is GPTQ's cost on a CPU
            col = w1[:, i]
            e = (col - quantize_column(i1 + i, w1, i)) * dinv[i]
            w1[:, i + 1:].addr_(e, hinv1[i, i + 1:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, block: int = 128,
                  damp: float = 0.01, act_order: bool = True, bits: int = 4) -> torch.Tensor:
    """int8 ``[O, K]`` codes, int4 (``bits=4``) or int8 (``bits=8``), for ``weight`` with the fixed ``scale [O, 1]``.

    Rows are independent, so linears that share one input (q/k/v, gate/up) are best passed
    concatenated along ``O``: the factorisation and the column loop then run once for all of them.
    """
    qmin, qmax = qrange(bits)
    dev, wd = weight.device, exact_dtype(weight.device)
    w = weight.detach().to(wd).clone()
    h = hessian.detach().to("cpu", torch.float64).clone()
    o, k = w.shape
    if tuple(h.shape) != (k, k):
        raise ValueError(f"hessian: expected shape [{k}, {k}], got {list(h.shape)}")
    if tuple(scale.shape) != (o, 1):
        raise ValueError(f"scale: expected shape [{o}, 1], got {list(scale.shape)}")
    s = scale.to(dev, wd)
    inv_s = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    dead = torch.diagonal(h) == 0  # inputs never seen: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead.to(dev)] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k, device="cpu")
    w, h = w[:, perm.to(dev)], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp, dev, wd)
    q = torch.empty_like(w)
    s1, inv_s1 = s[:, 0], inv_s[:, 0]

    def quantize_column(j: int, w1: torch.Tensor, i: int) -> torch.Tensor:
        qi = (w1[:, i] * inv_s1).round_().clamp_(qmin, qmax)  # a zero-scale row has zero weights: q = 0
        q[:, j] = qi
        return qi * s1

    _error_feedback(w, hinv, block, quantize_column)
    q = q[:, torch.argsort(perm).to(dev)]
    return q.to(torch.int8)


def gptq_quantize_mxfp4(weight: torch.Tensor, hessian: torch.Tensor, block: int = 128, damp: float = 0.01,
                        options: MxOptions = MX_DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 GPTQ of ``weight[O, K]``: ``(packed uint8 [O, K/2], E8M0 uint8 [O, K/32])``, as
    ``mxfp4.quantize_weight_mxfp4`` returns them.

    At the start of each group of 32 columns, its scales are taken under ``options.scale_rule`` from the columns as
    the error feedback has left them (``mxfp4.shared_codes``); each column is then rounded against them
    (``mxfp4.element_ratios``) and its error spread over the columns not yet quantized. Columns go in their order
    (no act_order: a group is 32 consecutive columns); ``block`` is rounded up to a multiple of 32 so that a group
    never straddles a lazy update. With ``H = I`` the error feedback vanishes and this is round to nearest.
    """
    dev, wd = weight.device, exact_dtype(weight.device)
    w = weight.detach().to(wd).clone()
    h = hessian.detach().to("cpu", torch.float64).clone()
    o, k = w.shape
    if k % MX_GROUP:
        raise ValueError(f"weight: in-features {k} must be a multiple of {MX_GROUP}")
    if tuple(h.shape) != (k, k):
        raise ValueError(f"hessian: expected shape [{k}, {k}], got {list(h.shape)}")
    block = -(-block // MX_GROUP) * MX_GROUP
    dead = torch.diagonal(h) == 0  # inputs never seen: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead.to(dev)] = 0.0
    hinv = _inverse_hessian_factor(h, damp, dev, wd)
    q = torch.empty_like(w)
    codes = torch.empty(o, k // MX_GROUP, dtype=torch.int32, device=dev)
    group = {}  # the current group's E8M0 codes and scales

    def quantize_column(j: int, w1: torch.Tensor, i: int) -> torch.Tensor:
        if j % MX_GROUP == 0:  # this group's scales, from its columns as updated so far (block is a multiple of 32)
            group["code"] = shared_codes(working_values(w1[:, i:i + MX_GROUP], options), options)[:, 0]
            codes[:, j // MX_GROUP] = group["code"]
            group["scale"] = torch.ldexp(torch.ones(o, dtype=wd, device=dev), (group["code"] - E8M0_BIAS).to(wd))
        qi = element_ratios(working_values(w1[:, i], options), group["code"], options)
        q[:, j] = qi.to(wd)
        return qi.to(wd) * group["scale"]

    _error_feedback(w, hinv, block, quantize_column)
    return pack_fp4(e2m1_codes(q)), codes.to(torch.uint8)


def output_error(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row ``d H d^T`` with ``d = w - q s``: each output channel's squared error summed over the tokens of ``H``."""
    h = hessian.to(weight.device, exact_dtype(weight.device))
    d = weight.to(h.dtype) - codes.to(h.dtype) * scale.to(h.dtype)
    return ((d @ h) * d).sum(-1)


def gptq_clip_search(weight: torch.Tensor, hessian: torch.Tensor, clips, block: int = 128, damp: float = 0.01,
                     act_order: bool = True, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ under each candidate clip ratio, each row keeping the one of least output error: ``(codes, scale)``.

    ``clips``: a sequence of candidates, each a float or a per-row tensor ``[O]``. GPTQ's error feedback stays
    within a row, so one pass over the rows stacked once per candidate gives every row every candidate's result;
    the row's ``d H d^T`` (``output_error``, the undamped ``H``) picks. The picked scale is what the checkpoint holds.
    """
    o = weight.shape[0]
    if len(clips) == 0:
        raise ValueError("clips: expected at least one candidate clip ratio")
    # quantize_weight's scales (float32-rounded, on the weight's device), as the RTN path would hold them
    s_all = torch.cat([quantize_weight(weight, c if torch.is_tensor(c) else torch.full(
        (o,), float(c), device=weight.device), bits)[1] for c in clips])
    w_all = weight.repeat(len(clips), 1)
    q_all = gptq_quantize(w_all, hessian, s_all, block=block, damp=damp, act_order=act_order, bits=bits)
    err = output_error(w_all, q_all, s_all, hessian).reshape(len(clips), o)
    pick = err.argmin(0) * o + torch.arange(o, device=err.device)  # row r of candidate c sits at c * o + r
    return q_all[pick], s_all[pick]
