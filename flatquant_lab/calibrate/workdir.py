"""Per-layer learned tensors on disk, for resuming an interrupted calibration."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from ..files import atomic_write_bytes, atomic_write_text
from ..recipe import QuantConfig
from .plan import Group
from .state import LayerState


class WorkDir:
    """Per-layer learned tensors on disk, each file written atomically, for resuming a run.

    The files hold each ``LayerState`` as flat tensor names (``LayerState.to_tensors``), as they always have.

    ``run.json`` holds the config's fingerprint and the calibration ids' sha256: a run with another
    config or other data is refused (pass ``ids_sha256=None`` only to read a finished run).
    """

    def __init__(self, path: str, cfg: QuantConfig, num_layers: int, ids_sha256: str | None = None):
        self.path = path
        os.makedirs(path, exist_ok=True)
        meta = os.path.join(path, "run.json")
        fingerprint = json.loads(cfg.fingerprint())
        if os.path.exists(meta):
            with open(meta) as f:
                old = json.load(f)
            if old.get("config") != fingerprint or old.get("num_layers") != num_layers:
                raise ValueError(f"work_dir: {path} holds a run with another configuration; "
                                 "use a fresh directory or the same QuantConfig")
            if ids_sha256 is not None and old.get("calib_ids_sha256") != ids_sha256:
                raise ValueError(f"work_dir: {path} holds a run calibrated on other data (token ids sha256 "
                                 f"{old.get('calib_ids_sha256')}, these are {ids_sha256}); use a fresh directory "
                                 "or the same calibration ids")
        else:
            atomic_write_text(meta, json.dumps({"config": fingerprint, "num_layers": num_layers,
                                                "calib_ids_sha256": ids_sha256}, indent=1))

    def file(self, i: int) -> str:
        return os.path.join(self.path, f"layer_{i:04d}.safetensors")

    def has(self, i: int) -> bool:
        return os.path.exists(self.file(i))

    def load(self, i: int) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Layer ``i``'s learned tensors under their flat names (``attn.left``, ...), on the host, and its losses."""
        t = load_file(self.file(i), device="cpu")
        saved = t.pop("__epoch_losses__", None)
        losses = [] if saved is None else saved.tolist()
        return t, losses

    def load_state(self, i: int, groups: list[Group], device) -> tuple[LayerState, list[float]]:
        """Layer ``i``'s learned state for its ``groups``, on ``device``, and its losses."""
        tensors, losses = self.load(i)
        return LayerState.from_tensors(tensors, groups).to(device), losses

    def save(self, i: int, learned: LayerState, losses: list[float]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in learned.to_tensors().items()}
        tensors["__epoch_losses__"] = torch.tensor(losses, dtype=torch.float64, device="cpu")
        # a unique temp name per write: two runs sharing a work_dir never write into each other's file
        atomic_write_bytes(self.file(i), save_tensors(tensors))
