"""`lm-eval:TASK`: lm-evaluation-harness tasks scored on the live model equal
`lm_eval.simple_evaluate` on the saved model; local tasks only, offline, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_models import causal_lm
from test_metrics import write_jsonl

from modelsoups.cli import main
from modelsoups.io import open_checkpoint
from modelsoups.metrics import MetricEvaluator

CHOICES = [
    {"q": "the cat sat on a", "choices": [" mat", " tree", " park"], "label": 0},
    {"q": "one two three", "choices": [" four", " red", " no"], "label": 0},
    {"q": "red green", "choices": [" blue", " dog"], "label": 0},
    {"q": "the dog ran to the", "choices": [" park", " mat", " yes"], "label": 0},
    {"q": "a bird sang in the old", "choices": [" tree", " two"], "label": 0},
    {"q": "five six seven", "choices": [" eight", " cat", " maybe"], "label": 0},
]
TEXTS = ["the cat sat on a mat", "one two three four five", "a bird sang in the old tree"]

CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    higher_is_better: true
  - metric: acc_norm
    higher_is_better: true
"""
PPL_TASK = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: texts.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
HUB_TASK = """task: hub_task
dataset_path: Rowan/hellaswag
test_split: validation
output_type: multiple_choice
doc_to_text: "{{ctx}}"
doc_to_choice: "{{endings}}"
doc_to_target: label
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two fine-tunes of a tiny LM and a folder of local task YAMLs (relative data paths)."""
    root = tmp_path_factory.mktemp("lm-eval")
    causal_lm(root / "a", noise_seed=1)
    causal_lm(root / "b", noise_seed=2)
    tasks = root / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "choice.jsonl", CHOICES)
    write_jsonl(tasks / "texts.jsonl", [{"text": t} for t in TEXTS])
    (tasks / "choice.yaml").write_text(CHOICE_TASK)
    (tasks / "ppl.yaml").write_text(PPL_TASK)
    (root / "hub").mkdir()
    (root / "hub" / "hub.yaml").write_text(HUB_TASK)
    return root


