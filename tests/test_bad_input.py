"""The bad-input battery: every way a soup can be asked to do something wrong.

One case per row of `CASES`. Each case builds its inputs in a fresh folder and runs the
`soup` CLI in-process; every case must end (harness: battery.py) with:

- exit code 1,
- exactly one line on stderr, `soup: error: ...`, naming the culprit file (and tensor where
  there is one), and no Python warning,
- no output and no temporary file: the folder holds exactly the files it held before,
- every input byte-for-byte unchanged (sha256).

A few cases also run through a real `soup` subprocess, and the allowed-but-odd inputs (one
ingredient, `--allow-nonfinite`, `--unsafe-pickle` on a trusted file) are checked to pass.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from battery import Case, Ctx, Maker, Setup, read_only_folder, run_case, run_subprocess_case
from conftest import save_as, tiny_state_dict
from safetensors.torch import load_file, save_file

from modelsoups.cli import main
from modelsoups.dtypes import DTYPES

# ---------------------------------------------------------------------------------------
# Helpers that break safetensors files in precise ways.


def read_st(path: Path) -> tuple[dict[str, object], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: dict[str, object] | bytes, data: bytes) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def tensors_of(header: dict[str, object]) -> list[str]:
    """Tensor names in data order."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])  # type: ignore[index]


def edit_header(path: Path, edit: Callable[[dict[str, object]], None]) -> None:
    header, data = read_st(path)
    edit(header)
    write_st(path, header, data)


def uniform(*paths: Path | str, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["uniform", *map(str, paths), "-o", str(out), *extra]


# ---------------------------------------------------------------------------------------
# Case builders: one per bad input. Each breaks the *second* ingredient unless told.


def truncated_header(c: Ctx) -> Setup:
    a, b = c.make(2)
    b.write_bytes(b.read_bytes()[:40])  # cut inside the JSON header
    return Setup(uniform(a, b, out=c.out), [str(b), "header length"])


def truncated_data(c: Ctx) -> Setup:
    a, b = c.make(2)
    header, _ = read_st(b)
    last = tensors_of(header)[-1]
    b.write_bytes(b.read_bytes()[:-3])
    return Setup(uniform(a, b, out=c.out), [str(b), repr(last), "truncated"])


def offsets_overlap(c: Ctx) -> Setup:
    a, b = c.make(2)
    header, data = read_st(b)
    # Two tensors of the same size: point the second at the first one's bytes.
    first, second = "bn.weight", "bn.bias"
    header[second]["data_offsets"] = header[first]["data_offsets"]  # type: ignore[index]
    write_st(b, header, data)
    return Setup(uniform(a, b, out=c.out), [str(b), "overlap"])


def offsets_past_end(c: Ctx) -> Setup:
    a, b = c.make(2)
    header, data = read_st(b)
    name = tensors_of(header)[0]
    begin, end = header[name]["data_offsets"]  # type: ignore[index]
    shift = len(data)
    header[name]["data_offsets"] = [begin + shift, end + shift]  # type: ignore[index]
    write_st(b, header, data)
    return Setup(uniform(a, b, out=c.out), [str(b), repr(name), "truncated"])


def header_length_too_large(c: Ctx) -> Setup:
    a, b = c.make(2)
    raw = b.read_bytes()
    b.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])
    return Setup(uniform(a, b, out=c.out), [str(b), "larger than the file"])


def invalid_json(c: Ctx) -> Setup:
    a, b = c.make(2)
    _, data = read_st(b)
    write_st(b, b'{"conv.weight": {"dtype": "F32", "shape": [4, 3', data)
    return Setup(uniform(a, b, out=c.out), [str(b), "invalid JSON"])


def header_not_object(c: Ctx) -> Setup:
    a, b = c.make(2)
    _, data = read_st(b)
    write_st(b, b'["conv.weight", "bn.weight"]', data)
    return Setup(uniform(a, b, out=c.out), [str(b), "not a JSON object"])


