"""Evaluators, score files, the executor, BN recalibration; bad evaluators through the CLI."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TinyNet, save_as, tiny_state_dict
from torch import nn

from modelsoups import LocalExecutor, recalibrate_bn
from modelsoups.cli import main
from modelsoups.errors import EvaluationError, SoupError
from modelsoups.evaluate import (
    CommandEvaluator,
    ModuleEvaluator,
    Score,
    parse_score_line,
    to_score,
)
from modelsoups.io import MemoryCheckpoint, open_checkpoint
from modelsoups.scores import load_scores

# An eval command in plain Python (fast to start): the score is minus the distance of
# fc.weight (float32) to that of a reference checkpoint (run0: the best ingredient).
EVAL = """
import json, struct, sys
def fc(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        a, b = json.loads(f.read(n))["fc.weight"]["data_offsets"]
        f.seek(8 + n + a)
        raw = f.read(b - a)
    return struct.unpack(f"<{len(raw) // 4}f", raw)
d = sum((p - q) ** 2 for p, q in zip(fc(sys.argv[1]), fc(sys.argv[2])))
print("some log line")
print(json.dumps({"score": -d, "distance": d}))
"""


def test_to_score_accepts_numbers_dicts_and_scalar_tensors() -> None:
    assert to_score(0.5, "c") == Score(0.5)
    assert to_score(torch.tensor(0.25), "c") == Score(0.25)
    assert to_score({"score": 1, "loss": 2.0, "note": "x"}, "c") == Score(1.0, {"loss": 2.0})


@pytest.mark.parametrize(
    ("value", "match"),
    [(float("nan"), "not a finite"), (math.inf, "not a finite"), ("0.9", "str"),
     ({"acc": 1.0}, "without a 'score'"), (None, "NoneType"), (True, "bool")],
)  # fmt: skip
def test_to_score_rejects_non_scores_naming_the_candidate(value: object, match: str) -> None:
    with pytest.raises(EvaluationError, match=f"candidate 'soup\\+run3'.*{match}"):
        to_score(value, "soup+run3")


def test_score_line_is_the_last_stdout_line() -> None:
    assert parse_score_line("loading...\n0.75\n\n", "c").score == 0.75
    assert parse_score_line('x\n{"score": 0.5, "top5": 0.9}\n', "c") == Score(0.5, {"top5": 0.9})
    for bad in ("", "accuracy: 0.75", '{"acc": 1}', "[0.5]", "nan"):
        with pytest.raises(EvaluationError, match="candidate 'c'"):
            parse_score_line(bad, "c")


def _command(tmp_path: Path, body: str, timeout: float | None = None) -> CommandEvaluator:
    script = tmp_path / "ev.py"
    script.write_text(body)
    return CommandEvaluator(f"{sys.executable} {script} {{ckpt}}", timeout=timeout,
                            workdir=tmp_path)  # fmt: skip


def test_command_evaluator_writes_in_memory_candidates_and_cleans_up(tmp_path: Path) -> None:
    ev = _command(tmp_path, "import sys, os; print(os.path.getsize(sys.argv[1]) > 0 and 0.5)")
    assert ev.evaluate(MemoryCheckpoint(tiny_state_dict(0)), name="mem").score == 0.5
    assert not list(tmp_path.glob("*soup-candidate-*"))


def test_folder_candidates_come_with_their_config(tmp_path: Path) -> None:
    from modelsoups import greedy_soup

    paths = [save_as(tiny_state_dict(i), tmp_path / f"run{i}", "hf-folder") for i in range(2)]
    script = tmp_path / "ev.py"
    script.write_text("import sys, os; print(float(os.path.exists(sys.argv[1] + '/config.json')"
                      " and os.path.exists(sys.argv[1] + '/model.safetensors')))")  # fmt: skip
    r = greedy_soup(paths, CommandEvaluator(f"{sys.executable} {script} {{ckpt}}",
                                            workdir=tmp_path))  # fmt: skip
    assert [x["held_out"] for x in r.history] == [1.0] * 4


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("import sys; print('Traceback: boom', file=sys.stderr); sys.exit(3)", "code 3: Traceback"),
        ("print('accuracy is high')", "cannot read a score"),
        ("print('nan')", "not a finite"),
        ("print('{\"score\": NaN}')", "not a finite"),
        ("import time; time.sleep(30)", "timed out after 0.5 s"),
    ],
)
def test_command_evaluator_failures_name_the_candidate(tmp_path: Path, body: str, match: str):
    # only the hanging command is meant to time out: a loaded machine may take over 0.5 s to
    # start the others' interpreters
    ev = _command(tmp_path, body, timeout=0.5 if "sleep" in body else 60)
    started = time.perf_counter()
    with pytest.raises(EvaluationError, match=f"candidate 'run7'.*{match}"):
        ev.run(tmp_path / "x.safetensors", "run7")
    assert time.perf_counter() - started < (10 if "sleep" in body else 60)


def test_timeout_kills_the_commands_children(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    ev = CommandEvaluator(f"sleep 1 && touch {marker} # {{ckpt}}", timeout=0.2)
    with pytest.raises(EvaluationError, match="timed out"):
        ev.run(tmp_path / "x", "c")
    time.sleep(1.3)
    assert not marker.exists()


def test_command_must_contain_placeholder() -> None:
    with pytest.raises(SoupError, match="ckpt"):
        CommandEvaluator("python eval.py")


def test_module_evaluator_reuses_one_module() -> None:
    built = []

    def factory() -> nn.Module:
        built.append(1)
        return TinyNet()

    ev = ModuleEvaluator(factory, lambda m: float(m.fc.bias.sum()))
    for i in range(3):
        sd = tiny_state_dict(i)
        assert ev.evaluate(MemoryCheckpoint(sd), name=f"r{i}").score == pytest.approx(
            float(sd["fc.bias"].sum()))  # fmt: skip
    assert len(built) == 1


def test_score_candidate_takes_state_dicts_modules_and_paths(tmp_path: Path) -> None:
    from modelsoups import score_candidate

    sd = tiny_state_dict(0)
    ev = ModuleEvaluator(TinyNet, lambda m: float(m.fc.bias.sum()))
    expected = pytest.approx(float(sd["fc.bias"].sum()))
    model = TinyNet()
    model.load_state_dict(sd)
    path = save_as(sd, tmp_path / "r", "safetensors")
    for candidate in (sd, model, path, str(path)):
        assert score_candidate(ev, candidate).score == expected


def test_module_evaluator_wraps_metric_errors() -> None:
    ev = ModuleEvaluator(TinyNet, lambda m: 1 / 0)
    with pytest.raises(EvaluationError, match=r"candidate 'r0'.*ZeroDivisionError"):
        ev.evaluate(MemoryCheckpoint(tiny_state_dict(0)), name="r0")


def test_load_scores_reads_csv_and_json(tmp_path: Path) -> None:
    names = ["run0", "run1"]
    (tmp_path / "s.csv").write_text("model_name,lr,score\nrun0,0.1,0.5\nrun1,0.2,0.7\n")
    (tmp_path / "t.csv").write_text("name,acc\nrun1,0.7\nrun0,0.5\n")
    (tmp_path / "s.json").write_text('{"run0": 0.5, "run1": {"score": 0.7}}')
    (tmp_path / "p.csv").write_text("path,score\nruns/run0.safetensors,0.5\nrun1.pt,0.7\n")
    (tmp_path / "l.json").write_text('[{"model_name": "run0", "score": 0.5},'
                                     ' {"model_name": "run1", "score": 0.7}]')  # fmt: skip
    for f in ("s.csv", "t.csv", "s.json", "l.json", "p.csv"):
        assert load_scores(tmp_path / f, names) == {"run0": 0.5, "run1": 0.7}


def test_load_scores_missing_or_unknown_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text('{"run0": 0.5, "run9": 0.7}')
    with pytest.raises(SoupError, match=r"no score for ingredient.*run1"):
        load_scores(tmp_path / "s.json", ["run0", "run1"])
    with pytest.raises(SoupError, match=r"unknown ingredient.*run9"):
        load_scores(tmp_path / "s.json", ["run0"])
    with pytest.raises(SoupError, match="cannot read"):
        load_scores(tmp_path / "nope.csv", ["run0"])


def test_local_executor_keeps_order_inline_and_in_processes() -> None:
    assert LocalExecutor(1).map(abs, [-3, 1, -2]) == [3, 1, 2]
    assert LocalExecutor(2).map(abs, [-3, 1, -2]) == [3, 1, 2]
    with pytest.raises(SoupError):
        LocalExecutor(0)


def test_local_executor_in_a_with_block_reuses_its_worker_processes() -> None:
    with LocalExecutor(2) as ex:
        first = ex.map(_pid, [1, 2, 3, 4])
        second = ex.map(_pid, [1, 2, 3, 4])
    assert len(set(first) | set(second)) <= 2  # fresh pools would start new processes
    assert os.getpid() not in first
    assert set(LocalExecutor(2).map(_pid, [1, 2])).isdisjoint(first)  # pool shut down


def test_local_executor_leaving_its_with_block_by_an_error_stops_running_jobs() -> None:
    with pytest.raises(KeyboardInterrupt), LocalExecutor(2) as ex:
        pids = set(ex.map(_pid, [1, 2, 3, 4]))
        threading.Thread(target=_map_quietly, args=(ex,), daemon=True).start()
        time.sleep(1.0)
        raise KeyboardInterrupt  # Ctrl-C while both workers are busy
    assert not any(_alive(p) for p in pids)  # terminated, not left to finish their jobs


ORPHAN = """
import os, sys, time
from modelsoups import LocalExecutor

def pid(_):
    return os.getpid()

if __name__ == "__main__":
    with LocalExecutor(2) as ex:
        print(*set(ex.map(pid, [1, 2, 3, 4])), flush=True)
        ex.map(time.sleep, [600, 600])
"""


@pytest.mark.slow  # spawns workers that import modelsoups
def test_local_executor_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    (tmp_path / "orphan.py").write_text(ORPHAN)
    parent = subprocess.Popen([sys.executable, "orphan.py"], cwd=tmp_path, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert pids
    os.kill(parent.pid, signal.SIGKILL)  # no chance to stop its workers itself
    parent.wait()
    deadline = time.monotonic() + 30
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived their parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _map_quietly(ex: LocalExecutor) -> None:
    with contextlib.suppress(Exception):  # the pool breaks when its workers are terminated
        ex.map(time.sleep, [600, 600])


def _pid(_: int) -> int:
    return os.getpid()


@pytest.mark.slow  # two spawned workers each import torch
def test_ingredients_scored_in_worker_processes_match_inline(tmp_path: Path) -> None:
    from modelsoups import greedy_soup

    paths = _setup(tmp_path, 3)
    ev = CommandEvaluator(f"{sys.executable} {tmp_path / 'ev.py'} {{ckpt}} {paths[0]}")
    inline = greedy_soup(paths, ev)
    pooled = greedy_soup(paths, ev, executor=LocalExecutor(2))
    assert pooled.selected == inline.selected and pooled.history == inline.history


def test_unpicklable_work_is_a_clear_error() -> None:
    with pytest.raises(SoupError, match="module-level functions"):
        LocalExecutor(2).map(lambda x: x, [1, 2])


def test_recalibrate_bn_replaces_stale_statistics() -> None:
    model = TinyNet()
    model.bn.running_mean.fill_(5.0)
    x = torch.randn(16, 3, 6, 6)
    loader = [(x[:8], None), (x[8:], None)]
    recalibrate_bn(model, loader)
    expected = model.conv(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn.running_mean, expected.detach(), atol=1e-4, rtol=1e-4)


def _setup(tmp_path: Path, n: int = 3) -> list[str]:
    paths = [str(save_as(tiny_state_dict(i, noise=0.01 * (i + 1)), tmp_path / f"run{i}",
                         "safetensors")) for i in range(n)]  # fmt: skip
    (tmp_path / "ev.py").write_text(EVAL)
    return paths


def _greedy(tmp_path: Path, paths: list[str], command: str, *extra: str) -> int:
    out = tmp_path / "soup.safetensors"
    return main(["greedy", *paths, "-o", str(out), "--eval", command, "-q", *extra])


@pytest.mark.parametrize(
    ("bad", "match"),
    [("raise SystemExit(2)", "exited with code 2"), ("print('garbage'); sys.exit()", "cannot read"),
     ("print('nan'); sys.exit()", "not a finite"), ("import time; time.sleep(30)", "timed out")],
)  # fmt: skip
def test_bad_evaluator_keeps_history_and_writes_nothing(tmp_path, capsys, bad, match) -> None:
    paths = _setup(tmp_path)
    # the 4th evaluation (the first greedy candidate) fails; ingredient scores are logged
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "import os, sys, pathlib\n"
        f"n = pathlib.Path({str(tmp_path / 'count')!r})\n"
        "k = len(n.read_text()) if n.exists() else 0\n"
        "n.write_text('x' * (k + 1))\n"
        f"if k == 3:\n    {bad}\n"
        f"exec(open({str(tmp_path / 'ev.py')!r}).read())\n"
    )
    ref = paths[0]
    cmd = f"{sys.executable} {flaky} {{ckpt}} {ref}"
    assert _greedy(tmp_path, paths, cmd, "--eval-timeout", "2") == 1
    error = capsys.readouterr().err
    assert match in error and "greedy soup of 1 + run1" in error
    assert not (tmp_path / "soup.safetensors").exists()
    assert not list(tmp_path.glob(".soup*")) and not list(tmp_path.glob("*soup-candidate*"))
    history = tmp_path / "soup.history.jsonl"
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["ingredient"] * 3 + ["greedy"]
    if "exited" not in match:
        return
    # the evaluator works again: --resume evaluates only the two greedy candidates
    (tmp_path / "count").write_text("xxxxx")  # past the failing call
    assert _greedy(tmp_path, paths, cmd, "--resume") == 0
    assert len((tmp_path / "count").read_text()) == 5 + 2
    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert report["selected"][0] == "run0" and sum(report["weights"]) == pytest.approx(1)
    with open_checkpoint(tmp_path / "soup.safetensors") as c:
        assert c.metadata["recipe"] == "greedy"


def test_greedy_cli_with_scores_file_and_workers(tmp_path: Path, capsys) -> None:
    paths = _setup(tmp_path, 3)
    (tmp_path / "scores.csv").write_text("name,score\nrun0,3\nrun1,2\nrun2,1\n")
    cmd = f"{sys.executable} {tmp_path / 'ev.py'} {{ckpt}} {paths[0]}"
    test_cmd = f"{sys.executable} -c 'print(0.25)' {{ckpt}}"
    rc = _greedy(tmp_path, paths, cmd, "--scores", str(tmp_path / "scores.csv"), "--workers", "2",
                 "--test-eval", test_cmd)  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "soup.report.json").read_text())
    assert report["test"] == {"score": 0.25} and report["held_out"] != 0.25
    lines = [json.loads(x) for x in (tmp_path / "soup.history.jsonl").read_text().splitlines()]
    assert all(x.get("given") for x in lines if x["kind"] == "ingredient")
    (tmp_path / "bad.csv").write_text("name,score\nrun0,3\n")
    out2 = tmp_path / "soup2.safetensors"
    assert main(["greedy", *paths, "-o", str(out2), "--eval", cmd,
                 "--scores", str(tmp_path / "bad.csv")]) == 1  # fmt: skip
    assert "no score for ingredient" in capsys.readouterr().err