def reference(folder: Path, tasks: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """lm_eval.simple_evaluate on the saved folder, as its README shows (model "hf")."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tasks)  # the YAMLs' data paths are relative to their folder
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={folder},device=cpu,dtype=float32,max_length=512",
            tasks=names, task_manager=manager, batch_size=1, bootstrap_iters=0,
        )  # fmt: skip
    assert out is not None
    return out["results"]


def ours(metric: str, job: Path, ckpt: str, **kw: object) -> tuple[float, dict[str, float]]:
    """The score of checkpoint `ckpt` on the live model built from folder `a`."""
    ev = MetricEvaluator(metric, job / "tasks", model=job / "a", device="cpu", **kw)  # type: ignore[arg-type]
    with open_checkpoint(job / ckpt) as c:
        s = ev.evaluate(c, name=ckpt)
    return s.score, s.metrics


def test_lm_eval_score_equals_simple_evaluate_on_the_saved_model(job: Path) -> None:
    # candidate b's tensors are copied into the model built from a: the reference loads b
    score, metrics = ours("lm-eval:tiny_choice,tiny_ppl", job, "b")
    ref = reference(job / "b", job / "tasks", ["tiny_choice", "tiny_ppl"])
    assert score == ref["tiny_choice"]["acc,none"]  # the first task's first metric
    assert 0 < score < 1  # not a degenerate task: the two models' scores can differ
    pairs = [("tiny_choice", "acc"), ("tiny_choice", "acc_norm"),
             ("tiny_ppl", "word_perplexity"), ("tiny_ppl", "bits_per_byte")]  # fmt: skip
    for task, metric in pairs:
        assert metrics[f"{task}/{metric}"] == pytest.approx(ref[task][f"{metric},none"], rel=1e-5)


def test_a_task_yaml_file_is_loaded_by_path(job: Path) -> None:
    ev = MetricEvaluator("lm-eval:tiny_choice", job / "tasks" / "choice.yaml", model=job / "a")
    with open_checkpoint(job / "b") as c:
        assert ev.evaluate(c, name="b").score == ours("lm-eval:tiny_choice", job, "b")[0]


def test_a_lower_is_better_main_metric_is_negated(job: Path) -> None:
    score, metrics = ours("lm-eval:tiny_ppl", job, "a", batch_size=2)
    assert score == -metrics["tiny_ppl/word_perplexity"] < -1


def test_each_candidate_is_scored_on_its_own_weights_in_the_one_live_model(job: Path) -> None:
    ev = MetricEvaluator("lm-eval:tiny_ppl", job / "tasks", model=job / "a", device="cpu")
    scores = []
    for name in ("a", "b", "a"):
        with open_checkpoint(job / name) as c:
            scores.append(ev.evaluate(c, name=name).score)
    assert scores[0] == scores[2] != scores[1]
    ref = reference(job / "b", job / "tasks", ["tiny_ppl"])
    assert -scores[1] == pytest.approx(ref["tiny_ppl"]["word_perplexity,none"], rel=1e-5)


def soup(*args: object) -> int:
    return main([str(a) for a in args])


def test_greedy_with_an_lm_eval_metric_runs_end_to_end_and_reports_it(job: Path) -> None:
    out = job / "soup"
    args = ["--metric", "lm-eval:tiny_ppl", "--data", job / "tasks", "--device", "cpu"]
    assert soup("greedy", job / "a", job / "b", "-o", out, *args) == 0
    report = json.loads((job / "soup.report.json").read_text())
    assert report["selected"]
    scorer = report["scorer"]["held_out"]
    assert (scorer["metric"], scorer["data"]) == ("lm-eval:tiny_ppl", str(job / "tasks"))
    for ing in report["ingredients"]:
        assert ing["held_out"] == pytest.approx(ours("lm-eval:tiny_ppl", job, ing["name"])[0])
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("metric", "data", "says"),
    [
        ("lm-eval:nope", "tasks", "lm-eval task 'nope' is not in"),
        ("lm-eval:", "tasks", "write lm-eval:TASK"),
        ("lm-eval:tiny_ppl,,x", "tasks", "write lm-eval:TASK"),
        ("lm-eval:tiny_ppl", "missing", "not found"),
        ("lm-eval:hub_task", "hub", "lm-eval task 'hub_task': its data needs a download"),
        ("lm-eval:hub_task", "hub/hub.yaml", "its data needs a download"),
        ("lm-eval:tiny_ppl", "tasks/choice.yaml", "it defines tiny_choice"),
        ("lm-eval:tiny_ppl", "tasks/texts.jsonl", "lm-eval tasks are .yaml files"),
    ],
)
def test_bad_lm_eval_input_is_one_line_exit_1(
    job: Path, capsys: pytest.CaptureFixture[str], metric: str, data: str, says: str
) -> None:
    assert soup("eval", job / "a", "--metric", metric, "--data", job / data) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("soup: error: "), err
    assert says in err, err


def test_greedy_over_lm_eval_with_two_workers_equals_one_worker(job: Path, tmp_path: Path) -> None:
    # ingredient scores run in a process pool: each worker builds its own model and tasks
    causal_lm(tmp_path / "c", noise_seed=3)
    inputs = [job / "a", job / "b", tmp_path / "c"]
    args = ["--metric", "lm-eval:tiny_choice,tiny_ppl", "--data", job / "tasks", "--device", "cpu"]
    reports = []
    for workers in (1, 2):
        out = tmp_path / f"soup{workers}"
        assert soup("greedy", *inputs, "-o", out, "--workers", workers, *args) == 0
        reports.append(json.loads((tmp_path / f"soup{workers}.report.json").read_text()))
    one, two = reports
    for key in ("selected", "weights", "held_out", "ingredients"):
        assert one[key] == two[key] is not None, key
    hist = [json.loads(ln) for ln in (tmp_path / "soup2.history.jsonl").read_text().splitlines()]
    assert [r["model_name"] for r in hist if r["kind"] == "ingredient"] == ["a", "b", "c"]
