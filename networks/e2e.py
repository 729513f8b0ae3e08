"""End-to-end salience: the salience module sits inside the network and trains with it.

``E2ESegmenter`` takes the 1-channel image G and returns the backbone's logits:

- 3-D backbone, input (B, 1, H, W, D): the salience module gives S = (S_t, S_c, S_s),
  (B, 3, H, W, D), from the transverse, coronal and sagittal planes of the patch; the
  backbone sees the three gated images G + G * S_i (3 channels), exactly the ``offline``
  input but with S computed (and trained) on the fly.
- 2-D backbone, input (B, 1, H, W): a slice only has its transverse plane, so the module
  gives S_t, (B, 1, H, W), and the backbone sees ONE gated channel G + G * S_t.
  We do not replicate it to three channels: three copies of one map carry no more
  information, and a 1-channel backbone keeps ``in_channels`` honest in the checkpoint.

``build_segmenter`` is the one place a (backbone, salience mode) pair becomes a model;
main.py and networks.checkpoint.load_model both call it, so they cannot disagree.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from dataloaders.inputs import input_channels
from networks.registry import build_model, spatial_dims_of


def _salience_api() -> tuple[type, type]:
    # imported late so the registry and the none/offline modes work without the salience package
    from networks.salience import ResidualGate, SalienceModule

    return SalienceModule, ResidualGate


class E2ESegmenter(nn.Module):
    """Salience module -> residual gate -> backbone (see module docstring for layouts)."""

    def __init__(self, backbone: nn.Module, spatial_dims: int, salience: Optional[nn.Module] = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        salience_module, residual_gate = _salience_api()
        self.spatial_dims = spatial_dims
        self.salience = salience if salience is not None else salience_module()
        self.gate = residual_gate()
        self.backbone = backbone

    def gated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gated input to the backbone, salience S) for an image batch ``x`` (B, 1, *spatial)."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != 1:
            raise ValueError(
                f"e2e {self.spatial_dims}-D model expects (B, 1, {'H, W, D' if self.spatial_dims == 3 else 'H, W'}),"
                f" got {tuple(x.shape)}"
            )
        s = self.salience(x)
        return self.gate(x, s), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.gated(x)[0])


def backbone_in_channels(name: str, salience: str, context: int = 0, **model_kwargs: Any) -> int:
    """Channels the backbone itself receives (after the e2e gate, if any); ``context``: the
    2-D input's neighbouring slices on each side (``--context_slices``)."""
    if context and spatial_dims_of(name, **model_kwargs) != 2:
        raise ValueError(f"--context_slices is for 2-D backbones; {name} is 3-D")
    channels = input_channels(salience, context)  # validates the mode; e2e refuses a context
    if salience == "e2e":
        return 3 if spatial_dims_of(name, **model_kwargs) == 3 else 1
    return channels


def build_segmenter(
    name: str,
    salience: str,
    out_channels: int = 1,
    model_kwargs: Optional[dict] = None,
    head_path: Optional[str] = None,
    context: int = 0,
) -> nn.Module:
    """Model for backbone ``name`` and ``--salience`` mode; input channels per contract 2.

    ``head_path`` (e2e only): initialise the salience head from a fitted head checkpoint
    (``networks.salience.load_head``) instead of at random. ``context``: 2K more input
    channels for the K neighbouring slices on each side (2-D, ``--context_slices``).
    """
    kw = dict(model_kwargs or {})
    backbone = build_model(name, backbone_in_channels(name, salience, context, **kw), out_channels, **kw)
    if salience != "e2e":
        if head_path is not None:
            raise ValueError("--head is only used with --salience e2e")
        return backbone
    module = None
    if head_path is not None:
        salience_module, _ = _salience_api()
        module = salience_module.from_head_file(head_path)
    return E2ESegmenter(backbone, spatial_dims_of(name, **kw), module)
