"""Write the research notebooks from code, so that they are reviewable as ordinary Python.

    .venv/bin/python notebooks/make_notebooks.py          # rewrites notebooks/0*.ipynb

The notebooks are committed without outputs; run them with Jupyter or headless with papermill
(``papermill 01_numerics.ipynb out.ipynb -p smoke True``). Each one opens with a cell tagged
``parameters`` (papermill injects overrides after it), then a shared set-up cell that picks the ops
backend: ``npu`` on an Ascend host (``flatquant_lab.ops.npu.is_available()``), else ``reference``.
"""
from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from flatquant_lab.files import atomic_write_text

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, tags: tuple[str, ...] = ()):
    cell = new_code_cell(textwrap.dedent(text).strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def notebook(cells) -> nbformat.NotebookNode:
    cells = [copy.deepcopy(c) for c in cells]  # shared cells (SETUP) get their own id per notebook
    for i, c in enumerate(cells):
        c.id = f"cell-{i:02d}"  # fixed ids: regenerating gives byte-identical files
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


# ------------------------------------------------------------------------------------------ shared
SETUP = code('''
    import os
    import time

    import matplotlib.pyplot as plt
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    import flatquant_lab as fq
    from flatquant_lab.ops import npu as fq_npu

    # is_available() imports torch_npu lazily and says False off an Ascend host (no CANN).
    on_ascend = fq_npu.is_available()
    if backend is None:
        backend = "npu" if on_ascend else "reference"
    if backend not in ("npu", "reference"):
        raise ValueError(f"backend: expected 'npu', 'reference' or None (auto-detect), got {backend!r}")
    if backend == "npu" and not on_ascend:
        raise ValueError("backend: 'npu' needs torch_npu and an Ascend device, and none was found; "
                         "use 'reference' or None")
    # Layers built without an explicit backend (load_quantized, quantize) follow this variable.
    os.environ["FLATQUANT_BACKEND"] = backend
    device = torch.device("npu" if backend == "npu" else "cpu")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
        torch.set_num_threads(threads)
    if not isinstance(smoke, bool):
        raise ValueError(f"smoke: expected True or False, got {smoke!r}")
    if figure_path is not None:
        figure_path = os.path.abspath(figure_path)
        os.makedirs(os.path.dirname(figure_path), exist_ok=True)
    t_start = time.perf_counter()
    print(f"flatquant_lab {fq.__version__}; backend {backend} on {device}, {torch.get_num_threads()} thread(s)"
          f"{' (torch_npu found)' if on_ascend else ' (no Ascend device: CPU reference ops)'}; smoke={smoke}")
''')


def finish_cell(what: str):
    return code(f'''
        print(f"{what} done in {{time.perf_counter() - t_start:.1f}} s")
    ''')


# ------------------------------------------------------------------------------------------ 01
def numerics_notebook():
    return notebook([
        md('''
            # 01 · What "flat" means: one W4A4 layer before and after the Kronecker transform

            The W4A4 path quantizes every token's activations to int4 with **one scale per token**
            (`max |b| * c / 7`). A few outlier channels set that scale, and every other channel of the
            token is left with a handful of the 16 levels. FlatQuant multiplies each token by a
            Kronecker-factored matrix, `x -> x @ kron(L, R)` (folded into the weights as
            `W @ kron(L, R)^-T`, so the layer's result is unchanged in exact arithmetic), which spreads
            the outliers' energy over all channels: the per-channel magnitudes become *flat*.

            This notebook takes one linear of the bundled model (its real input activations, captured
            with a forward hook on a short text) or a random layer with planted outlier channels, and
            compares three transforms: identity (plain RTN), a fixed Hadamard (QuaRot-style) and a
            transform calibrated with FlatQuant for this layer. Then `check_linear` reports the int4
            path against the dequantized reference and against the float layer.
        '''),
        code('''
            model: str = "smollm2-135m"  # model alias or local Hugging Face directory (flatquant_lab.hub.load_model)
            data = None  # text for the activations (.jsonl with a "text" field, or a text file); None: bundled eval split
            calib_data = None  # text for calibrating the FlatQuant transform; None: bundled calib split
            backend = None  # "npu", "reference", or None: npu on an Ascend host, else reference
            threads = None  # torch CPU threads; None: torch's default (on a busy machine, 1 avoids thrashing)
            smoke: bool = False  # CI size: 2 layers, 64 tokens, a token calibration budget
            source: str = "model"  # "model": a real layer's inputs; "random": random tokens with planted outliers
            layer: int = 0  # decoder layer, for source "model"
            linear: str = "mlp.down_proj"  # linear inside that layer; down_proj inputs are heavy-tailed (SPEC section 9)
            tokens: int = 256  # tokens of activations
            calibrate: bool = True  # also learn a FlatQuant transform for this layer (source "model" only)
            calib_samples: int = 32  # calibration windows x tokens, and epochs, for that transform
            calib_seqlen: int = 128
            calib_epochs: int = 4
            outlier_channels: int = 8  # source "random": how many input channels are scaled up, and by how much
            outlier_scale: float = 20.0
            random_in_features: int = 1536  # source "random": layer size
            random_out_features: int = 576
            seed: int = 0
            figure_path = None  # where to save the main figure (PNG), e.g. "../docs/img/01_activation_flatness.png"
        ''', tags=("parameters",)),
        SETUP,
        code('''
            from flatquant_lab.recipe import QuantConfig
            from flatquant_lab.data import bundled_data_path, calibration_ids, concat_token_ids, load_texts
            from flatquant_lab.hub import load_model
            from flatquant_lab.kronecker import decompose_dim, kron_apply
            from flatquant_lab.models import GROUPS, LINEAR_NAMES
            from flatquant_lab.numerics import check_linear, random_problem
            from flatquant_lab.transforms import orthogonal_factor

            if source not in ("model", "random"):
                raise ValueError(f"source: expected 'model' or 'random', got {source!r}")
            if source == "model" and linear not in LINEAR_NAMES:
                raise ValueError(f"linear: expected one of {list(LINEAR_NAMES)}, got {linear!r}")
            if smoke:
                tokens = min(tokens, 64)
                calib_samples, calib_seqlen, calib_epochs = 4, 32, 1
            num_layers = 2 if smoke else layer + 1  # later layers are never needed
            if source == "model" and not (isinstance(layer, int) and 0 <= layer < num_layers):
                raise ValueError(f"layer: expected an int in [0, {num_layers - 1}]"
                                 f"{' (smoke runs keep 2 layers)' if smoke else ''}, got {layer!r}")
        '''),
        md('''
            ## The layer and its input activations

            With `source="model"` a forward pre-hook on the chosen linear records what it receives
            while the (float) model reads the first `tokens` tokens of the text.
        '''),
        code('''
            if source == "model":
                fmodel, tok = load_model(model, num_layers=num_layers)
                fmodel.to(device)
                name = f"model.layers.{layer}.{linear}"
                float_lin = fmodel.get_submodule(name)
                ids = concat_token_ids(load_texts(data or bundled_data_path("eval")), tok)[:tokens]
                captured = []
                hook = float_lin.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
                try:
                    with torch.no_grad():
                        fmodel(ids[None].to(device))
                finally:
                    hook.remove()
                x = captured[0].reshape(-1, float_lin.in_features).float().cpu()
            else:
                float_lin, x = random_problem(random_in_features, random_out_features, tokens,
                                              outlier_channels, outlier_scale, seed=seed)
                float_lin.to(device)
                name = f"random {random_out_features}x{random_in_features} layer"
            n1, n2 = decompose_dim(float_lin.in_features)
            print(f"{name}: {tuple(float_lin.weight.shape)}, kron {n1}x{n2}; activations {tuple(x.shape)}, "
                  f"max |x| {x.abs().max():.3g}, rms {x.pow(2).mean().sqrt():.3g}")
        '''),
        md('''
            ## Three transforms

            Identity and Hadamard factors come from `flatquant_lab.transforms.orthogonal_factor`. The
            calibrated transform is FlatQuant's (`quantize(..., QuantConfig(method="flatquant"))`)
            on a model truncated after this layer, with every other linear kept in float (`skip`) and
            smoothing off, so that the quantized layer reads exactly the float model's activations.
        '''),
        code('''
            layers = {}  # transform name -> W4A4FlatQuantLinear built from the float layer
            for kind, label in (("identity", "identity (RTN)"), ("hadamard", "Hadamard")):
                left, right = orthogonal_factor(n1, kind, seed), orthogonal_factor(n2, kind, seed + 1)
                layers[label] = fq.W4A4FlatQuantLinear.from_float(float_lin.cpu(), left, right, backend=backend)
            float_lin.to(device)

            if source == "model" and calibrate:
                group = next(g for g, members in GROUPS.items() if linear in members)
                skip = [f"model.layers.{j}.*" for j in range(layer)]
                skip += [f"model.layers.{layer}.{m}" for g, members in GROUPS.items() if g != group for m in members]
                budget = dict(samples=calib_samples, seqlen=calib_seqlen, epochs=calib_epochs)
                if smoke:  # the clip-ratio grid searches cost more than the whole smoke budget
                    budget.update(act_clip_init=4.0, weight_clip_init=4.0)
                cfg = QuantConfig(method="flatquant", profile="fast", smooth=False, skip=tuple(skip), seed=seed, **budget)
                cmodel, ctok = load_model(model, num_layers=layer + 1)
                calib = calibration_ids(calib_data or bundled_data_path("calib"), ctok, cfg.budget("samples"),
                                        cfg.budget("seqlen"), seed=seed)
                fq.quantize(cmodel, cfg, calib, backend=backend)
                layers["FlatQuant (calibrated)"] = cmodel.get_submodule(name).cpu()
                rep = cmodel.flatquant_report["layers"][layer]
                print(f"calibrated {group} transform of layer {layer} in {rep['seconds']:.1f} s; "
                      f"epoch losses {[round(v, 4) for v in rep['epoch_losses']]}, "
                      f"learned clip ratio {rep['clip_ratios'][group]:.3f}")
                del cmodel

            # What the op quantizes: each token times kron(L, R) with the factors the layer holds.
            transformed = {label: kron_apply(x.double(), q.left_trans.double(), q.right_trans.double())
                           for label, q in layers.items()}

            def token_peak_to_rms(v):
                """Mean over tokens of max|v_t| / rms(v_t): 1 is perfectly flat; the int4 grid hates large values."""
                return float((v.abs().amax(-1) / v.pow(2).mean(-1).sqrt().clamp_min(1e-30)).mean())

            flatness = {label: token_peak_to_rms(v) for label, v in transformed.items()}
            pd.Series(flatness, name="per-token max/rms").to_frame()
        '''),
        md('''
            ## Per-channel magnitude before and after

            Each panel plots, per input channel, the largest and the mean `|value|` over the captured
            tokens. Before the transform a few channels tower over the rest; after it the profile is
            flat, so one per-token int4 scale suits every channel.
        '''),
        code('''
            fig, axes = plt.subplots(1, len(transformed), figsize=(4.2 * len(transformed), 3.6), sharey=True,
                                     squeeze=False)
            for ax, (label, v) in zip(axes[0], transformed.items()):
                ch = torch.arange(v.shape[1])
                ax.plot(ch, v.abs().amax(0), lw=0.7, color="tab:red", label="max over tokens")
                ax.plot(ch, v.abs().mean(0), lw=0.7, color="tab:blue", label="mean over tokens")
                ax.set_title(f"{label}\\nper-token max/rms {flatness[label]:.1f}", fontsize=10)
                ax.set_xlabel("input channel")
            axes[0, 0].set_ylabel("|activation|")
            axes[0, 0].legend(loc="upper right", fontsize=8)
            fig.suptitle(f"{name}: per-channel activation magnitude ({x.shape[0]} tokens)", fontsize=11)
            fig.tight_layout()
            if figure_path:
                fq.save_figure(fig, figure_path, dpi=120, bbox_inches="tight")  # atomic: temp file + rename
                print(f"saved {figure_path}")
            plt.show()
        '''),
        md('''
            ## Histograms: activations and weights

            Per transform (columns): the activation values it hands to the int4 quantizer (log
            counts), the float weights it folds to (`fold_weight(W, L, R)`, what gets quantized) and
            the int4 codes the W4A4 layer stores (`weight_int`, -8..7). Flatter inputs to the int4 grid
            use more of its 16 levels.
        '''),
        code('''
            from flatquant_lab.kronecker import fold_weight

            labels = list(layers)
            w = float_lin.weight.detach().cpu()
            fig, axes = plt.subplots(3, len(labels), figsize=(3.8 * len(labels), 8.4), squeeze=False)
            for j, label in enumerate(labels):
                q = layers[label]
                axes[0, j].hist(transformed[label].flatten().numpy(), bins=120, color="tab:blue")
                axes[0, j].set_yscale("log")
                axes[0, j].set_title(f"{label}\\nactivations", fontsize=10)
                folded = fold_weight(w, q.left_trans.double(), q.right_trans.double())
                axes[1, j].hist(folded.flatten().numpy(), bins=120, color="tab:orange")
                axes[1, j].set_title("weights in the transformed basis", fontsize=10)
                codes = torch.bincount(q.weight_int.flatten().long() + 8, minlength=16)
                axes[2, j].bar(torch.arange(-8, 8).numpy(), codes.numpy(), color="tab:green")
                axes[2, j].set_title("int4 weight codes", fontsize=10)
                axes[0, j].set_xlabel("value")
                axes[1, j].set_xlabel("value")
                axes[2, j].set_xlabel("int4 value")
            axes[0, 0].set_ylabel("count (log)")
            axes[1, 0].set_ylabel("count")
            axes[2, 0].set_ylabel("count")
            fig.tight_layout()
            plt.show()
        '''),
        md('''
            ## `check_linear`: the int4 path against its references

            Per transform: (a) the int4 path (`ops.kronecker_quant` + `ops.quant_matmul` on the chosen
            backend) against a float64 dequantized reference, with an error bound of about half an
            output ulp; (b) the int4 path against the float layer (SQNR, cosine, relative error);
            (c) the transform alone at full precision (it must cancel to float64 rounding).
        '''),
        code('''
            reports = {}
            for label, q in tqdm(layers.items(), desc="check_linear"):
                reports[label] = check_linear(q.to(device), x.to(device), float_lin)
            summary = pd.DataFrame({
                label: {"SQNR vs float (dB)": r.sqnr_db, "cosine": r.cosine, "relative error": r.rel_err,
                        "clip ratio": r.clip_ratio, "bound vs dequantized ref holds": r.bound_ok,
                        "max error (output ulps)": r.max_err_ulps, "transform rel. error": r.transform_rel_err}
                for label, r in reports.items()}).T.infer_objects()  # per-column dtypes: tiny errors print as such
            summary
        '''),
        code('''
            best = max(reports, key=lambda k: reports[k].sqnr_db)
            print(f"full report, {best} (highest SQNR):\\n")
            print(reports[best].table())
            if not all(r.bound_ok for r in reports.values()):
                raise AssertionError("check_linear: the int4 path broke its bound against the dequantized reference")
        '''),
        finish_cell("01_numerics"),
    ])


# ------------------------------------------------------------------------------------------ 02
def clip_sweep_notebook():
    return notebook([
        md("""
            # 02 · Activation clip ratio: per-layer sweep, choice, and a tuned checkpoint

            `npu_kronecker_quant` scales each token by `max |b| * c / 7`: a clip ratio `c < 1` clips the
            largest values and gives every other value a finer grid. Each W4A4 layer stores its `c`
            (`clip_ratio`, float32 `[1]`); vllm-ascend loads q/k/v and gate/up as one fused module each,
            so those shards must share one ratio.

            This notebook quantizes the bundled model with fixed Hadamard transforms (all ratios 1.0), or
            loads a saved W4A4 checkpoint of any method (RTN, Hadamard, FlatQuant), then: explores one
            layer interactively (layer, ratio, backend); sweeps every quantized linear over a grid of
            ratios (SQNR heatmap); picks one ratio per fused group; writes them into the checkpoint with
            `set_clip_ratio` and `save_quantized(..., overwrite=True)` (atomic); and measures token
            perplexity before and after.
        """),
        code("""
            model: str = "smollm2-135m"  # float model: alias or local Hugging Face directory
            data = None  # eval text for activations and perplexity (.jsonl or text file); None: bundled eval split
            backend = None  # "npu", "reference", or None: npu on an Ascend host, else reference
            threads = None  # torch CPU threads; None: torch's default (on a busy machine, 1 avoids thrashing)
            smoke: bool = False  # CI size: 2 layers, 3 ratios, a short perplexity slice
            quantized_dir = None  # a saved W4A4 checkpoint of model (any method); None: quantize with method hadamard here
            output_dir = None  # where the tuned checkpoint goes; None: quantized_dir itself, else a temporary folder
            ratios = None  # clip ratios to sweep; None: 1.0 down to 0.6
            tokens: int = 256  # tokens of activations per linear for the sweep
            ppl_windows: int = 8  # token perplexity before/after: this many windows of ppl_window tokens
            ppl_window: int = 512
            figure_path = None  # where to save the heatmap (PNG), e.g. "../docs/img/02_clip_ratio_heatmap.png"
        """, tags=("parameters",)),
        SETUP,
        code("""
            import copy
            import tempfile

            import ipywidgets as widgets
            from IPython.display import display

            from flatquant_lab.recipe import QuantConfig
            from flatquant_lab.data import bundled_data_path, concat_token_ids, load_texts
            from flatquant_lab.eval import token_perplexity
            from flatquant_lab.io import load_quantized, save_quantized
            from flatquant_lab.models import quantized_linear_names
            from flatquant_lab.hub import load_model
            from flatquant_lab.models import GROUPS
            from flatquant_lab.numerics import DEFAULT_RATIOS, check_linear, sweep_layer_clip_ratio

            if isinstance(ratios, str):  # papermill -p passes text; lists go through -y / -f
                raise ValueError(f"ratios: expected a list of floats in (0, 1], got the string {ratios!r}")
            ratios = [float(r) for r in (ratios if ratios is not None else DEFAULT_RATIOS)]
            if not ratios:
                raise ValueError("ratios: expected at least one clip ratio in (0, 1], got none")
            if smoke:
                ratios = ratios[:: max(1, len(ratios) // 3)][:3]
                tokens, ppl_windows, ppl_window = min(tokens, 64), min(ppl_windows, 2), min(ppl_window, 128)
            num_layers = 2 if smoke else None
        """),
        md("""
            ## Models

            The W4A4 model is what gets swept and tuned; the float model is the perplexity reference.
            Each linear is swept on the inputs it sees inside the W4A4 model, against itself with
            unquantized activations (`sweep_layer_clip_ratio`'s default reference:
            `kron_apply(x, L, R) @ W_hat^T`, its own int4 weights). That isolates the error the clip
            ratio trades, and works for any checkpoint: FlatQuant's smoothing is folded into the norms,
            so its layers' inputs are not the float model's, and GPTQ weights are not RTN of the float
            ones.
        """),
        code("""
            if quantized_dir is not None:
                qmodel = load_quantized(quantized_dir, backend=backend)
                num_layers = qmodel.config.num_hidden_layers
                fmodel, tok = load_model(model, num_layers=num_layers)
            else:
                fmodel, tok = load_model(model, num_layers=num_layers)
                qmodel = fq.quantize(copy.deepcopy(fmodel), QuantConfig(method="hadamard"), backend=backend)
            fmodel.to(device)
            qmodel.to(device)
            names = quantized_linear_names(qmodel)
            if not names:
                raise ValueError(f"quantized_dir: {quantized_dir} holds no W4A4 layers")
            print(f"{len(names)} W4A4 linears in {qmodel.config.num_hidden_layers} layers; "
                  f"clip ratios now: {sorted({round(float(qmodel.get_submodule(n).clip_ratio), 4) for n in names})}")
        """),
        code("""
            # Each W4A4 linear's input, recorded by forward pre-hooks while the W4A4 model reads a short text.
            eval_ids = concat_token_ids(load_texts(data or bundled_data_path("eval")), tok)
            acts, hooks = {}, []
            for n in names:
                hooks.append(qmodel.get_submodule(n).register_forward_pre_hook(
                    lambda mod, args, n=n: acts.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]).float())))
            try:
                with torch.no_grad():
                    qmodel(eval_ids[:tokens][None].to(device))
            finally:
                for h in hooks:
                    h.remove()
            print(f"captured {tokens} tokens for each of {len(acts)} linears")
        """),
        md("""
            ## One layer, live

            Pick a layer, a clip ratio and a backend: the readout is that layer's SQNR at the ratio (on a
            copy; the model is not touched) and `check_linear`'s verdict on its int4 path, the curve its
            SQNR over a fine grid of ratios. Run in Jupyter to use the controls; headless (papermill) the
            static readout below the code is what you get.
        """),
        code("""
            grid = [round(float(r), 3) for r in torch.linspace(0.5, 1.0, 6 if smoke else 26)]
            backends = ["reference"] + (["npu"] if on_ascend else [])
            _probes, _curves = {}, {}


            def probe(name, be):
                # A copy of the model's layer on backend be, so that the slider never changes the model.
                if (name, be) not in _probes:
                    q = qmodel.get_submodule(name)
                    _probes[name, be] = fq.W4A4FlatQuantLinear.from_checkpoint(
                        q.checkpoint_tensors(), backend=be, act_dtype=q.act_dtype).to(device)
                return _probes[name, be]


            def sqnr_curve(name, be):
                if (name, be) not in _curves:
                    res = sweep_layer_clip_ratio(probe(name, be), acts[name], grid)
                    _curves[name, be] = [row.sqnr_db for row in res.rows]
                return _curves[name, be]


            def show(name, ratio, be):
                p = probe(name, be)
                p.set_clip_ratio(ratio)
                (row,) = sweep_layer_clip_ratio(p, acts[name], [ratio]).rows
                rep = check_linear(p, acts[name])
                print(f"{name} at clip ratio {ratio:.3f} on {rep.backend}: SQNR {row.sqnr_db:.2f} dB, "
                      f"relative error {row.rel_err:.4f} (against unquantized activations); int4 path within its "
                      f"bound of the dequantized reference: {rep.bound_ok}")
                fig, ax = plt.subplots(figsize=(6.4, 3.0))
                ax.plot(grid, sqnr_curve(name, be), marker=".", label="SQNR vs unquantized activations")
                ax.plot([ratio], [row.sqnr_db], "o", color="tab:red", label=f"clip ratio {ratio:.3f}")
                ax.set_xlabel("activation clip ratio")
                ax.set_ylabel("SQNR (dB)")
                ax.set_title(name, fontsize=10)
                ax.legend(fontsize=8)
                fig.tight_layout()
                plt.show()


            layer_dd = widgets.Dropdown(options=names, value=names[-1], description="layer")
            ratio_sl = widgets.FloatSlider(value=1.0, min=0.5, max=1.0, step=0.01, description="clip ratio",
                                           continuous_update=False, readout_format=".2f")
            backend_dd = widgets.Dropdown(options=backends, value=backend, description="backend")
            print("initial readout (static):")
            show(layer_dd.value, ratio_sl.value, backend_dd.value)
            live = widgets.interactive_output(show, {"name": layer_dd, "ratio": ratio_sl, "be": backend_dd})
            display(widgets.VBox([widgets.HBox([layer_dd, ratio_sl, backend_dd]), live]))
        """),
        md("""
            ## Every linear, every ratio

            `sweep_layer_clip_ratio` per linear: SQNR of the W4A4 layer at each ratio against itself with
            unquantized activations, on that linear's captured inputs (the layer keeps its ratio). One
            panel per linear kind; a dot marks each row's best.
        """),
        code("""
            rows = {}
            for n in tqdm(names, desc="sweep"):
                rows[n] = [row.sqnr_db for row in sweep_layer_clip_ratio(qmodel.get_submodule(n), acts[n], ratios).rows]
            sqnr = pd.DataFrame.from_dict(rows, orient="index", columns=ratios)
            sqnr.columns.name = "clip ratio"

            kinds = [m for members in GROUPS.values() for m in members]
            layer_ids = sorted({int(n.split(".")[2]) for n in names})
            vmin, vmax = float(sqnr.min().min()), float(sqnr.max().max())
            fig, axes = plt.subplots(1, len(kinds), figsize=(2.0 * len(kinds) + 1.2, 1.6 + 0.22 * len(layer_ids)),
                                     sharey=True, squeeze=False, layout="constrained")
            for ax, kind in zip(axes[0], kinds):
                block = sqnr.reindex([f"model.layers.{i}.{kind}" for i in layer_ids])
                im = ax.imshow(block.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                               interpolation="nearest")
                best = block.to_numpy(dtype=float).argmax(1)
                ax.plot(best, range(len(layer_ids)), "o", color="white", markersize=3)
                ax.set_title(kind.split(".")[-1], fontsize=10)
                ax.set_xticks(range(len(ratios)))
                ax.set_xticklabels([f"{r:g}" for r in ratios], rotation=90, fontsize=8)
                ax.set_xlabel("clip ratio", fontsize=9)
            axes[0, 0].set_yticks(range(len(layer_ids)))
            axes[0, 0].set_yticklabels(layer_ids, fontsize=7)
            axes[0, 0].set_ylabel("decoder layer")
            fig.colorbar(im, ax=axes[0].tolist(), label="SQNR vs unquantized activations (dB)", fraction=0.03, pad=0.02)
            fig.suptitle(f"W4A4 SQNR per linear and activation clip ratio ({tokens} tokens each; dot: best)",
                         fontsize=11)
            if figure_path:
                fq.save_figure(fig, figure_path, dpi=120, bbox_inches="tight")  # atomic: temp file + rename
                print(f"saved {figure_path}")
            plt.show()
        """),
        md("""
            ## One ratio per fused group

            q/k/v and gate/up must share one clip ratio (vllm-ascend loads each set as one module), so
            each group takes the ratio with the highest mean SQNR over its members; o_proj and down_proj
            are groups of one.
        """),
        code("""
            choice = {}
            for i in layer_ids:
                for group, members in GROUPS.items():
                    member_names = [f"model.layers.{i}.{m}" for m in members if f"model.layers.{i}.{m}" in rows]
                    if member_names:
                        best = float(sqnr.loc[member_names].mean(axis=0).idxmax())
                        choice.update({n: best for n in member_names})
            at_choice = pd.Series({n: sqnr.loc[n, r] for n, r in choice.items()})
            at_first = sqnr[ratios[0]]
            print(f"mean SQNR over {len(choice)} linears: {at_first.mean():.2f} dB at clip ratio {ratios[0]:g}, "
                  f"{at_choice.mean():.2f} dB at the chosen ratios")
            # layer x group: the ratio each fused module gets
            pd.DataFrame([{g: choice.get(f"model.layers.{i}.{members[0]}") for g, members in GROUPS.items()}
                          for i in layer_ids], index=pd.Index(layer_ids, name="layer"))
        """),
        md("""
            ## Perplexity before and after, and the tuned checkpoint

            Token perplexity (`flatquant_lab.eval.token_perplexity`: the first `ppl_windows`
            windows of `ppl_window` tokens of the eval text) with the ratios as loaded and with the
            chosen ones; the float model for reference. The chosen ratios are set
            on the model with `set_clip_ratio` and saved with `save_quantized(..., overwrite=True)`,
            which writes a temporary folder and renames it into place.
        """),
        code("""
            def ppl(m):
                return token_perplexity(m, tok, data, window=ppl_window, max_windows=ppl_windows)


            ppl_fp = ppl(fmodel)
            ppl_before = ppl(qmodel)
            for n, r in choice.items():
                qmodel.get_submodule(n).set_clip_ratio(r)
            ppl_after = ppl(qmodel)
            pd.DataFrame({"token perplexity": {"float": ppl_fp, "W4A4, ratios as loaded": ppl_before,
                                               "W4A4, chosen ratios": ppl_after}})
        """),
        code("""
            out_dir = output_dir or quantized_dir or os.path.join(tempfile.mkdtemp(prefix="flatquant_02_"), "clip_tuned")
            save_quantized(qmodel, out_dir, tokenizer=tok, overwrite=True)
            reloaded = load_quantized(out_dir, backend=backend)
            stored = {n: float(reloaded.get_submodule(n).clip_ratio) for n in names}
            mismatch = [n for n in names if stored[n] != float(torch.tensor(choice[n], dtype=torch.float32))]
            if mismatch:
                raise AssertionError(f"{out_dir}: clip ratios of {mismatch[:3]} did not round-trip")
            print(f"wrote {out_dir} with {len(set(choice.values()))} distinct clip ratios; "
                  f"perplexity {ppl_before:.2f} -> {ppl_after:.2f} (float {ppl_fp:.2f})")
        """),
        finish_cell("02_clip_ratio_sweep"),
    ])


# ------------------------------------------------------------------------------------------ 03
def lm_eval_notebook():
    return notebook([
        md("""
            # 03 · lm-eval perplexity: float, RTN, Hadamard, FlatQuant, and a model-wide clip ratio

            Word perplexity on the bundled held-out Wikipedia articles (lm-eval task `wiki_fq_eval`,
            offline, through `flatquant_lab.eval.evaluate`) for the float model and for three
            W4A4 checkpoints in the vllm-ascend format: RTN (identity transforms), Hadamard (fixed
            orthogonal Kronecker factors) and FlatQuant (learned transforms, smoothing and clipping).
            Saved checkpoints can be passed in; any that is missing is quantized and saved here.
            Then one checkpoint gets every W4A4 layer's clip ratio overridden to the same `r`, for a
            range of `r` (one value for all layers keeps the fused q/k/v and gate/up shards identical).
        """),
        code("""
            model: str = "smollm2-135m"  # float model: alias or local Hugging Face directory
            backend = None  # "npu", "reference", or None: npu on an Ascend host, else reference
            threads = None  # torch CPU threads; None: torch's default (on a busy machine, 1 avoids thrashing)
            smoke: bool = False  # CI size: 2 layers, 2 documents, 2 ratios, a token calibration budget
            rtn_dir = None  # saved W4A4 checkpoints of model (flatquant-lab quantize); None: quantize here
            hadamard_dir = None
            flatquant_dir = None
            work_dir = None  # where checkpoints quantized here are saved; None: a temporary folder
            profile: str = "fast"  # FlatQuant calibration budget for a checkpoint made here (recipe.PROFILES)
            task: str = "wiki_fq_eval"  # lm-eval perplexity task (the bundled held-out articles)
            limit = None  # evaluate the first limit documents; None: all of them
            docs = None  # or these document indices (lm-eval samples), e.g. [1, 2]; not with limit
            max_length: int = 512  # lm-eval rolling window
            clip_ratios = None  # model-wide clip ratios to sweep; None: 1.0 down to 0.7
            sweep_method: str = "hadamard"  # which checkpoint the sweep runs on: rtn, hadamard or flatquant
            figure_path = None  # where to save the perplexity-vs-clip-ratio plot (PNG)
        """, tags=("parameters",)),
        SETUP,
        code("""
            import logging
            import tempfile

            from flatquant_lab.recipe import PROFILES, QuantConfig
            from flatquant_lab.data import bundled_data_path, calibration_ids, load_texts
            from flatquant_lab.eval import evaluate
            from flatquant_lab.io import load_quantized, save_quantized
            from flatquant_lab.models import linear_weight_bytes, quantized_linear_names
            from flatquant_lab.hub import load_model

            logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-call notes about in-memory models and task kwargs
            METHODS = ("rtn", "hadamard", "flatquant")
            saved = {"rtn": rtn_dir, "hadamard": hadamard_dir, "flatquant": flatquant_dir}
            if sweep_method not in METHODS:
                raise ValueError(f"sweep_method: expected one of {METHODS}, got {sweep_method!r}")
            if profile not in PROFILES:
                raise ValueError(f"profile: expected one of {tuple(PROFILES)}, got {profile!r}")
            for pname, pval in (("clip_ratios", clip_ratios), ("docs", docs)):
                if isinstance(pval, str):  # papermill -p passes text; lists go through -y / -f
                    raise ValueError(f"{pname}: expected a list, got the string {pval!r}")
            clip_ratios = [float(r) for r in (clip_ratios if clip_ratios is not None else (1.0, 0.95, 0.9, 0.85, 0.8, 0.7))]
            if not clip_ratios:
                raise ValueError("clip_ratios: expected at least one clip ratio in (0, 1], got none")
            num_layers = None
            budget = {}
            if smoke:
                num_layers = 2
                if docs is None and limit is None and task == "wiki_fq_eval":
                    # its two shortest articles: whole articles are scored, and the first two hold ~8,000 tokens
                    lengths = [len(t) for t in load_texts(bundled_data_path("eval"))]
                    docs = sorted(sorted(range(len(lengths)), key=lengths.__getitem__)[:2])
                elif docs is None and limit is None:
                    limit = 2
                clip_ratios = clip_ratios[:: max(1, len(clip_ratios) - 1)][:2]  # the two ends
                # a token FlatQuant budget; the clip grid searches alone would outlast the smoke run
                budget = dict(samples=4, seqlen=32, epochs=1, act_clip_init=4.0, weight_clip_init=4.0)
            if docs is not None and limit is not None:
                raise ValueError(f"docs: expected None when limit is given (limit={limit!r}, docs={docs!r}); pick one")
            select = {"samples": {task: [int(i) for i in docs]}} if docs is not None else {"limit": limit}
            docs_label = (f"documents {list(docs)}" if docs is not None else
                          "all documents" if limit is None else f"first {limit} documents")
            work_dir = work_dir or tempfile.mkdtemp(prefix="flatquant_03_")
            print(f"task {task}, {docs_label}, clip ratios {clip_ratios}, checkpoints in {work_dir}")
        """),
        md("""
            ## Checkpoints

            Each missing checkpoint is made with `quantize` and written with `save_quantized`, exactly
            as `flatquant-lab quantize` would; every evaluation below loads it back with
            `load_quantized`, so what is measured is what vllm-ascend would be given.
        """),
        code("""
            fmodel, tok = load_model(model, num_layers=num_layers)
            for method in METHODS:
                if saved[method] is not None:
                    continue
                t0 = time.perf_counter()
                m, _ = load_model(model, num_layers=num_layers)
                cfg = QuantConfig(method=method, profile=profile, **(budget if method == "flatquant" else {}))
                ids = None
                if method == "flatquant":
                    ids = calibration_ids(bundled_data_path("calib"), tok, cfg.budget("samples"), cfg.budget("seqlen"))
                fq.quantize(m, cfg, ids, backend=backend)
                saved[method] = save_quantized(m, os.path.join(work_dir, method), tokenizer=tok, overwrite=True)
                print(f"{method}: quantized and saved to {saved[method]} in {time.perf_counter() - t0:.0f} s")
                del m
            pd.Series({k: str(v) for k, v in saved.items()}, name="checkpoint").to_frame()
        """),
        md("""
            ## Perplexity of each model

            `evaluate` runs lm-eval's `simple_evaluate` on the model in memory (rolling windows of
            `max_length` tokens over each whole document) and returns lm-eval's results dict; the
            task reports word perplexity, byte perplexity and bits per byte.
        """),
        code("""
            def lm_eval_ppl(m):
                res = evaluate(m, tok, tasks=(task,), max_length=max_length, **select)["results"][task]
                return {"word perplexity": res["word_perplexity,none"], "byte perplexity": res["byte_perplexity,none"],
                        "bits per byte": res["bits_per_byte,none"]}


            def load_checkpoint(method):
                m = load_quantized(saved[method], backend=backend).to(device)
                if m.config.num_hidden_layers != fmodel.config.num_hidden_layers:
                    raise ValueError(f"{method}_dir: {saved[method]} has {m.config.num_hidden_layers} layers, "
                                     f"the float model {fmodel.config.num_hidden_layers}; pass checkpoints of {model}"
                                     f"{' (smoke runs keep 2 layers)' if smoke else ''}")
                return m


            results, weight_bytes = {}, {}
            results["float"] = lm_eval_ppl(fmodel.to(device))
            weight_bytes["float"] = linear_weight_bytes(fmodel)
            for method in tqdm(METHODS, desc="checkpoints"):
                m = load_checkpoint(method)
                results[f"W4A4 {method}"] = lm_eval_ppl(m)
                weight_bytes[f"W4A4 {method}"] = linear_weight_bytes(m)
                del m
            pd.DataFrame(results).T
        """),
        md("""
            ## A model-wide clip-ratio override

            Every W4A4 layer of one checkpoint gets `set_clip_ratio(r)`; the rest stays as saved.
        """),
        code("""
            sweep_model = load_checkpoint(sweep_method)
            qnames = quantized_linear_names(sweep_model)
            sweep = {}
            for r in tqdm(clip_ratios, desc="clip ratio"):
                for n in qnames:
                    sweep_model.get_submodule(n).set_clip_ratio(r)
                sweep[r] = lm_eval_ppl(sweep_model)
            del sweep_model
            sweep_df = pd.DataFrame(sweep).T.rename_axis(index="clip ratio")
            sweep_df
        """),
        code("""
            fig, ax = plt.subplots(figsize=(7.0, 4.2))
            ax.plot(sweep_df.index, sweep_df["word perplexity"], marker="o", color="black",
                    label=f"W4A4 {sweep_method}, every layer at clip ratio r")
            styles = {"float": "tab:green", "W4A4 rtn": "tab:red", "W4A4 hadamard": "tab:orange",
                      "W4A4 flatquant": "tab:blue"}
            # A model far above the sweep (W4A4 RTN, typically) would squash it: list it, but off the axes.
            top = 20 * float(sweep_df["word perplexity"].max())
            levels = [float(v) for v in sweep_df["word perplexity"]]
            for name, color in styles.items():
                v = results[name]["word perplexity"]
                how = "" if name == "float" else " (its saved clip ratios)"
                label = f"{name}{how}: {v:.4g}" + (" (above the plot)" if v > top else "")
                if v > top:
                    ax.plot([], [], ls="--", color=color, label=label)
                else:
                    ax.axhline(v, ls="--", color=color, label=label)
                    levels.append(v)
            ax.set_yscale("log")
            ax.set_ylim(min(levels) / 1.5, max(levels) * 1.5)
            ax.set_xticks(list(sweep_df.index))
            ax.set_xlabel("activation clip ratio r (all W4A4 layers)")
            ax.set_ylabel(f"word perplexity, {task} (log)")
            ax.set_title(f"{model}{' (2 layers)' if smoke else ''}: {task} perplexity vs clip ratio ({docs_label})",
                         fontsize=10)
            ax.legend(fontsize=8, loc="best")
            ax.grid(alpha=0.3, which="both")
            fig.tight_layout()
            if figure_path:
                fq.save_figure(fig, figure_path, dpi=120, bbox_inches="tight")  # atomic: temp file + rename
                print(f"saved {figure_path}")
            plt.show()
        """),
        md("""
            ## Results
        """),
        code("""
            rows = dict(results)
            rows.update({f"W4A4 {sweep_method}, all clip ratios {r:g}": v for r, v in sweep.items()})
            table = pd.DataFrame(rows).T
            table["x float"] = table["word perplexity"] / results["float"]["word perplexity"]
            table["linear weights (MiB)"] = pd.Series({k: v / 2**20 for k, v in weight_bytes.items()})
            table.style.format({"word perplexity": "{:.4g}", "byte perplexity": "{:.4f}", "bits per byte": "{:.4f}",
                                "x float": "{:.2f}", "linear weights (MiB)": "{:.1f}"}, na_rep="")
        """),
        finish_cell("03_lm_eval_perplexity"),
    ])


# ------------------------------------------------------------------------------------------ main
NOTEBOOKS = {
    "01_numerics.ipynb": numerics_notebook,
    "02_clip_ratio_sweep.ipynb": clip_sweep_notebook,
    "03_lm_eval_perplexity.ipynb": lm_eval_notebook,
}


def main(argv: list[str]) -> int:
    names = argv or list(NOTEBOOKS)
    for name in names:
        if name not in NOTEBOOKS:
            raise SystemExit(f"notebook: expected one of {list(NOTEBOOKS)}, got {name!r}")
        nb = NOTEBOOKS[name]()
        nbformat.validate(nb)
        # what nbformat.write(nb, path) writes, but atomically: an interrupted run leaves the old file whole
        text = nbformat.writes(nb)
        atomic_write_text(HERE / name, text if text.endswith("\n") else text + "\n")
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