def unknown_dtype(c: Ctx) -> Setup:
    a, b = c.make(2)
    edit_header(b, lambda h: h["fc.bias"].update(dtype="F7"))  # type: ignore[attr-defined]
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.bias'", "'F7'"])


def offsets_wrong_size(c: Ctx) -> Setup:
    a, b = c.make(2)
    edit_header(b, lambda h: h["fc.bias"].update(shape=[6]))  # type: ignore[attr-defined]
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.bias'", "data_offsets"])


def zero_byte_safetensors(c: Ctx) -> Setup:
    a, b = c.make(2)
    b.write_bytes(b"")
    return Setup(uniform(a, b, out=c.out), [str(b), "0 bytes"])


def zero_byte_pickle(c: Ctx) -> Setup:
    a, b = c.make(2, "pt")
    b.write_bytes(b"")
    return Setup(uniform(a, b, out=c.out), [str(b), "0 bytes"])


def garbage_pickle(c: Ctx) -> Setup:
    a, b = c.make(2, "pt")
    b.write_bytes(b"this is not a checkpoint\n" * 10)
    return Setup(uniform(a, b, out=c.out), [str(b), "not a"])


def missing_input(c: Ctx) -> Setup:
    (a,) = c.make(1)
    ghost = c.tmp / "ghost.safetensors"
    return Setup(uniform(a, ghost, out=c.out), [str(ghost), "no such file"])


def glob_matches_nothing(c: Ctx) -> Setup:
    (a,) = c.make(1)
    pattern = str(c.tmp / "nothing-*.safetensors")
    return Setup(uniform(a, pattern, out=c.out), [pattern, "matches no file"])


def folder_without_checkpoint(c: Ctx) -> Setup:
    (a,) = c.make(1)
    empty = c.tmp / "empty-run"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    return Setup(uniform(a, empty, out=c.out), [str(empty), "no checkpoint"])


