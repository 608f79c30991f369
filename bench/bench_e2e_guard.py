"""What the end-to-end stage's held-out guard costs, against the stage's training, in one run.

    .venv/bin/python bench/bench_e2e_guard.py [--threads N] [--num-layers N] [--profile fast]

The bundled SmolLM2-135M (dequantized GGUF) is calibrated layer-wise at the profile's windows with no layer-wise
training (``epochs=0``, RTN weights: the stage's cost does not depend on how the layers were fitted), then the
end-to-end stage runs with the profile's budget (fast: 24 windows trained on, 8 held out, 4 epochs). The stage's
report splits its seconds into the guard's held-out measurements (``guard_seconds``: through the twins before and
after each epoch, through the int4 modules at the start and for the kept state) and the rest (training). Printed:
both, and the guard's share of the stage.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flatquant_lab.api import quantize  # noqa: E402
from flatquant_lab.data import bundled_data_path, calibration_ids  # noqa: E402
from flatquant_lab.hub import load_model  # noqa: E402
from flatquant_lab.recipe import QuantConfig  # noqa: E402
from provenance import cpu_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-layers", type=int, default=None, help="first N decoder layers only")
    ap.add_argument("--profile", default="fast", choices=("fast", "full"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m", num_layers=args.num_layers)
    cfg = QuantConfig(profile=args.profile, epochs=0, weight_quantizer="rtn")
    ids = calibration_ids(bundled_data_path("calib"), tok, cfg.data.samples, cfg.data.seqlen)
    t0 = time.perf_counter()
    quantize(model, cfg, ids)
    rep = model.flatquant_report["e2e"]
    total, guard = rep["seconds"], rep["guard_seconds"]
    print(f"cpu {cpu_model()!r}, threads {args.threads}, profile {args.profile}, layers "
          f"{len(model.flatquant_report['layers'])}, windows trained on {rep['samples']}, held out {rep['holdout']}, "
          f"epochs {rep['epochs']}")
    print(f"calibration {time.perf_counter() - t0:.0f} s; end-to-end stage {total:.0f} s: training {total - guard:.0f} s, "
          f"held-out guard {guard:.0f} s = {guard / total:.1%} of the stage ({guard / (total - guard):.2f}x its training)")
    print(f"held-out KL (twins) {' -> '.join(f'{v:.4f}' for v in rep['heldout_kl'])}; int4 path "
          f"{rep['heldout_kl_before']:.4f} -> {rep['heldout_kl_after']:.4f} (standard error of the per-window gain "
          f"{rep['heldout_gain_se'] or 0:.4f}), kept epoch {rep['kept_epoch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
