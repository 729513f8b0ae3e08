"""Backbone registry: one name -> one segmentation network.

``build_model(name, in_channels, out_channels, **kw)`` returns an ``nn.Module`` that maps
(B, in_channels, H, W) -> logits (B, out_channels, H, W) for 2-D backbones and
(B, in_channels, H, W, D) -> (B, out_channels, H, W, D) for 3-D ones. Every backbone takes any
input size (networks that need multiples of their down-sampling are padded by
:class:`PadToMultiple` and their logits cropped back).

Names:
- ``unet``            the seed's 2-D U-Net exactly (milesial PyTorch-UNet, ``bilinear=False``,
                      networks.unet.UNet): 31,037,633 parameters for 3 -> 1 channels at the
                      default ``base_channels=64, depth=4``.
- ``unet3d``          the authors' latest release's 3-D U-Net (networks.unet.UNet3D,
                      InstanceNorm, trilinear up-sampling), ``base_channels`` default 16.
- ``unet_bilinear``, ``unet3d_bilinear``  the bilinear U-Net this project called ``unet`` /
                      ``unet3d`` in checkpoint format v1 (networks.unet.BilinearUNet).
- ``attention_unet``  2-D Attention U-Net (MONAI ``AttentionUnet``).
- ``unetpp``          2-D UNet++ (MONAI ``BasicUNetPlusPlus``; its list output is reduced to
                      the full-resolution head).
- ``unext``           2-D UNeXt (Valanarasu and Patel 2022; networks.unext), paper sizes.
- ``transunet``       2-D TransUNet (Chen et al. 2021; networks.transunet), R50-ViT-B/16 sizes.
- ``ynet``            2-D dual-encoder YNet of the authors' latest release (networks.ynet).
- ``monai:<Class>``   any network of ``monai.networks.nets`` through one adapter
                      (:class:`MonaiAdapter`); ``spatial_dims`` is a keyword (default 3).
                      ``list_models()`` lists the ones this project tests.

``resolve_kwargs(name, **kw)`` gives every argument of the builder with its default filled in:
what a checkpoint stores, so a later change of a default does not change an old model.
"""
from __future__ import annotations

import enum
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.transunet import DIVISOR as TRANSUNET_DIVISOR
from networks.transunet import TransUNet
from networks.unet import BilinearUNet, UNet, UNet3D
from networks.unext import DIVISOR as UNEXT_DIVISOR
from networks.unext import UNeXt
from networks.ynet import YNet

log = logging.getLogger(__name__)

MONAI_PREFIX = "monai:"
# MONAI networks the test-suite builds and trains at tiny sizes
TESTED_MONAI = ("AttentionUnet", "BasicUNet", "BasicUNetPlusPlus", "SegResNet", "SwinUNETR", "UNet")
# Input sizes these networks need to be multiples of (their total down-sampling); the
# adapter zero-pads up to it and crops the logits back, so any patch or slice size works.
_DIVISOR = {
    "SwinUNETR": 32,
    "BasicUNet": 16,
    "BasicUNetPlusPlus": 16,
    "SegResNet": 8,
}
MONAI_DEFAULT_SPATIAL_DIMS = 3


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    spatial_dims: int
    doc: str


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, spatial_dims: int) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(in_channels, out_channels, **kw) -> nn.Module`` as ``name``."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if name.startswith(MONAI_PREFIX):
        raise ValueError(f"names starting with {MONAI_PREFIX!r} are reserved for the MONAI adapter")

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, spatial_dims, (builder.__doc__ or "").strip().split("\n")[0])
        return builder

    return deco


PLUGIN_PACKAGE = "networks.plugins"


def _plugin_module(spec: Optional[ModelSpec]) -> Optional[str]:
    """The plug-in module that registered ``spec`` (a partial's function counts), or None."""
    builder = getattr(spec, "builder", None)
    builder = getattr(builder, "func", builder)  # functools.partial
    module = getattr(builder, "__module__", None) or getattr(type(builder), "__module__", "")
    return module if module.startswith(PLUGIN_PACKAGE + ".") else None


def plugin_names(spatial_dims: Optional[int] = None) -> list[str]:
    """The registered backbones a plug-in module defined (of ``spatial_dims`` when given)."""
    return sorted(n for n, spec in _REGISTRY.items()
                  if _plugin_module(spec) and spatial_dims in (None, spec.spatial_dims))


