"""BatchNorm recalibration after averaging.

Averaged running means and variances are not the statistics of the averaged network
(the mean of variances is not the variance of the mean model's activations), so a soup of
BatchNorm networks should re-estimate them on training data before it is scored — as SWA
does (Izmailov et al. 2018, https://arxiv.org/abs/1803.05407), and as the model soups paper
notes for its ResNet experiments (https://arxiv.org/abs/2203.05482, appendix).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["has_batchnorm", "recalibrate_bn"]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_bn(
    model: nn.Module, loader: Iterable[Any], *, device: torch.device | str | None = None
) -> nn.Module:
    """Re-estimate BatchNorm running statistics of `model` on `loader`, in place.

    `loader` yields inputs, or tuples/lists whose first element is the input (as a
    `DataLoader` of `(x, y)` does). Built on `torch.optim.swa_utils.update_bn`; the model's
    train/eval mode is restored afterwards. A model without BatchNorm is left untouched.

    Example:
        >>> recalibrate_bn(load_soup(TinyNet(), soup), train_loader)  # doctest: +SKIP
    """
    if has_batchnorm(model):
        with torch.no_grad():
            dev = torch.device(device) if device is not None else None
            torch.optim.swa_utils.update_bn(loader, model, device=dev)
    return model