def index_missing_shard(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    (b / "model-00002-of-00002.safetensors").unlink()
    index = b / "model.safetensors.index.json"
    return Setup(
        uniform(a, b, out=c.out), [str(index), "'model-00002-of-00002.safetensors'", "missing"]
    )


def shard_tensor_not_in_index(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = b / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["fc.bias"]
    index.write_text(json.dumps(data))
    shard = b / "model-00002-of-00002.safetensors"
    return Setup(uniform(a, b, out=c.out), [str(shard), "'fc.bias'", "not listed"])


def index_tensor_not_in_shard(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = b / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["head.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    return Setup(uniform(a, b, out=c.out), ["model-00001-of-00002.safetensors", "'head.weight'"])


def index_escapes_folder(c: Ctx) -> Setup:
    """An index naming a file outside its folder: the soup must not read (and publish)
    someone else's file."""
    a, b = c.make(2, "hf-sharded")
    index = b / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    outside = str(a / "model-00002-of-00002.safetensors")
    for k, v in data["weight_map"].items():
        if v == "model-00002-of-00002.safetensors":
            data["weight_map"][k] = f"../{a.name}/model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    assert Path(outside).exists()
    return Setup(uniform(a, b, out=c.out), [str(index), "outside the model folder"])


def index_invalid_json(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = b / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"conv.weight": ')
    return Setup(uniform(a, b, out=c.out), [str(index), "not a valid shard index"])


def _modify(c: Ctx, edit: Callable[[dict[str, torch.Tensor]], None], fmt: str = "st") -> Path:
    """Save run1 with `edit` applied to its state dict; return its path."""
    sd = {k: v.clone() for k, v in tiny_state_dict(1).items()}
    edit(sd)
    path = c.tmp / "edited"
    return save_as(sd, path, "safetensors" if fmt == "st" else fmt)


def shape_mismatch(c: Ctx) -> Setup:
    (a,) = c.make(1)
    b = _modify(c, lambda sd: sd.update({"fc.bias": torch.zeros(6)}))
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.bias'", "shape"])


def missing_key(c: Ctx) -> Setup:
    (a,) = c.make(1)
    b = _modify(c, lambda sd: sd.pop("fc.bias"))
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.bias'", "missing"])


def extra_key(c: Ctx) -> Setup:
    (a,) = c.make(1)
    b = _modify(c, lambda sd: sd.update({"head.weight": torch.zeros(3)}))
    return Setup(uniform(a, b, out=c.out), [str(b), "'head.weight'", "extra"])


def integer_buffers_differ(c: Ctx) -> Setup:
    (a,) = c.make(1)
    b = _modify(c, lambda sd: sd["bn.num_batches_tracked"].fill_(11))
    return Setup(uniform(a, b, out=c.out), [str(b), "'bn.num_batches_tracked'", "differs"])


def float_vs_integer(c: Ctx) -> Setup:
    (a,) = c.make(1)
    b = _modify(c, lambda sd: sd.update({"fc.bias": torch.arange(5, dtype=torch.int64)}))
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.bias'", "floating"])


def nan_weight(c: Ctx) -> Setup:
    (a,) = c.make(1)
    b = _modify(c, lambda sd: sd["fc.weight"].__setitem__((2, 1), float("nan")))
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.weight'", "--allow-nonfinite"])


def nan_in_float8(c: Ctx) -> Setup:
    a, b = c.tmp / "a.safetensors", c.tmp / "b.safetensors"
    save_file({"w": torch.ones(3).to(torch.float8_e4m3fn)}, a)
    save_file({"w": torch.tensor([1.0, float("nan"), 2.0]).to(torch.float8_e4m3fn)}, b)
    return Setup(uniform(a, b, out=c.out), [str(b), "'w'", "NaN or Inf"])


def overflow_in_output_dtype(c: Ctx) -> Setup:
    """Finite in float32, Inf once written as fp16 (max 65504)."""
    (a,) = c.make(1)
    b = _modify(c, lambda sd: sd["fc.weight"].__setitem__((0, 0), 3e5))
    argv = uniform(a, b, out=c.out, extra=("--dtype", "fp16"))
    return Setup(argv, [f"{c.out}: tensor 'fc.weight'", "overflows float16"])


def inf_weight(c: Ctx) -> Setup:
    (a,) = c.make(1)
    b = _modify(c, lambda sd: sd["conv.bias"].__setitem__(0, float("-inf")))
    return Setup(uniform(a, b, out=c.out), [str(b), "'conv.bias'", "NaN or Inf"])


class _Payload:
    """Unpickling this creates `marker`: proof that the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def malicious_pickle_path(tmp: Path) -> tuple[Path, Path]:
    """A training checkpoint whose weights are fine but which runs code when unpickled."""
    marker = tmp / "PWNED"
    path = tmp / "evil.pt"
    torch.save({"state_dict": tiny_state_dict(1), "optimizer": _Payload(marker)}, path)
    return path, marker


def malicious_legacy_pickle(c: Ctx) -> Setup:
    """The pre-1.6 (non-zip) format goes through another torch.load path: same refusal."""
    a, _ = c.make(2, "pt")
    evil = c.tmp / "legacy.pt"
    state = {"state_dict": tiny_state_dict(1), "optimizer": _Payload(c.tmp / "PWNED")}
    torch.save(state, evil, _use_new_zipfile_serialization=False)
    return Setup(uniform(a, evil, out=c.out), [str(evil), "--unsafe-pickle"])


def malicious_folder_bin(c: Ctx) -> Setup:
    """A Hugging Face folder whose pytorch_model.bin runs code."""
    a, b = c.make(2, "bin-folder")
    state = {"state_dict": tiny_state_dict(1), "optimizer": _Payload(c.tmp / "PWNED")}
    torch.save(state, b / "pytorch_model.bin")
    return Setup(uniform(a, b, out=c.out), [str(b / "pytorch_model.bin"), "--unsafe-pickle"])


def inspect_truncated(c: Ctx) -> Setup:
    a, b = c.make(2)
    b.write_bytes(b.read_bytes()[:100])
    return Setup(["inspect", str(a), str(b)], [str(b), "truncated"])


def malicious_pickle(c: Ctx) -> Setup:
    a, _ = c.make(2, "pt")
    evil, _ = malicious_pickle_path(c.tmp)
    return Setup(uniform(a, evil, out=c.out), [str(evil), "--unsafe-pickle"])


def pickle_not_a_dict(c: Ctx) -> Setup:
    (a,) = c.make(1, "pt")
    b = c.tmp / "list.pt"
    torch.save(list(tiny_state_dict(1).values()), b)
    return Setup(uniform(a, b, out=c.out), [str(b), "list", "not a dict"])


def pickle_non_tensor_entry(c: Ctx) -> Setup:
    (a,) = c.make(1, "pt")
    b = c.tmp / "mixed.pt"
    torch.save({**tiny_state_dict(1), "epoch": 3}, b)
    return Setup(uniform(a, b, out=c.out), [str(b), "'epoch'", "--key"])


def pickle_ambiguous_nested(c: Ctx) -> Setup:
    (a,) = c.make(1, "pt")
    b = c.tmp / "two.pt"
    torch.save({"model": tiny_state_dict(1), "ema": tiny_state_dict(2)}, b)
    return Setup(uniform(a, b, out=c.out), [str(b), "'model'", "--key"])


def pickle_broadcast_bomb(c: Ctx) -> Setup:
    """2 KB on disk, 64 MB once averaged: a saved `expand` view."""
    (a,) = c.make(1, "pt")
    b = c.tmp / "bomb.pt"
    torch.save({**tiny_state_dict(1), "fc.bias": torch.zeros(1).expand(4096, 4096)}, b)
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.bias'", "declares"])


def pickle_missing_key(c: Ctx) -> Setup:
    a, b = c.make(2, "pt")
    return Setup(uniform(a, b, out=c.out, extra=("--key", "ema")), [str(a), "'ema'"])


def wrapper_prefix_collision(c: Ctx) -> Setup:
    (a,) = c.make(1)
    sd = tiny_state_dict(1)
    b = _modify(c, lambda sd2: sd2.update({"module.fc.bias": sd["fc.bias"].clone()}))
    return Setup(uniform(a, b, out=c.out), [str(b), "'module.fc.bias'"])


def output_is_input(c: Ctx) -> Setup:
    a, b = c.make(2)
    return Setup(uniform(a, b, out=b, extra=("--overwrite",)), [str(b), "input"], out=b)


def output_inside_input_folder(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-folder")
    out = b / "soup.safetensors"
    return Setup(uniform(a, b, out=out), [str(out), "input"], out=out)


def output_exists(c: Ctx) -> Setup:
    a, b = c.make(2)
    c.out.write_bytes(b"precious")  # must survive untouched
    return Setup(uniform(a, b, out=c.out), [str(c.out), "--overwrite"], out=c.out)


def output_folder_missing(c: Ctx) -> Setup:
    a, b = c.make(2)
    out = c.tmp / "no-such-dir" / "soup.safetensors"
    return Setup(uniform(a, b, out=out), [str(out), "does not exist"], out=out)


def output_folder_read_only(c: Ctx) -> Setup:
    a, b = c.make(2)
    ro = read_only_folder(c.tmp / "ro", c.stack)
    out = ro / "soup.safetensors"
    return Setup(uniform(a, b, out=out), [str(out), "cannot write"], out=out)


def output_pickle_suffix(c: Ctx) -> Setup:
    a, b = c.make(2)
    out = c.tmp / "soup.pt"
    return Setup(uniform(a, b, out=out), [str(out), "safetensors"], out=out)


def weights_count_mismatch(c: Ctx) -> Setup:
    a, b, d = c.make(3)
    argv = ["weighted", str(a), str(b), str(d), "--weights", "0.5,0.5", "-o", str(c.out)]
    return Setup(argv, ["2 weights for 3 ingredients"])


def weights_negative(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["weighted", str(a), str(b), "--weights", "1.5,-0.5", "-o", str(c.out)]
    return Setup(argv, ["negative", "--allow-negative"])


def weights_sum_to_zero(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["weighted", str(a), str(b), "--allow-negative", "--weights", "1,-1", "-o", str(c.out)]
    return Setup(argv, ["sum to 0"])


def weights_not_numbers(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["weighted", str(a), str(b), "--weights", "0.5,half", "-o", str(c.out)]
    return Setup(argv, ["'0.5,half'"])


def weights_not_finite(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["weighted", str(a), str(b), "--weights", "0.5,nan", "-o", str(c.out)]
    return Setup(argv, ["finite"])


def shard_size_with_file_output(c: Ctx) -> Setup:
    a, b = c.make(2)
    return Setup(uniform(a, b, out=c.out, extra=("--max-shard-size", "1KB")), ["--max-shard-size"])


def unknown_output_dtype(c: Ctx) -> Setup:
    a, b = c.make(2)
    return Setup(uniform(a, b, out=c.out, extra=("--dtype", "fp12")), ["'fp12'"])


def greedy(c: Ctx, command: str, *extra: str, n: int = 2) -> Setup:
    paths = c.make(n)
    argv = ["greedy", *map(str, paths), "-o", str(c.out), "--eval", command, *extra]
    return Setup(argv, ["candidate 'run0'"], keeps=["soup.history.jsonl"])


def eval_crashes(c: Ctx) -> Setup:
    setup = greedy(c, "echo 'Traceback: boom' >&2; exit 3; : {ckpt}")
    setup.names += ["exited with code 3", "boom"]
    return setup


def eval_crashes_on_a_soup(c: Ctx) -> Setup:
    """Ingredients score fine; the first greedy candidate (a temporary file) crashes."""
    command = 'case "$SOUP_CANDIDATE" in greedy*) exit 4;; esac; echo 1; : {ckpt}'
    setup = greedy(c, command)
    setup.names = ["candidate 'greedy soup of 1 + run1'", "exited with code 4"]
    return setup


def eval_hangs(c: Ctx) -> Setup:
    setup = greedy(c, "sleep 60; : {ckpt}", "--eval-timeout", "0.5")
    setup.names += ["timed out after 0.5 s"]
    return setup


def eval_prints_garbage(c: Ctx) -> Setup:
    setup = greedy(c, "echo 'accuracy: high'; : {ckpt}")
    setup.names += ["cannot read a score", "'accuracy: high'"]
    return setup


def eval_prints_nan(c: Ctx) -> Setup:
    setup = greedy(c, "echo nan; : {ckpt}")
    setup.names += ["not a finite score"]
    return setup


def eval_prints_nothing(c: Ctx) -> Setup:
    setup = greedy(c, ": {ckpt}")
    setup.names += ["printed nothing"]
    return setup


def eval_json_without_score(c: Ctx) -> Setup:
    setup = greedy(c, """echo '{"accuracy": 0.9}'; : {ckpt}""")
    setup.names += ["'score'"]
    return setup


def eval_without_placeholder(c: Ctx) -> Setup:
    setup = greedy(c, "python eval.py")
    setup.names = ["'python eval.py'", "{ckpt}"]
    return setup


def wise_ft_sweep_eval_hangs(c: Ctx) -> Setup:
    a, b = c.make(2)
    argv = ["wise-ft", str(a), str(b), "-o", str(c.out), "--alphas", "0.3,0.7"]
    argv += ["--eval", "sleep 60; : {ckpt}", "--eval-timeout", "0.5"]
    return Setup(argv, ["candidate 'wise-ft_alpha=0.3'", "timed out"], keeps=["soup.history.jsonl"])


def greedy_without_eval(c: Ctx) -> Setup:
    a, b = c.make(2)
    return Setup(["greedy", str(a), str(b), "-o", str(c.out)], ["--eval"])


def scores_missing_ingredient(c: Ctx) -> Setup:
    scores = c.tmp / "scores.json"
    scores.write_text(json.dumps({"run0": 0.9}))
    setup = greedy(c, "echo 1; : {ckpt}", "--scores", str(scores))
    setup.names = [str(scores), "run1"]
    return setup


CASES: list[tuple[str, Callable[[Ctx], Setup]]] = [
    ("truncated header", truncated_header),
    ("truncated data", truncated_data),
    ("offsets overlap", offsets_overlap),
    ("offsets past the end", offsets_past_end),
    ("header length larger than file", header_length_too_large),
    ("invalid JSON header", invalid_json),
    ("header not an object", header_not_object),
    ("unknown dtype", unknown_dtype),
    ("offsets disagree with shape", offsets_wrong_size),
    ("zero-byte safetensors", zero_byte_safetensors),
    ("zero-byte pickle", zero_byte_pickle),
    ("garbage pickle", garbage_pickle),
    ("missing input", missing_input),
    ("glob matches nothing", glob_matches_nothing),
    ("folder without checkpoint", folder_without_checkpoint),
    ("index points at missing shard", index_missing_shard),
    ("shard tensor not in index", shard_tensor_not_in_index),
    ("index tensor not in shard", index_tensor_not_in_shard),
    ("index names a shard outside its folder", index_escapes_folder),
    ("index invalid JSON", index_invalid_json),
    ("shapes differ", shape_mismatch),
    ("missing key", missing_key),
    ("extra key", extra_key),
    ("integer buffers differ", integer_buffers_differ),
    ("float in one, integer in other", float_vs_integer),
    ("NaN weight", nan_weight),
    ("Inf weight", inf_weight),
    ("NaN in a float8 checkpoint", nan_in_float8),
    ("overflow in the output dtype", overflow_in_output_dtype),
    ("pickle that executes code", malicious_pickle),
    ("legacy-format pickle that executes code", malicious_legacy_pickle),
    ("HF folder whose .bin executes code", malicious_folder_bin),
    ("pickle of a list", pickle_not_a_dict),
    ("pickle with non-tensor entry", pickle_non_tensor_entry),
    ("pickle with two state dicts", pickle_ambiguous_nested),
    ("pickle --key not found", pickle_missing_key),
    ("pickle declaring more bytes than the file", pickle_broadcast_bomb),
    ("module. prefix collision", wrapper_prefix_collision),
    ("output equals an input", output_is_input),
    ("output inside an input folder", output_inside_input_folder),
    ("output already exists", output_exists),
    ("output folder missing", output_folder_missing),
    ("output folder read-only", output_folder_read_only),
    ("output named .pt", output_pickle_suffix),
    ("weights count mismatch", weights_count_mismatch),
    ("negative weight", weights_negative),
    ("weights sum to zero", weights_sum_to_zero),
    ("weights not numbers", weights_not_numbers),
    ("weight NaN", weights_not_finite),
    ("--max-shard-size with a file output", shard_size_with_file_output),
    ("unknown --dtype", unknown_output_dtype),
    ("soup inspect on a truncated file", inspect_truncated),
    ("evaluator crashes", eval_crashes),
    ("evaluator crashes on a greedy candidate", eval_crashes_on_a_soup),
    ("evaluator hangs (--eval-timeout)", eval_hangs),
    ("evaluator prints garbage", eval_prints_garbage),
    ("evaluator returns NaN", eval_prints_nan),
    ("evaluator prints nothing", eval_prints_nothing),
    ("evaluator JSON without score", eval_json_without_score),
    ("eval command without {ckpt}", eval_without_placeholder),
    ("wise-ft sweep evaluator hangs", wise_ft_sweep_eval_hangs),
    ("greedy without --eval", greedy_without_eval),
    ("--scores misses an ingredient", scores_missing_ingredient),
]


# ---------------------------------------------------------------------------------------
# The battery, in-process and through a real process (harness: battery.py).


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[i for i, _ in CASES])
def test_bad_input(
    build: Case, tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    run_case(build, tmp_path, make_ingredients, capsys)


def test_battery_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({i for i, _ in CASES}) == len(CASES)


@pytest.mark.slow  # a real process imports torch: 3-7 s on 2 busy cores
@pytest.mark.parametrize("build", [truncated_data, malicious_pickle], ids=lambda b: b.__name__)
def test_bad_input_subprocess(build: Case, tmp_path: Path, make_ingredients: Maker) -> None:
    run_subprocess_case(build, tmp_path, make_ingredients)


# ---------------------------------------------------------------------------------------
# Inputs that are odd but allowed.


def test_malicious_pickle_payload_is_live(tmp_path: Path) -> None:
    """Control for the pickle case: with --unsafe-pickle the payload really runs, so its
    absence in the battery proves the refusal, not a broken payload."""
    evil, marker = malicious_pickle_path(tmp_path)
    out = tmp_path / "soup.safetensors"
    shutil.copy(evil, evil.with_name("evil-copy.pt"))
    assert not marker.exists()
    argv = uniform(evil, evil.with_name("evil-copy.pt"), out=out, extra=("--unsafe-pickle",))
    assert main(argv) == 0
    assert marker.exists()


def test_one_input_is_a_copy_with_a_warning(
    make_ingredients: Maker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Decision: one ingredient is allowed (a soup of one is a valid, if pointless, soup;
    scripts that glob a folder should not break when only one run finished), with a
    warning on stderr. The output holds exactly the input's tensors."""
    (a,) = make_ingredients(1)
    out = tmp_path / "soup.safetensors"
    assert main(uniform(a, out=out)) == 0
    assert "soup: warning: only one ingredient" in capsys.readouterr().err
    got, want = load_file(out), load_file(a)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_allow_nonfinite_passes(tmp_path: Path, make_ingredients: Maker) -> None:
    (a,) = make_ingredients(1)
    b = _modify(
        Ctx(tmp_path, make_ingredients, contextlib.ExitStack()),
        lambda sd: sd["fc.weight"].__setitem__((2, 1), float("nan")),
    )
    out = tmp_path / "soup.safetensors"
    assert main(uniform(a, b, out=out, extra=("--allow-nonfinite",))) == 0
    soup = load_file(out)
    assert torch.isnan(soup["fc.weight"][2, 1])
    assert torch.isfinite(soup["fc.bias"]).all()


def test_integer_buffers_first_passes(tmp_path: Path, make_ingredients: Maker) -> None:
    (a,) = make_ingredients(1)
    b = _modify(
        Ctx(tmp_path, make_ingredients, contextlib.ExitStack()),
        lambda sd: sd["bn.num_batches_tracked"].fill_(11),
    )
    out = tmp_path / "soup.safetensors"
    assert main(uniform(a, b, out=out, extra=("--non-float", "first"))) == 0
    assert int(load_file(out)["bn.num_batches_tracked"]) == 10


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_every_safetensors_dtype_soups(dtype_name: str, tmp_path: Path) -> None:
    """Every dtype the reader accepts can be souped (float8 once crashed the sum)."""
    dtype = DTYPES[dtype_name].to_torch()
    paths = []
    for i in range(2):
        t = ((torch.arange(6) + i) % 3).to(torch.float32).reshape(2, 3)
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"w": t.to(dtype), "n": torch.tensor(1)}, paths[-1])
    out = tmp_path / "soup.safetensors"
    assert main(uniform(*paths, out=out, extra=("--non-float", "first"))) == 0
    got = load_file(out)["w"]
    assert got.dtype == dtype
    if dtype.is_floating_point:
        want = (load_file(paths[0])["w"].double() + load_file(paths[1])["w"].double()) / 2
        torch.testing.assert_close(got.double(), want.to(dtype).double())


def test_readme_states_the_size_of_each_battery() -> None:
    import re

    import test_bad_input_cli
    import test_bad_input_io
    import test_bad_input_paths

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    guarantees = readme[readme.index("## Guarantees") : readme.index("## Layout")]
    stated = [int(n) for n in re.findall(r"(\d+) (?:such|more) cases", guarantees)]
    assert stated == [
        len(CASES),
        len(test_bad_input_io.CASES),
        len(test_bad_input_cli.CASES),
        len(test_bad_input_paths.CASES),
    ]
