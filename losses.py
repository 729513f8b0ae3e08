"""Segmentation losses, optimisers and the learning-rate schedule.

Losses take ``(logits, target)``: logits (B, 1, H, W) or (B, 1, H, W, D), any real
values; target the same shape, {0, 1} float. ``--loss`` is one term or several joined
by ``+`` (each weighted 1):

- ``bce``     binary cross-entropy on the logits (the seed's loss).
- ``dice``    soft Dice, 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid(logits),
              summed over the whole batch (empty slices do not make it explode).
- ``cldice``  soft clDice (Shit et al., CVPR 2021): soft skeletons by iterated min-pool
              erosion / max-pool dilation; 1 - 2 Tprec Tsens / (Tprec + Tsens) with
              Tprec = |S_p * t| / |S_p|, Tsens = |S_t * p| / |S_t| (each +1 smoothed, so an
              empty skeleton gives a ratio of 1, not 0 / 0). The paper trains with
              ``dice+cldice`` or ``bce+cldice``; ``cldice`` alone ignores thick-vessel volume.

Optimisers: ``sgd`` (seed: momentum 0.9, weight decay 1e-4) and ``adamw``; both with the
seed's per-iteration poly decay lr = lr0 * (1 - it / max_it) ** 0.9.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from train_config import loss_terms

OPTIMIZERS = ("sgd", "adamw")


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if logits.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, H, W, D), got {tuple(logits.shape)}")


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of ``logits`` against ``target`` in {0, 1}, both (B, C, H, W) or
    (B, C, H, W, D) and of one shape, computed in float32 (AMP-safe); a scalar."""
    _check(logits, target)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of sigmoid(``logits``) against ``target``, both (B, C, H, W) or (B, C, H, W, D),
    summed over the whole batch and every channel (one Dice, not a mean of per-image ones);
    ``smooth`` keeps an empty target finite. A scalar in [0, 1]."""
    _check(logits, target)
    p, t = torch.sigmoid(logits.float()), target.float()
    return 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Min-pool over the axis-aligned cross (4- / 6-neighbourhood), as in the clDice code."""
    if x.ndim == 4:
        p1 = -F.max_pool2d(-x, (3, 1), 1, (1, 0))
        p2 = -F.max_pool2d(-x, (1, 3), 1, (0, 1))
        return torch.minimum(p1, p2)
    p1 = -F.max_pool3d(-x, (3, 1, 1), 1, (1, 0, 0))
    p2 = -F.max_pool3d(-x, (1, 3, 1), 1, (0, 1, 0))
    p3 = -F.max_pool3d(-x, (1, 1, 3), 1, (0, 0, 1))
    return torch.minimum(torch.minimum(p1, p2), p3)


def soft_dilate(x: torch.Tensor) -> torch.Tensor:
    """Max-pool over the full 3x3 (3x3x3) neighbourhood."""
    return F.max_pool2d(x, 3, 1, 1) if x.ndim == 4 else F.max_pool3d(x, 3, 1, 1)


def soft_skeleton(x: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Soft skeleton of a probability map x in [0, 1] (B, C, *spatial); same shape.

    ``iterations`` should reach the largest radius (in voxels) to be thinned.
    """
    if x.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, H, W, D), got {tuple(x.shape)}")
    skel = F.relu(x - soft_dilate(soft_erode(x)))
    for _ in range(iterations):
        x = soft_erode(x)
        delta = F.relu(x - soft_dilate(soft_erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def soft_cldice_loss(logits: torch.Tensor, target: torch.Tensor, iterations: int = 5,
                     smooth: float = 1.0) -> torch.Tensor:
    """1 - soft clDice (Shit et al., 2021): the harmonic mean of topology precision (soft skeleton
    of the prediction inside the target) and sensitivity (the target's skeleton inside the
    prediction), over the whole batch; shapes as :func:`soft_dice_loss`; ``iterations`` of the
    soft skeleton should reach the largest vessel radius in voxels. A scalar in [0, 1]."""
    _check(logits, target)
    p, t = torch.sigmoid(logits.float()), target.float()
    skel_p, skel_t = soft_skeleton(p, iterations), soft_skeleton(t, iterations)
    tprec = ((skel_p * t).sum() + smooth) / (skel_p.sum() + smooth)
    tsens = ((skel_t * p).sum() + smooth) / (skel_t.sum() + smooth)
    # both ratios are >= smooth / (sum + smooth) > 0, so the harmonic mean is defined
    return 1.0 - 2.0 * tprec * tsens / (tprec + tsens)


def make_loss(name: str, cldice_iterations: int = 5) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss from ``--loss``: ``bce``, ``dice``, ``cldice`` or a ``+``-joined sum (e.g. ``bce+dice``)."""
    terms = loss_terms(name)
    fns = {
        "bce": bce_loss,
        "dice": soft_dice_loss,
        "cldice": lambda lo, ta: soft_cldice_loss(lo, ta, iterations=cldice_iterations),
    }

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(fns[t](logits, target) for t in terms)

    return loss


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 1e-4,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """The optimiser of ``--optimizer``: ``sgd`` (with ``momentum``) or ``adamw``, both with
    ``weight_decay``; ValueError naming the valid ones for another name."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def poly_scheduler(optimizer: torch.optim.Optimizer, max_iterations: int,
                   power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """Seed's poly decay, stepped once per iteration: lr0 * (1 - it / max_it) ** power."""
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1.0 - it / max_iterations) ** power
    )
