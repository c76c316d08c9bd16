"""LoRA adapters as ingredients: exact soups checked through real PEFT against float64.

Three real PEFT adapters of a tiny Llama (q_proj/v_proj; r = 4, 8, 4; α = 8, 16, 4; the
second with rsLoRA; lm_head in modules_to_save), all trained tensors randomised.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from lora_models import make_adapter, make_base, reference
from safetensors import safe_open
from safetensors.torch import load_file

from modelsoups.cli import main

peft = pytest.importorskip("peft")

SPECS = [(4, 8.0, False), (8, 16.0, True), (4, 4.0, False)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("lora")
    base = make_base(root / "base")
    made = [
        make_adapter(base, root / f"run{i}", r=r, alpha=a, rslora=rs, seed=i + 1)
        for i, (r, a, rs) in enumerate(SPECS)
    ]
    return base, made


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter loaded into the base by PEFT (no missing/unexpected keys), merged."""
    from transformers import LlamaForCausalLM

    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
    loaded = model.load_adapter(adapter, adapter_name="check")
    assert not loaded.missing_keys and not loaded.unexpected_keys
    return dict(model.merge_and_unload().state_dict())


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal to float32 rounding: each tensor within a few ulps of its largest value."""
    assert got.keys() >= want.keys()
    for k, w in want.items():
        tol = 4 * torch.finfo(torch.float32).eps * float(w.abs().max())
        torch.testing.assert_close(got[k].double(), w, rtol=0, atol=tol, msg=k)


def soup_ba(adapter: Path) -> dict[str, torch.Tensor]:
    """Module -> s·B·A of a saved adapter (float64)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key in t:
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            r = config["rank_pattern"].get(module, config["r"])
            alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
            s = alpha / (math.sqrt(r) if config["use_rslora"] else r)
            out[module] = s * t[key.replace(".lora_A.", ".lora_B.")].double() @ t[key].double()
    return out


