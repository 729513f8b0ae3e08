"""bench/backbone_bench.py: which backbones it times, and a misspelt name."""
from __future__ import annotations

import sys

import pytest
import torch

import networks.registry as registry
from bench import backbone_bench


def test_the_default_list_takes_in_every_2d_plugin(monkeypatch):
    def _plug(in_channels: int, out_channels: int) -> torch.nn.Module:
        return torch.nn.Conv2d(in_channels, out_channels, 1)

    def _plug3d(in_channels: int, out_channels: int) -> torch.nn.Module:
        return torch.nn.Conv3d(in_channels, out_channels, 1)

    for name, fn, dims in (("_tmp_plug", _plug, 2), ("_tmp_plug3d", _plug3d, 3)):
        fn.__module__ = "networks.plugins." + name
        monkeypatch.setitem(registry._REGISTRY, name, registry.ModelSpec(name, fn, dims, "t"))
    names = backbone_bench.default_names()
    assert names[:len(backbone_bench.DEFAULT_NAMES)] == list(backbone_bench.DEFAULT_NAMES)
    assert "_tmp_plug" in names and "_tmp_plug3d" not in names and "unet3d" not in names


def test_a_misspelt_name_lists_the_valid_ones(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["backbone_bench.py", "--names", "unte"])
    with pytest.raises(SystemExit, match="error: unknown backbone 'unte'; valid: .*unet"):
        backbone_bench.main()
