"""Shell-command evaluators: candidates written for them and cleaned up, folders with their
config, failures and timeouts naming the candidate, the {ckpt} placeholder required."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import save_as, tiny_state_dict

from modelsoups.errors import EvaluationError, SoupError
from modelsoups.evaluate import CommandEvaluator
from modelsoups.io import MemoryCheckpoint


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