def backbone_source(name: str) -> Optional[dict]:
    """For a backbone registered by a plug-in module (networks/plugins/), {"file": its path from the
    repository root, "sha256": of its source}: a checkpoint keeps it, because the model file carries
    the weights but not that code. None for a built-in or MONAI backbone, or when the module has no
    source file."""
    module = _plugin_module(_REGISTRY.get(name))
    file = getattr(sys.modules.get(module or ""), "__file__", None)
    if not module or not file or not Path(file).is_file():
        return None
    from utils.provenance import file_sha256

    path = Path(file).resolve()
    root = Path(__file__).resolve().parents[1]
    return {"file": path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path),
            "sha256": file_sha256(path)}


def list_models() -> list[str]:
    """Registered names, then the tested ``monai:<Class>`` names (any other MONAI class also builds)."""
    return sorted(_REGISTRY) + [MONAI_PREFIX + c for c in TESTED_MONAI]


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown backbone {name!r}; valid: {', '.join(list_models())} (or any monai:<Class>)")


def _monai_class(name: str) -> type:
    import monai.networks.nets as nets

    cls_name = name[len(MONAI_PREFIX):]
    cls = getattr(nets, cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise _unknown(name)
    return cls


def spatial_dims_of(name: str, **kw: Any) -> int:
    """2 or 3: the dimensionality the backbone ``name`` (built with ``kw``) works in."""
    if name.startswith(MONAI_PREFIX):
        _monai_class(name)
        dims = int(kw.get("spatial_dims", MONAI_DEFAULT_SPATIAL_DIMS))
        if dims not in (2, 3):
            raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {dims}")
        return dims
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name].spatial_dims


def build_model(name: str, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    """Build backbone ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
    if name.startswith(MONAI_PREFIX):
        return MonaiAdapter(name[len(MONAI_PREFIX):], in_channels, out_channels, **kw)
    if name not in _REGISTRY:
        raise _unknown(name)
    try:
        return _REGISTRY[name].builder(in_channels, out_channels, **kw)
    except TypeError as e:
        raise ValueError(f"backbone {name!r}: bad keyword arguments {sorted(kw)} ({e})") from None


def _plain(v: Any) -> bool:
    """True for values a checkpoint can hold and ``torch.load(weights_only=True)`` reads back."""
    if v is None or type(v) in (bool, int, float, str):
        return True
    if type(v) in (list, tuple):
        return all(_plain(x) for x in v)
    if type(v) is dict:
        return all(type(k) is str and _plain(x) for k, x in v.items())
    return False


def _plain_default(v: Any) -> Any:
    """Enum members (MONAI's ``Norm.INSTANCE``...) become their value; other values as they are."""
    return v.value if isinstance(v, enum.Enum) else v


def _as_json(v: Any) -> Any:
    """Tuples as lists, recursively: the form a JSON round trip (--model_kwargs, config.json) gives."""
    if isinstance(v, (list, tuple)):
        return [_as_json(x) for x in v]
    if isinstance(v, dict):
        return {k: _as_json(x) for k, x in v.items()}
    return v


def resolve_kwargs(name: str, **kw: Any) -> dict[str, Any]:
    """Every keyword argument of backbone ``name``'s builder, the given ones and the defaults.

    ``build_model(name, i, o, **resolve_kwargs(name, **kw))`` builds the same network as
    ``build_model(name, i, o, **kw)`` and keeps doing so after a builder's default changes.
    For ``monai:<Class>`` these are the class's constructor arguments (``spatial_dims``
    included, the channel arguments excluded); defaults that are not plain data (a class such
    as SwinUNETR's ``norm_layer``) are left out and stay the class's default.
    Sequences come back as lists (as from JSON), so a checkpoint's arguments compare equal to
    those of ``--model_kwargs``. Unknown keywords raise ``ValueError``.
    """
    if name.startswith(MONAI_PREFIX):
        cls = _monai_class(name)
        out: dict[str, Any] = {"spatial_dims": spatial_dims_of(name, **kw)}
        params = dict(inspect.signature(cls.__init__).parameters)
        skip = {"self", "in_channels", "in_chns", "out_channels", "out_chns", "spatial_dims", "dimensions"}
        if name[len(MONAI_PREFIX):] in ("UNet", "AttentionUnet"):
            kw = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), **kw}
    elif name in _REGISTRY:
        out = {}
        params = dict(list(inspect.signature(_REGISTRY[name].builder).parameters.items())[2:])
        skip = set()
    else:
        raise _unknown(name)
    var_kw = _has_var_kw(params)
    unknown = [k for k in kw if k not in params and k != "spatial_dims" and not var_kw]
    if unknown:
        raise ValueError(f"backbone {name!r}: unknown keyword arguments {unknown}")
    for pname, p in params.items():
        if pname in skip or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if pname in kw:
            out[pname] = kw[pname]
        elif p.default is inspect.Parameter.empty:
            raise ValueError(f"backbone {name!r}: required keyword argument {pname!r} missing")
        elif _plain(_plain_default(p.default)):
            out[pname] = _plain_default(p.default)
        else:
            log.debug("%s: default of %s (%r) is not plain data; not stored", name, pname, p.default)
    out.update({k: v for k, v in kw.items() if k not in out})  # **kwargs of the builder
    return {k: _as_json(v) for k, v in out.items()}