@pytest.mark.parametrize(
    ("command", "weights"), [("uniform", [1 / 3] * 3), ("weighted", [0.5, 0.3, 0.2])]
)
def test_exact_adapter_soup_merged_by_peft_equals_the_float64_reference(
    adapters: tuple[Path, list[Path]], tmp_path: Path, command: str, weights: list[float]
) -> None:
    base, runs = adapters
    out = tmp_path / "soup"
    extra = ["--weights", "5,3,2"] if command == "weighted" else []
    assert main([command, *map(str, runs), "-o", str(out), *extra]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (16, 16, False)
    assert_matches(peft_merged(base, out), reference(base, runs, weights))


def test_merge_into_writes_the_full_model_loadable_with_from_pretrained(
    adapters: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base, runs = adapters
    with_tokenizer = tmp_path / "base"  # the base, with tokenizer files to carry over
    shutil.copytree(base, with_tokenizer)
    (with_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    (with_tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = tmp_path / "merged"
    args = ["weighted", *map(str, runs), "--weights", "1,2,1", "--merge-into", str(with_tokenizer)]
    assert main([*args, "-o", str(out)]) == 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (with_tokenizer / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_matches(dict(model.state_dict()), reference(base, runs, [0.25, 0.5, 0.25]))


def test_naive_factor_average_differs_and_the_warning_names_the_error(
    adapters: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, runs = adapters
    exact, naive = tmp_path / "exact", tmp_path / "naive"
    assert main(["uniform", *map(str, runs), "-o", str(exact), "-q"]) == 0
    assert main(["uniform", *map(str, runs), "-o", str(naive), "--lora-average", "factors"]) == 0
    warning = capsys.readouterr().err
    assert "soup: warning: --lora-average factors is not the soup" in warning
    want, got = soup_ba(exact), soup_ba(naive)
    errors = {m: float(torch.linalg.norm(got[m] - want[m]) / torch.linalg.norm(want[m]))
              for m in want}  # fmt: skip
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] > 0.05  # measurably not the soup
    assert f"by {errors[worst]:.3g}" in warning and repr(worst) in warning


def test_rank_sum_of_ranks_is_exact_and_smaller_rank_reports_its_measured_error(
    adapters: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, runs = adapters
    exact = tmp_path / "exact"
    assert main(["uniform", *map(str, runs), "-o", str(exact), "-q"]) == 0
    full, small = tmp_path / "r16", tmp_path / "r6"
    assert main(["uniform", *map(str, runs), "-o", str(full), "--rank", "16", "-q"]) == 0
    assert_matches(peft_merged(base, full), reference(base, runs, [1 / 3] * 3))
    capsys.readouterr()
    assert main(["uniform", *map(str, runs), "-o", str(small), "--rank", "6"]) == 0
    summary = capsys.readouterr().out
    with safe_open(small / "adapter_model.safetensors", "pt") as f:
        reported = json.loads(f.metadata()["lora_errors"])
    want, got = soup_ba(exact), soup_ba(small)
    assert json.loads((small / "adapter_config.json").read_text())["r"] == 6
    for m in want:
        measured = float(torch.linalg.norm(got[m] - want[m]) / torch.linalg.norm(want[m]))
        assert 0.01 < measured == pytest.approx(reported[m], rel=1e-4)
        assert f"{m}: relative error {reported[m]:.3g}" in summary


def test_inspect_shows_each_adapter_and_says_the_set_soups(
    adapters: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, runs = adapters
    assert main(["inspect", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "compatible: 3 LoRA adapter(s) can be souped exactly (output rank 16" in out
    assert out.count("PEFT LoRA adapter, 4 modules") == 3
    for line in (
        "rsLoRA           yes",
        "target modules   q_proj, v_proj",
        "r                8",
        "alpha            16",
        "modules_to_save  lm_head",
        f"base model       {base}",
    ):
        assert line in out


def test_python_uniform_soups_adapters_and_leaves_them_untouched(
    adapters: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    import modelsoups

    _, runs = adapters
    before = [(r / "adapter_model.safetensors").read_bytes() for r in runs]
    result = modelsoups.uniform(runs, tmp_path / "soup")
    assert result.recipe == "uniform" and result.tensors == 9  # 4 modules × (A, B) + lm_head
    with safe_open(tmp_path / "soup" / "adapter_model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["recipe"] == "uniform"
    assert json.loads(meta["weights"]) == pytest.approx([1 / 3] * 3)
    assert before == [(r / "adapter_model.safetensors").read_bytes() for r in runs]


def test_weighted_mean_of_adapter_space_state_dicts_is_the_exact_soup(
    adapters: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    import modelsoups as ms

    base, runs = adapters
    space = ms.AdapterSpace(runs)
    soup = ms.weighted_state_dict(space.state_dicts, [0.5, 0.3, 0.2])
    space.save(soup, tmp_path / "soup")
    assert_matches(peft_merged(base, tmp_path / "soup"), reference(base, runs, [0.5, 0.3, 0.2]))


def test_greedy_soup_of_adapters_scores_candidates_in_a_peft_model_without_touching_the_base(
    adapters: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """Each candidate is loaded into one PeftModel as adapter 'soup'; the base weights stay
    bit-identical, and the chosen soup is the exact soup of the chosen adapters."""
    from transformers import LlamaForCausalLM

    import modelsoups as ms

    base, runs = adapters
    space = ms.AdapterSpace(runs)
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), runs[0])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k
              and "modules_to_save" not in k}  # fmt: skip
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def held_out(state_dict: dict[str, torch.Tensor]) -> float:
        space.load_into(model, state_dict)
        with torch.no_grad():
            return -float(model(input_ids=tokens, labels=tokens).loss)

    result = ms.greedy_soup(space.state_dicts, held_out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    chosen = [runs[i] for i, w in enumerate(result.weights) if w > 0]
    space.save(result.state_dict(), tmp_path / "greedy")
    want = reference(base, chosen, [1 / len(chosen)] * len(chosen))
    assert_matches(peft_merged(base, tmp_path / "greedy"), want)
    assert held_out(result.state_dict()) == pytest.approx(result.score, abs=1e-6)


def test_unnormalised_weights_make_a_task_vector_sum_also_for_modules_to_save(
    adapters: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """Weights summing to 1.5: W₀ + Σ wᵢΔWᵢ, and M₀ + Σ wᵢ(Mᵢ − M₀) for lm_head, whose
    base value comes from --merge-into (CLI) or base= (Python, adapter output)."""
    from transformers import AutoModelForCausalLM

    import modelsoups as ms

    base, runs = adapters
    weights = [0.5, 0.75, 0.25]
    merged = tmp_path / "merged"
    args = ["weighted", *map(str, runs), "--weights", "0.5,0.75,0.25", "--no-normalize"]
    assert main([*args, "--merge-into", str(base), "-o", str(merged), "-q"]) == 0
    want = reference(base, runs, weights)
    assert_matches(dict(AutoModelForCausalLM.from_pretrained(merged).state_dict()), want)
    ms.lora_soup(runs, tmp_path / "adapter", weights=weights, normalize=False, base=base)
    assert_matches(peft_merged(base, tmp_path / "adapter"), want)


NO_PEFT = """import sys
sys.modules["peft"] = None  # `import peft` fails from here on
import modelsoups as ms
from modelsoups.cli import main
*runs, base, out = sys.argv[1:]
assert main(["inspect", *runs]) == 0
assert main(["uniform", *runs, "-o", out + "/soup", "-q"]) == 0
assert main(["uniform", *runs, "--rank", "6", "-o", out + "/r6", "-q"]) == 0
merged = ["--weights", "1,2,1", "--merge-into", base, "-o", out + "/merged", "-q"]
assert main(["weighted", *runs, *merged]) == 0
space = ms.AdapterSpace(runs)
ms.save_adapter(*space.adapter([0.5, 0.5, 0.0]), out + "/mix")
print(sorted(m for m in sys.modules if m.split(".")[0] == "peft" and sys.modules[m]))
"""


def test_adapters_are_read_and_written_without_peft(
    adapters: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """inspect, the exact soup, --rank, --merge-into and AdapterSpace in a process where
    `import peft` fails, a `.bin` adapter among the inputs; PEFT (here) loads the results."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    base, runs = adapters
    as_bin = tmp_path / "run2-bin"
    as_bin.mkdir()
    torch.save(load_file(runs[2] / "adapter_model.safetensors"), as_bin / "adapter_model.bin")
    shutil.copy(runs[2] / "adapter_config.json", as_bin)
    inputs = [*map(str, runs[:2]), str(as_bin)]
    done = subprocess.run([sys.executable, "-c", NO_PEFT, *inputs, str(base), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"  # no peft module was imported
    assert_matches(peft_merged(base, tmp_path / "soup"), reference(base, runs, [1 / 3] * 3))
    assert_matches(peft_merged(base, tmp_path / "mix"), reference(base, runs[:2], [0.5, 0.5]))
    peft_merged(base, tmp_path / "r6")  # loads: no missing or unexpected keys
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert_matches(dict(merged), reference(base, runs, [0.25, 0.5, 0.25]))
