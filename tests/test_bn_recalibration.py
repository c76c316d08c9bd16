"""BatchNorm recalibration: after averaging, running statistics are recomputed from data."""

from __future__ import annotations

import torch
from conftest import TinyNet

from modelsoups import recalibrate_bn


def test_recalibrate_bn_replaces_stale_statistics() -> None:
    model = TinyNet()
    model.bn.running_mean.fill_(5.0)
    x = torch.randn(16, 3, 6, 6)
    loader = [(x[:8], None), (x[8:], None)]
    recalibrate_bn(model, loader)
    expected = model.conv(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn.running_mean, expected.detach(), atol=1e-4, rtol=1e-4)
