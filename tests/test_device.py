"""`device=` on every API that runs a model (learned soup, ModuleEvaluator, predict,
ensemble_logits, recalibrate_bn), and the learned soup's memory estimate and dtype.

CI has no GPU: these run on the CPU device given explicitly, which takes the same code path
as "cuda" (tensors created on and moved to `device`, no `.numpy()` on them)."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, tiny_state_dict
from torch import nn

from modelsoups import ModuleEvaluator, learned_soup, uniform_state_dict
from modelsoups.errors import SoupError
from modelsoups.io import MemoryCheckpoint
from modelsoups.recipes.bn import recalibrate_bn
from modelsoups.recipes.ensemble import ensemble_logits, predict
from modelsoups.recipes.learned import learned_memory

CPU = torch.device("cpu")


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 5, 5, generator=g), torch.randint(0, 7, (4,), generator=g))]


def _ce(model, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_learned_soup_in_bf16_is_the_soup_of_the_bf16_ingredients() -> None:
    """Held in bf16, mixed in float32, rounded once: epochs=0 is the uniform soup of the
    bf16-rounded ingredients, within bf16 rounding; a short run trains like float32."""
    sds = [tiny_state_dict(i) for i in range(3)]
    r = learned_soup(sds, TinyNet(), _ce, _batches(), epochs=0, device=CPU, dtype="bf16")
    rounded = [{k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
                for k, v in sd.items()} for sd in sds]  # fmt: skip
    expected = uniform_state_dict(rounded)
    for k, v in expected.items():
        assert r.state_dict[k].dtype == sds[0][k].dtype and r.state_dict[k].device == CPU
        torch.testing.assert_close(r.state_dict[k], v, rtol=2**-8, atol=1e-6)
    fp32 = learned_soup(sds, TinyNet(), _ce, _batches(), epochs=3, device="cpu")
    bf16 = learned_soup(sds, TinyNet(), _ce, _batches(), epochs=3, device="cpu", dtype="bf16")
    assert isinstance(fp32.coefficients, list) and isinstance(bf16.coefficients, list)
    for a, b in zip(fp32.coefficients, bf16.coefficients, strict=True):
        assert abs(a - b) < 0.02
    assert all(abs(a - b) < 0.05 for a, b in zip(fp32.losses, bf16.losses, strict=True))


def test_learned_soup_refuses_a_job_too_large_and_says_what_fits() -> None:
    sds = [tiny_state_dict(i) for i in range(3)]
    infos = {k: i for k, i in MemoryCheckpoint(sds[0]).infos.items() if k != "decoder.weight"}
    model = TinyNet()  # decoder.weight is tied to embed.weight: held once
    own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    budget = learned_memory(infos, 2, torch.bfloat16, model_bytes=own)
    with pytest.raises(SoupError) as e:
        learned_soup(sds, model, _ce, _batches(), epochs=0, memory=budget)
    line = str(e.value)
    assert "\n" not in line and "3 ingredients held in fp32 needs" in line
    assert "up to 2 ingredients in bf16" in line and "fp32" in line
    # what the message says fits does fit
    r = learned_soup(sds[:2], TinyNet(), _ce, _batches(), epochs=0, dtype="bf16",
                     memory=budget)  # fmt: skip
    assert r.coefficients == [0.5, 0.5]


def test_learned_soup_refuses_an_integer_dtype() -> None:
    with pytest.raises(SoupError, match="fp32, bf16 or fp16"):
        learned_soup([tiny_state_dict(0)], TinyNet(), _ce, _batches(), dtype="fp64")


def test_module_evaluator_predict_ensemble_and_bn_take_a_device() -> None:
    sd = tiny_state_dict(1)
    x = _batches()[0][0]
    seen = []

    def metric(m: nn.Module) -> float:
        seen.append(next(m.parameters()).device)
        return float(m(x.to(CPU)).sum())

    ev = ModuleEvaluator(TinyNet, metric, bn_loader=[x], device=CPU)
    score = ev.evaluate(MemoryCheckpoint(sd), name="a")
    assert seen == [CPU] and torch.isfinite(torch.tensor(score.score))
    logits = predict([sd, tiny_state_dict(2)], TinyNet, [x], device="cpu")
    assert all(t.device == CPU for t in logits)
    mean = ensemble_logits(logits, [0.25, 0.75], device="cpu")
    torch.testing.assert_close(mean, 0.25 * logits[0] + 0.75 * logits[1])
    model = TinyNet()
    model.load_state_dict(sd)
    recalibrate_bn(model, [x], device=CPU)
    assert int(model.bn.num_batches_tracked) == 1