class PadToMultiple(nn.Module):
    """Zero-pad the spatial axes of the input up to a multiple of ``divisor``; crop the output back.

    Input (B, C, *spatial), output of ``net`` (B, C', *padded) -> (B, C', *spatial). Zero is
    the value outside the body after the [0, 400] HU window, so padding adds no edges.
    """

    def __init__(self, net: nn.Module, divisor: int) -> None:
        super().__init__()
        self.net = net
        self.divisor = int(divisor)
        self.average_outputs = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        pad: list[int] = []
        for s in reversed(spatial):
            pad += [0, (-s) % self.divisor]
        y = self.net(F.pad(x, pad) if any(pad) else x)
        if isinstance(y, (list, tuple)):
            # UNet++ with deep supervision: average its full-resolution heads (the paper's
            # ensemble); other tuple outputs (e.g. SegResNetVAE's (logits, loss)): the logits
            y = torch.stack(list(y)).mean(0) if self.average_outputs else y[0]
        if any(pad):
            y = y[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
        return y


class MonaiAdapter(PadToMultiple):
    """Any ``monai.networks.nets.<cls_name>`` behind the registry's calling convention.

    Handles the argument spellings MONAI uses (``in_channels``/``in_chns``,
    ``out_channels``/``out_chns``, ``spatial_dims``/``dimensions``) and supplies defaults
    where a class has required arguments without one (``UNet``/``AttentionUnet``:
    channels (16, 32, 64, 128, 256), strides (2, 2, 2, 2)). ``spatial_dims`` defaults to 3.
    """

    def __init__(self, cls_name: str, in_channels: int, out_channels: int, **kw: Any) -> None:
        name = MONAI_PREFIX + cls_name
        cls = _monai_class(name)
        dims = spatial_dims_of(name, **kw)
        kw = dict(kw)
        kw.pop("spatial_dims", None)
        params = inspect.signature(cls.__init__).parameters
        args: dict[str, Any] = {}
        for keys, value in ((("in_channels", "in_chns"), in_channels), (("out_channels", "out_chns"), out_channels),
                            (("spatial_dims", "dimensions"), dims)):
            key = next((k for k in keys if k in params), None)
            if key is None:
                raise ValueError(f"{name}: cannot adapt, its constructor has none of {keys}")
            args[key] = value
        if cls_name in ("UNet", "AttentionUnet"):
            kw.setdefault("channels", (16, 32, 64, 128, 256))
            kw.setdefault("strides", (2, 2, 2, 2))
        unknown = [k for k in kw if k not in params and not _has_var_kw(params)]
        if unknown:
            raise ValueError(f"{name}: unknown keyword arguments {unknown}")
        try:
            net = cls(**args, **kw)
        except TypeError as e:
            raise ValueError(f"{name}: cannot build with {sorted(kw)} ({e})") from None
        divisor = _DIVISOR.get(cls_name)
        if divisor is None:
            strides = kw.get("strides")
            divisor = _stride_product(strides) if strides is not None else 16
        super().__init__(net, divisor)
        if cls_name == "BasicUNetPlusPlus":
            if kw.get("deep_supervision", False):
                self.average_outputs = True
            else:
                # without deep supervision MONAI computes but discards heads 0_1..0_3: drop
                # their weights, which would never receive a gradient
                for i in (1, 2, 3):
                    setattr(net, f"final_conv_0_{i}", nn.Identity())
        self.spatial_dims = dims
        self.cls_name = cls_name


def _stride_product(strides: Any) -> int:
    """Total down-sampling of a ``strides`` list (ints or per-axis sequences: the largest axis)."""
    total = 1
    for st in strides:
        total *= max(st) if isinstance(st, (list, tuple)) else int(st)
    return total


def _has_var_kw(params: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# --------------------------------------------------------------------------- registered backbones


@register("unet", spatial_dims=2)
def _unet(in_channels: int, out_channels: int, base_channels: int = 64, depth: int = 4) -> nn.Module:
    """The seed's 2-D U-Net (milesial, transposed-conv up-sampling; base 64 as in the seed)."""
    return UNet(in_channels, out_channels, base_channels=base_channels, depth=depth)


@register("unet3d", spatial_dims=3)
def _unet3d(in_channels: int, out_channels: int, base_channels: int = 16, depth: int = 4,
            dropout: float = 0.3) -> nn.Module:
    """3-D U-Net of the authors' latest release (UNet_3D: InstanceNorm, trilinear, dropout 0.3)."""
    return UNet3D(in_channels, out_channels, base_channels=base_channels, depth=depth, dropout=dropout)


@register("unet_bilinear", spatial_dims=2)
def _unet_bilinear(in_channels: int, out_channels: int, base_channels: int = 64, depth: int = 4) -> nn.Module:
    """2-D U-Net with bilinear up-sampling (this project's ``unet`` of checkpoint format v1)."""
    return BilinearUNet(in_channels, out_channels, base_channels=base_channels, depth=depth, spatial_dims=2)


@register("unet3d_bilinear", spatial_dims=3)
def _unet3d_bilinear(in_channels: int, out_channels: int, base_channels: int = 16, depth: int = 4) -> nn.Module:
    """3-D U-Net with trilinear up-sampling and BatchNorm (``unet3d`` of checkpoint format v1)."""
    return BilinearUNet(in_channels, out_channels, base_channels=base_channels, depth=depth, spatial_dims=3)


@register("attention_unet", spatial_dims=2)
def _attention_unet(
    in_channels: int, out_channels: int, channels: tuple[int, ...] = (32, 64, 128, 256, 512), dropout: float = 0.0
) -> nn.Module:
    """2-D Attention U-Net (Oktay et al. 2018; MONAI AttentionUnet), channels default (32..512)."""
    channels = tuple(channels)
    return MonaiAdapter("AttentionUnet", in_channels, out_channels, spatial_dims=2, channels=channels,
                        strides=(2,) * (len(channels) - 1), dropout=dropout)


@register("unetpp", spatial_dims=2)
def _unetpp(in_channels: int, out_channels: int, features: tuple[int, ...] = (32, 32, 64, 128, 256, 32)) -> nn.Module:
    """2-D UNet++ (Zhou et al. 2018; MONAI BasicUNetPlusPlus), full-resolution head only."""
    features = tuple(features)
    return MonaiAdapter("BasicUNetPlusPlus", in_channels, out_channels, spatial_dims=2, features=features)


@register("unext", spatial_dims=2)
def _unext(
    in_channels: int, out_channels: int, channels: tuple[int, ...] = (16, 32, 128),
    embed_dims: tuple[int, ...] = (160, 256), mlp_ratio: float = 1.0, shift_size: int = 5, drop_rate: float = 0.0,
) -> nn.Module:
    """2-D UNeXt (Valanarasu and Patel 2022), paper sizes (1.47M parameters); padded to multiples of 32."""
    net = UNeXt(in_channels, out_channels, channels=channels, embed_dims=embed_dims, mlp_ratio=mlp_ratio,
                shift_size=shift_size, drop_rate=drop_rate)
    return PadToMultiple(net, UNEXT_DIVISOR)


@register("transunet", spatial_dims=2)
def _transunet(
    in_channels: int, out_channels: int, img_size: int = 224, base_channels: int = 64,
    block_units: tuple[int, ...] = (3, 4, 9), hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
    mlp_dim: int = 3072, dropout: float = 0.1, head_channels: int = 512,
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16),
) -> nn.Module:
    """2-D TransUNet (Chen et al. 2021), R50-ViT-B/16 sizes (105.3M parameters); padded to multiples of 16."""
    net = TransUNet(in_channels, out_channels, img_size=img_size, base_channels=base_channels,
                    block_units=block_units, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    mlp_dim=mlp_dim, dropout=dropout, head_channels=head_channels,
                    decoder_channels=decoder_channels)
    return PadToMultiple(net, TRANSUNET_DIVISOR)


@register("ynet", spatial_dims=2)
def _ynet(in_channels: int, out_channels: int, base_channels: int = 16) -> nn.Module:
    """2-D dual-encoder YNet of the authors' latest release (both encoders see the input)."""
    return YNet(in_channels, out_channels, base_channels=base_channels)


def _import_plugins() -> None:
    """Register the backbones of networks/plugins/ (a module dropped there is a new backbone)."""
    import importlib
    import pkgutil

    import networks.plugins as plugins

    for mod in pkgutil.iter_modules(plugins.__path__):
        try:
            importlib.import_module(f"{plugins.__name__}.{mod.name}")
        except Exception as e:  # noqa: BLE001 - one broken plug-in must not stop every command
            first = str(e).splitlines()[0] if str(e) else ""
            log.error("networks/plugins/%s.py: not loaded, its backbones are missing (%s: %s)", mod.name,
                      type(e).__name__, first)


_import_plugins()
