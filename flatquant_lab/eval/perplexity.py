"""Token perplexity over fixed windows of a document set, outside lm-eval (docs/results.md, 'The first exploration')."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import positive_int

log = logging.getLogger(__name__)

# The first exploration's windowing (docs/results.md): 40 non-overlapping windows of 512 tokens (20,440
# predicted tokens). Its figures came from another split of these pages (held out after page 74; ours is
# articles 75-79 only), so numbers measured here are comparable among themselves, not to its table.
EVAL_WINDOWS = 40


@torch.no_grad()
def token_perplexity(model, tokenizer, docs=None, window: int = 512, max_windows: int | None = EVAL_WINDOWS,
                     batch_size: int = 1) -> float:
    """Perplexity over non-overlapping ``window``-token windows of the concatenated documents.

    ``docs``: what :func:`flatquant_lab.data.load_texts` takes (a jsonl/text path, a list of str, a
    ``datasets.Dataset``); ``None`` means the bundled eval set. Documents are joined with the EOS
    token, the first ``max_windows`` full windows are scored (``None``: all of them; the incomplete
    tail is never scored), and the result is ``exp(mean NLL)`` over every predicted token
    (``window - 1`` per window). The default, 40 windows of 512, is the windowing of
    docs/results.md, 'The first exploration' (on our split of the pages, so not its numbers).
    """
    from ..data import bundled_data_path, concat_token_ids, load_texts

    for name, val in (("window", window), ("batch_size", batch_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (2 if name == "window" else 1):
            raise ValueError(f"{name}: expected an int >= {2 if name == 'window' else 1}, got {val!r}")
    if max_windows is not None:
        positive_int(max_windows, "max_windows", " or None")
    ids = concat_token_ids(load_texts(bundled_data_path("eval") if docs is None else docs), tokenizer)
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"docs: {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None:
        if max_windows > n:
            raise ValueError(f"max_windows: the documents give only {n} windows of {window} tokens, "
                             f"{max_windows} were asked for")
        n = max_windows
    windows = ids[: n * window].view(n, window)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for start in tqdm(range(0, n, batch_size), desc="token perplexity", unit="batch"):
            batch = windows[start:start + batch_size].to(device)
            out = model(input_ids=batch)
            logits = out.logits if hasattr(out, "logits") else out[0]
            # float32 log-softmax: a half-precision model's logits would lose the small probabilities.
            nll += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   batch[:, 1:].reshape(-1), reduction="sum").item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    ppl = math.exp(nll / count)
    log.info("token perplexity %.4f over %d predicted tokens (%d windows of %d)", ppl, count, n, window)
    return ppl


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
