"""Exploration (session 8, not yet a package stage): end-to-end tuning after the layer-wise calibration.

    .venv/bin/python bench/explore_e2e.py --threads 2 --epochs 4 --lr 5e-3 [--skip-base] [--norms]

Calibrates with ``bench_ablation.CONFIGS[--config]`` (GPTQ; learned tensors kept in /tmp/exp/wd_*), then replaces
every W4A4FlatQuantLinear by a differentiable twin (act-dtype / fp16 roundings, int4 per-token activations with
straight-through gradients, the GPTQ codes fixed) and learns what the checkpoint holds as floats: a
log-multiplier per row on ``weight_scale`` and one ``clip_ratio`` logit per fused module (q/k/v, gate/up tied),
on KL(float model's logits || quantized model's logits) over the calibration windows; writes them back into the
int4 modules and evaluates the int4 path with the demo's lm-eval task. Session 8, fast profile, 2 threads:
29.042 -> 28.449 (2 epochs, lr 1e-3), 29.042 -> 27.345 (4 epochs, lr 5e-3).
"""
import math, sys, time, os, argparse
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.join(HERE, ".."))
import torch
from torch import nn
import bench_ablation as ba
from flatquant_lab.layers import W4A4FlatQuantLinear
from flatquant_lab.quantizers import fake_quant_act, round_to as ste_cast
from flatquant_lab.models import set_submodule
from flatquant_lab.demo import evaluate_model
from flatquant_lab.data import bundled_data_path, calibration_ids

p = argparse.ArgumentParser()
p.add_argument("--config", default="defaults_rel"); p.add_argument("--epochs", type=int, default=2)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--clip-lr", type=float, default=1e-2)
p.add_argument("--bs", type=int, default=4); p.add_argument("--threads", type=int, default=1)
p.add_argument("--norms", action="store_true"); p.add_argument("--limit", type=int, default=None)
p.add_argument("--profile", default="fast"); p.add_argument("--skip-base", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
ba.PROFILE = a.profile
from flatquant_lab.hub import load_model
teacher, tok = load_model(ba.MODEL)
teacher.eval()
for q in teacher.parameters(): q.requires_grad_(False)
t0 = time.perf_counter()
model, tok, cfg, secs = ba.calibrated(a.config, "gptq", None, f"/tmp/exp/wd_{a.config}_{a.profile}")
print("calibrated", secs, flush=True)
if not a.skip_base:
    r0 = evaluate_model(model, tok, limit=a.limit); print("BASE token ppl", r0["token_perplexity"], flush=True)

class E2E(nn.Module):
    def __init__(self, m, clip_param):
        super().__init__()
        self.codes = m.weight_int.float(); self.s0 = m.weight_scale.float().view(-1)
        self.p1 = m.p1; self.p2 = m.p2; self.n1, self.n2 = m.n1, m.n2; self.act = m.act_dtype
        self.bias = m.bias; self.u = nn.Parameter(torch.zeros_like(self.s0)); self.clip = clip_param
        assert m.tp_size == 1
    def forward(self, x):
        xs = ste_cast(x.float(), self.act).unflatten(-1, (self.n1, self.n2))
        t = ste_cast(xs @ self.p2.float(), self.act)
        t = ste_cast(self.p1.float() @ t, torch.float16)
        b = fake_quant_act(t.flatten(-2), torch.sigmoid(self.clip))
        w = self.codes * (self.s0 * self.u.exp())[:, None]
        y = b @ w.t()
        if self.bias is not None: y = y + self.bias.float()
        return ste_cast(y, self.act).to(x.dtype)

def fused_key(name):
    """One clip per module vLLM fuses: q/k/v -> attn, gate/up -> mlp."""
    for part, fused in (("q_proj", "attn"), ("k_proj", "attn"), ("v_proj", "attn"), ("gate_proj", "mlp"), ("up_proj", "mlp")):
        name = name.replace(part, fused)
    return name


mods = {n: m for n, m in model.named_modules() if isinstance(m, W4A4FlatQuantLinear)}
clips = {}
wrapped = {}
for n, m in mods.items():
    key = fused_key(n)
    if key not in clips:
        c = float(m.clip_ratio.item()); clips[key] = nn.Parameter(torch.tensor(math.log(c / (1 - c))))
    wrapped[n] = E2E(m, clips[key]); set_submodule(model, n, wrapped[n])
for q in model.parameters(): q.requires_grad_(False)
params = [{"params": [w.u for w in wrapped.values()], "lr": a.lr}, {"params": list(clips.values()), "lr": a.clip_lr}]
for w in wrapped.values(): w.u.requires_grad_(True)
for c in clips.values(): c.requires_grad_(True)
if a.norms:
    norms = [m.weight for n, m in model.named_modules() if n.endswith("layernorm") or n.endswith(".norm")]
    for w in norms: w.requires_grad_(True)
    params.append({"params": norms, "lr": a.lr * 0.1})
ids = calibration_ids(bundled_data_path("calib"), tok, cfg.budget("samples"), cfg.budget("seqlen"), seed=0)
opt = torch.optim.Adam(params)
steps = a.epochs * math.ceil(ids.shape[0] / a.bs)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
g = torch.Generator().manual_seed(0)
t1 = time.perf_counter()
for ep in range(a.epochs):
    tot = 0
    for bi in torch.randperm(ids.shape[0], generator=g).split(a.bs):
        x = ids[bi]
        with torch.no_grad(): tl = teacher(x).logits.float().log_softmax(-1)
        sl = model(x).logits.float().log_softmax(-1)
        loss = (tl.exp() * (tl - sl)).sum(-1).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step(); tot += float(loss)
    print(f"epoch {ep} kl {tot / math.ceil(ids.shape[0] / a.bs):.4f} ({time.perf_counter() - t1:.0f} s)", flush=True)
# write back
with torch.no_grad():
    for n, w in wrapped.items():
        m = mods[n]; m.weight_scale.copy_((w.s0 * w.u.exp()).view_as(m.weight_scale))
        m.set_clip_ratio(float(torch.sigmoid(clips[fused_key(n)])))
        set_submodule(model, n, m)
print("u range", min(float(w.u.min()) for w in wrapped.values()), max(float(w.u.max()) for w in wrapped.values()))
r1 = evaluate_model(model, tok, limit=a.limit); print("E2E token ppl", r1["token_perplexity"], "e2e s", time.perf_counter() - t1, flush=True)
