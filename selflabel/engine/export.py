"""Export a backbone to ONNX once per (backbone, weights, input size, torch version), cached atomically.

The graph has one input `x` [batch, 3, H, W] (batch dynamic, H and W fixed: ViT position embeddings
and CNN pooling are traced for that size) and the three outputs every backbone gives: `global`
[B, D], `dense` [B, C, h, w] and `saliency` [B, h, w]. The file lives beside the feature cache in
`<cache root>/engines/`, so a second run, or another run folder, loads it without exporting again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import atomic_path
from ..backbones import Backbone

log = logging.getLogger(__name__)

OPSET = 17
OUTPUTS = ("global", "dense", "saliency")
ENGINES_DIR = "engines"


class _Outputs(nn.Module):
    """The backbone as a module returning a tuple (what the exporter traces)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor):
        out = self.backbone(x)
        return out.global_feat, out.dense, out.saliency


def export_name(backbone: Backbone, height: int, width: int) -> str:
    """File name of the exported graph: everything that changes it is in the name."""
    variant = getattr(backbone, "variant", "")
    ident = (f"{backbone.name}|{backbone.weights_id}|{height}x{width}|torch {torch.__version__}|opset {OPSET}|{variant}"
             f"|{_module_digest(type(backbone))}")
    tag = hashlib.blake2b(ident.encode(), digest_size=6).hexdigest()
    return f"{backbone.name}-{backbone.weights_id}-{height}x{width}-{tag}.onnx"


@functools.lru_cache(maxsize=None)
def _module_digest(cls: type) -> str:
    """Digest of the source file defining `cls`: an edit of a backbone's forward (or of the helpers beside
    it) names a new export instead of serving a stale graph whose parity check was recorded before."""
    try:
        return hashlib.blake2b(Path(inspect.getfile(cls)).read_bytes(), digest_size=6).hexdigest()
    except (OSError, TypeError):
        return "nosource"


@contextlib.contextmanager
def _kept_mode(module: nn.Module):
    """torch.onnx.export leaves the module in training mode (measured: BatchNorm then normalises with batch
    statistics and features drift by up to 3.4): restore the caller's mode and device."""
    was_training = module.training
    try:
        yield
    finally:
        module.train(was_training)


def export_onnx(backbone: Backbone, height: int, width: int, cache_root: str | Path) -> Path:
    """Path of the ONNX graph of `backbone` for H x W inputs, exported now if not cached."""
    path = Path(cache_root) / ENGINES_DIR / export_name(backbone, height, width)
    if path.is_file():
        return path
    example = torch.zeros(2, 3, height, width)
    dyn = {"x": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUTS}}
    params = [p for p in backbone.parameters()]
    device = params[0].device if params else torch.device("cpu")
    wrapped = _Outputs(backbone).to("cpu").eval()
    with atomic_path(path) as tmp, _kept_mode(backbone), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings are not the user's concern
        torch.onnx.export(wrapped, (example,), str(tmp), input_names=["x"], output_names=list(OUTPUTS),
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False)
    backbone.to(device)
    log.info("engine: exported %s (%dx%d) to %s", backbone.name, height, width, path)
    return path
