"""Greedy soup, WiSE-FT, task arithmetic and `soup eval` on LoRA adapter folders, from the CLI.

Three real PEFT adapters of a tiny Llama (r = 4, 8, 4, one rsLoRA, lm_head saved whole).
Outputs are loaded back through PEFT (`PeftModel.from_pretrained` + `merge_and_unload`) and
compared with the float64 reference W₀ + Σ wᵢ·ΔWᵢ (M₀ + Σ wᵢ(Mᵢ − M₀) for lm_head); scores
computed in process through a `PeftModel` are compared with the merged models' scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from lora_models import make_adapter, make_base, reference
from test_lora import assert_matches, peft_merged

from modelsoups.cli import main

peft = pytest.importorskip("peft")

SPECS = [(4, 8.0, False), (8, 16.0, True), (4, 4.0, False)]
TOKENS = [[int(x) for x in torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(s))]
          for s in range(3)]  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-recipes")
    base = make_base(root / "base")
    runs = {f"run{i}": make_adapter(base, root / f"run{i}", r=r, alpha=a, rslora=rs, seed=i + 1)
            for i, (r, a, rs) in enumerate(SPECS)}  # fmt: skip
    data = root / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": t}) + "\n" for t in TOKENS))
    return {"base": base, "data": data, "root": root, **runs}


def scores(capsys: pytest.CaptureFixture[str], *ckpts: Path, data: Path) -> list[float]:
    """`soup eval --metric lm-loss --json` of each checkpoint or adapter folder."""
    capsys.readouterr()
    assert (
        main(["eval", *map(str, ckpts), "--metric", "lm-loss", "--data", str(data), "--json"]) == 0
    )
    return [r["score"] for r in json.loads(capsys.readouterr().out)]


def merged_folder(base: Path, adapter: Path, out: Path) -> Path:
    """The adapter merged into the base by PEFT, saved as a model folder."""
    from transformers import LlamaForCausalLM

    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
    model.merge_and_unload().save_pretrained(out)
    return out


def test_eval_of_adapter_folders_equals_the_score_of_the_merged_models(
    made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [made["run0"], made["run1"]]
    merged = [merged_folder(made["base"], r, tmp_path / r.name) for r in runs]
    got = scores(capsys, *runs, data=made["data"])  # the base comes from adapter_config.json
    want = scores(capsys, *merged, data=made["data"])
    assert got == pytest.approx(want, abs=1e-5)
    assert abs(got[0] - got[1]) > 1e-3  # two different adapters, really loaded each time


def test_greedy_over_adapters_with_a_metric_writes_the_exact_soup_of_the_chosen(
    made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Candidates are scored in a PeftModel over the base, which stays as it was; the output
    is an adapter folder whose PEFT merge is the float64 soup of the chosen adapters, and
    whose score is the one greedy logged."""
    from modelsoups.metrics import peft_model

    runs = [made[f"run{i}"] for i in range(3)]
    out = tmp_path / "greedy"
    args = ["greedy", *map(str, runs), "--metric", "lm-loss", "--data", str(made["data"])]
    assert main([*args, "-o", str(out), "-q"]) == 0
    report = json.loads((tmp_path / "greedy.report.json").read_text())
    chosen = [made[n] for n in report["selected"]]
    want = reference(made["base"], chosen, [1 / len(chosen)] * len(chosen))
    assert_matches(peft_merged(made["base"], out), want)
    assert scores(capsys, out, data=made["data"]) == pytest.approx([report["held_out"]], abs=1e-5)
    ingredient = scores(capsys, *runs, data=made["data"])
    assert [i["held_out"] for i in report["ingredients"]] == pytest.approx(ingredient, abs=1e-5)
    (model,) = peft_model._BASES.values()  # the one live PeftModel: its base is untouched
    live = model.get_base_model().state_dict()
    for name, w in reference(made["base"], [], []).items():
        wrapped = [name.replace(".weight", s) for s in (".base_layer.weight",
                                                        ".original_module.weight")]  # fmt: skip
        key = next(k for k in [name, *wrapped] if k in live)
        torch.testing.assert_close(live[key].double(), w, rtol=0, atol=0, msg=name)


def test_eval_of_an_adapter_after_its_base_was_rewritten_scores_it_on_the_new_base(
    made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The in-process PeftModel is kept for the next candidate only while its base folder
    is the same and unchanged; one base is held at a time, whatever ran before."""
    from modelsoups.metrics import peft_model

    base = make_base(tmp_path / "base")
    run = make_adapter(base, tmp_path / "run", seed=7)
    first = scores(capsys, run, data=made["data"])
    assert len(peft_model._BASES) == 1
    make_base(base, seed=5)  # rewritten in place: same names and shapes, other weights
    again = scores(capsys, run, data=made["data"])
    want = scores(capsys, merged_folder(base, run, tmp_path / "merged"), data=made["data"])
    assert again == pytest.approx(want, abs=1e-5)
    assert abs(again[0] - first[0]) > 1e-3  # (was: the old base's score, from the cache)
    assert len(peft_model._BASES) == 1


EVAL = """import sys, torch, json
from peft import PeftModel
from transformers import LlamaForCausalLM
ckpt, base, data = sys.argv[1:4]
assert (__import__("pathlib").Path(ckpt) / "adapter_config.json").is_file()
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), ckpt)
model = model.merge_and_unload().eval()
total = count = 0.0
with torch.no_grad():
    for line in open(data):
        ids = torch.tensor([json.loads(line)["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
print(-total / count)
"""


def test_greedy_over_adapters_hands_the_eval_command_adapter_folders(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """`{ckpt}` is an adapter folder that PEFT loads; the eval script computing lm-loss
    from it selects what --metric lm-loss selects, with the same scores."""
    script = tmp_path / "eval.py"
    script.write_text(EVAL)
    runs = [str(made[f"run{i}"]) for i in range(3)]
    command = f"{sys.executable} {script} {{ckpt}} {made['base']} {made['data']}"
    by_command, by_metric = tmp_path / "cmd", tmp_path / "metric"
    assert main(["greedy", *runs, "--eval", command, "-o", str(by_command), "-q"]) == 0
    metric = ["--metric", "lm-loss", "--data", str(made["data"])]
    assert main(["greedy", *runs, *metric, "-o", str(by_metric), "-q"]) == 0
    a, b = (json.loads((tmp_path / f"{n}.report.json").read_text()) for n in ("cmd", "metric"))
    assert a["selected"] == b["selected"]
    assert a["held_out"] == pytest.approx(b["held_out"], abs=1e-5)


MERGED_EVAL = """import sys, pathlib
from safetensors.numpy import load_file
ckpt, target = pathlib.Path(sys.argv[1]), load_file(sys.argv[2])
assert (ckpt / "config.json").is_file() and not (ckpt / "adapter_config.json").exists()
model = load_file(ckpt / "model.safetensors")
print(-sum(float(((model[k].astype("f8") - t) ** 2).sum()) for k, t in target.items()))
"""


def test_greedy_merge_into_hands_the_eval_command_merged_models(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """With --merge-into BASE, `{ckpt}` is each candidate merged into the base (a model
    folder with the base's config, no adapter): an eval script scoring closeness to the
    merged soup of runs 0 and 2 gets the float64 reference's scores, greedy keeps those two,
    and the output is their merged soup."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base, runs = made["base"], [made[f"run{i}"] for i in range(3)]
    keys = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    target = reference(base, [runs[0], runs[2]], [0.5, 0.5])
    save_file({k: target[k] for k in keys}, tmp_path / "target.safetensors")
    script = tmp_path / "eval.py"
    script.write_text(MERGED_EVAL)
    command = f"{sys.executable} {script} {{ckpt}} {tmp_path / 'target.safetensors'}"
    out = tmp_path / "merged"
    args = ["greedy", *map(str, runs), "--merge-into", str(base), "--eval", command]
    assert main([*args, "-o", str(out), "-q"]) == 0
    report = json.loads((tmp_path / "merged.report.json").read_text())
    assert sorted(report["selected"]) == ["run0", "run2"]
    for i, ingredient in enumerate(report["ingredients"]):
        alone = reference(base, [runs[i]], [1.0])
        want = -sum(float((alone[k] - target[k]).pow(2).sum()) for k in keys)
        assert ingredient["held_out"] == pytest.approx(want, rel=1e-4)
    assert report["held_out"] == pytest.approx(0.0, abs=1e-6)
    assert_matches(dict(AutoModelForCausalLM.from_pretrained(out).state_dict()), target)


def test_wise_ft_of_base_and_adapter_is_alpha_times_the_adapter_and_sweeps_exactly(
    made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """θ(α) = W₀ + α·ΔW (lm_head: (1 − α)·M₀ + α·M); swept with a metric, α = 0 scores as
    the base model and α = 1 as the adapter."""
    base, run = made["base"], made["run1"]
    out = tmp_path / "wise"
    assert main(["wise-ft", str(base), str(run), "--alpha", "0.3", "-o", str(out), "-q"]) == 0
    assert_matches(peft_merged(base, out), reference(base, [run], [0.3]))
    swept = tmp_path / "wise-sweep"
    metric = ["--metric", "lm-loss", "--data", str(made["data"])]
    args = ["wise-ft", str(base), str(run), "--alphas", "0,0.5,1", *metric]
    assert main([*args, "-o", str(swept), "-q"]) == 0
    report = json.loads((tmp_path / "wise-sweep.report.json").read_text())
    by_alpha = {r["alpha"]: r["held_out"] for r in report["sweep"]}
    assert [by_alpha[0.0], by_alpha[1.0]] == pytest.approx(
        scores(capsys, base, run, data=made["data"]), abs=1e-5
    )
    best = report["alpha"]
    assert_matches(peft_merged(base, swept), reference(base, [run], [best]))


def test_task_arithmetic_of_adapters_adds_their_scaled_updates_to_the_base(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """θ = W₀ + s·Σ ΔWᵢ, lm_head M₀ + s·Σ(Mᵢ − M₀): as an adapter, and merged."""
    from transformers import AutoModelForCausalLM

    base, runs = made["base"], [made["run0"], made["run2"]]
    want = reference(base, runs, [0.7, 0.7])
    out, merged = tmp_path / "ta", tmp_path / "ta-merged"
    args = ["task-arithmetic", *map(str, runs), "--base", str(base), "--scale", "0.7"]
    assert main([*args, "-o", str(out), "-q"]) == 0
    assert_matches(peft_merged(base, out), want)
    assert main([*args, "--merge-into", str(base), "-o", str(merged), "-q"]) == 0
    assert_matches(dict(AutoModelForCausalLM.from_pretrained(merged).state_dict()), want)


def test_two_worker_processes_choose_what_one_process_chooses_over_adapters(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """Adapter candidates sent to `--workers 2` (pickled as paths and keys, their files
    opened in the workers) get the scores and the selection of `--workers 1`."""
    runs = [str(made[f"run{i}"]) for i in range(3)]
    args = ["greedy", *runs, "--metric", "lm-loss", "--data", str(made["data"])]
    reports = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert main([*args, "--workers", workers, "-o", str(out), "-q"]) == 0
        reports.append(json.loads((tmp_path / f"w{workers}.report.json").read_text()))
        assert (out / "adapter_config.json").is_file()
    one, two = reports
    assert one["selected"] == two["selected"]
    got = [i["held_out"] for i in two["ingredients"]]
    assert got == pytest.approx([i["held_out"] for i in one["ingredients"]], abs=1e-6)
    assert len(set(got)) == 3  # three different adapters, really scored
    assert two["held_out"] == pytest.approx(one["held_out"], abs=1e-6)
