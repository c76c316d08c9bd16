"""The bad-input battery, reader side: folders, headers, file types, pickles, OS limits.

Same harness and promise as `test_bad_input.py` (one `soup: error:` line naming the file,
exit code 1, nothing created or changed, inputs byte-for-byte unchanged), here for what a
Hugging Face folder, a safetensors header, a file that is not a file, or a pickle of odd
tensors can do. In-process runs also record Python warnings: none may escape (a warning
is a second line on a user's stderr).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from battery import Case, Ctx, Maker, Setup, run_case, run_subprocess_case, sha256, snapshot
from conftest import save_as, tiny_state_dict
from safetensors.torch import load_file
from test_bad_input import read_st, uniform, write_st

from modelsoups.cli import main

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def edit_index(folder: Path, edit: Callable[[dict[str, str]], object]) -> Path:
    """Apply `edit` to the weight map of `folder`'s index; return the index path."""
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


# ---------------------------------------------------------------------------------------
# Hugging Face folders.


def index_empty_weight_map(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = edit_index(b, dict.clear)
    return Setup(uniform(a, b, out=c.out), [str(index), "weight_map is empty"])


def index_omits_a_whole_shard(c: Ctx) -> Setup:
    """The second shard is in the folder but the index lists none of its tensors."""
    a, b = c.make(2, "hf-sharded")

    def drop_second(wm: dict[str, str]) -> None:
        for k in [k for k, v in wm.items() if v == SHARD2]:
            del wm[k]

    index = edit_index(b, drop_second)
    return Setup(uniform(a, b, out=c.out), [str(index), repr(SHARD2), "incomplete"])


def same_incomplete_index_everywhere(c: Ctx) -> Setup:
    """Every input agrees on the smaller model: only the shard numbering shows the loss."""
    paths = c.make(2, "hf-sharded")
    for p in paths:
        edit_index(p, lambda wm: [wm.pop(k) for k in [k for k, v in wm.items() if v == SHARD2]])
        (p / SHARD2).unlink()
    return Setup(uniform(*paths, out=c.out), [str(paths[0]), repr(SHARD2), "incomplete"])


def index_absolute_path(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    target = str((a / SHARD2).resolve())
    index = edit_index(b, lambda wm: wm.update({k: target for k, v in wm.items() if v == SHARD2}))
    return Setup(uniform(a, b, out=c.out), [str(index), "outside the model folder"])


def index_names_the_folder_itself(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = edit_index(b, lambda wm: wm.update({k: "." for k, v in wm.items() if v == SHARD2}))
    return Setup(uniform(a, b, out=c.out), [str(index), "outside the model folder"])


def index_value_not_a_string(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = edit_index(b, lambda wm: wm.update({"fc.bias": None}))
    return Setup(uniform(a, b, out=c.out), [str(index), "'fc.bias'", "None"])


def index_key_twice(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = b / "model.safetensors.index.json"
    text = index.read_text()
    # the same tensor a second time, pointing at the other shard: last-wins would hide it
    dup = f'"weight_map": {{"fc.bias": "{SHARD1}", '
    index.write_text(text.replace('"weight_map": {', dup, 1))
    return Setup(uniform(a, b, out=c.out), [str(index), "'fc.bias' twice"])


def index_deeply_nested(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = b / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return Setup(uniform(a, b, out=c.out), [str(index), "not a valid shard index"])


def index_lists_itself(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    name = "model.safetensors.index.json"
    index = edit_index(b, lambda wm: wm.update({"head.weight": name}))
    return Setup(uniform(a, b, out=c.out), [str(index)])


def index_shard_is_a_folder(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    (b / SHARD2).unlink()
    (b / SHARD2).mkdir()
    return Setup(uniform(a, b, out=c.out), [str(b / SHARD2), "is a folder"])


def shard_is_a_broken_link(c: Ctx) -> Setup:
    """An interrupted download into the HF cache: the snapshot's link points at no blob."""
    a, b = c.make(2, "hf-sharded")
    (b / SHARD2).unlink()
    (b / SHARD2).symlink_to("../blobs/0123abcd")
    return Setup(uniform(a, b, out=c.out), [str(b / SHARD2), "symbolic link", "missing"])


def weights_file_broken_link_beside_a_bin(c: Ctx) -> Setup:
    """model.safetensors is a broken link, pytorch_model.bin is fine: refused, not a silent
    fall back to the other file."""
    a, b = c.make(2, "hf-folder")
    torch.save(tiny_state_dict(1), b / "pytorch_model.bin")
    (b / "model.safetensors").unlink()
    (b / "model.safetensors").symlink_to(b / "gone.safetensors")
    return Setup(uniform(a, b, out=c.out), [str(b / "model.safetensors"), "missing"])


def weights_file_is_a_fifo(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-folder")
    (b / "model.safetensors").unlink()
    os.mkfifo(b / "model.safetensors")
    return Setup(uniform(a, b, out=c.out), [str(b / "model.safetensors"), "FIFO"])


def shard_is_a_fifo(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    (b / SHARD1).unlink()
    os.mkfifo(b / SHARD1)
    return Setup(uniform(a, b, out=c.out), [str(b / SHARD1), "FIFO"])


def index_is_a_fifo(c: Ctx) -> Setup:
    a, b = c.make(2, "hf-sharded")
    index = b / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    return Setup(uniform(a, b, out=c.out), [str(index), "FIFO"])


# ---------------------------------------------------------------------------------------
# safetensors headers naming a key twice (json.loads keeps the last one silently).


def _duplicate_entry(c: Ctx, entry: Callable[[dict[str, object]], dict[str, object]]) -> Setup:
    a, b = c.make(2)
    header, data = read_st(b)
    text = json.dumps(header)
    extra = json.dumps({"fc.bias": entry(header)})[1:-1]  # '"fc.bias": {...}'
    write_st(b, ("{" + extra + ", " + text[1:]).encode(), data)
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.bias' twice"])


def header_tensor_twice_same(c: Ctx) -> Setup:
    return _duplicate_entry(c, lambda h: h["fc.bias"])  # type: ignore[return-value]


def header_tensor_twice_other_data(c: Ctx) -> Setup:
    """The first entry points at another tensor's bytes: with last-wins nobody sees it."""
    return _duplicate_entry(c, lambda h: h["conv.bias"])  # type: ignore[return-value]


def header_metadata_twice(c: Ctx) -> Setup:
    a, b = c.make(2)
    header, data = read_st(b)
    text = json.dumps(header)
    write_st(b, ('{"__metadata__": {"format": "tf"}, ' + text[1:]).encode(), data)
    return Setup(uniform(a, b, out=c.out), [str(b), "'__metadata__' twice"])


def bytes_after_the_last_tensor(c: Ctx) -> Setup:
    """What the safetensors library refuses ("file not fully covered"): an append, a
    download that was resumed twice."""
    a, b = c.make(2)
    with b.open("ab") as f:
        f.write(b"\0" * 16)
    return Setup(uniform(a, b, out=c.out), [str(b), "16 bytes after the last tensor"])


def header_metadata_key_twice(c: Ctx) -> Setup:
    a, b = c.make(2)
    header, data = read_st(b)
    header.pop("__metadata__", None)
    text = json.dumps(header)
    meta = '"__metadata__": {"format": "pt", "format": "np"}, '
    write_st(b, ("{" + meta + text[1:]).encode(), data)
    return Setup(uniform(a, b, out=c.out), [str(b), "'format' twice"])


# ---------------------------------------------------------------------------------------
# Inputs that are not regular files: refused before anything opens them (opening a FIFO
# blocks until a writer comes; a device never ends).


def fifo_input(c: Ctx) -> Setup:
    (a,) = c.make(1)
    fifo = c.tmp / "p.safetensors"
    os.mkfifo(fifo)
    return Setup(uniform(a, fifo, out=c.out), [str(fifo), "FIFO"])


def fifo_without_suffix(c: Ctx) -> Setup:
    """No suffix: the reader would sniff its first bytes, which also blocks."""
    (a,) = c.make(1)
    fifo = c.tmp / "pipe"
    os.mkfifo(fifo)
    return Setup(uniform(a, fifo, out=c.out), [str(fifo), "FIFO"])


def fifo_pickle(c: Ctx) -> Setup:
    (a,) = c.make(1, "pt")
    fifo = c.tmp / "p.pt"
    os.mkfifo(fifo)
    return Setup(uniform(a, fifo, out=c.out), [str(fifo), "FIFO"])


def link_to_fifo(c: Ctx) -> Setup:
    (a,) = c.make(1)
    os.mkfifo(c.tmp / "pipe")
    link = c.tmp / "b.safetensors"
    link.symlink_to(c.tmp / "pipe")
    return Setup(uniform(a, link, out=c.out), [str(link), "FIFO"])


def fifo_in_list_file(c: Ctx) -> Setup:
    """A `.txt` list of inputs naming a FIFO."""
    (a,) = c.make(1)
    os.mkfifo(c.tmp / "pipe.safetensors")
    listing = c.tmp / "inputs.txt"
    listing.write_text(f"{a.name}\npipe.safetensors\n")
    return Setup(uniform(listing, out=c.out), ["pipe.safetensors", "FIFO"])


def nul_in_list_file(c: Ctx) -> Setup:
    (a,) = c.make(1)
    listing = c.tmp / "inputs.txt"
    listing.write_text(f"{a.name}\nrun1\x00.safetensors\n")
    return Setup(uniform(listing, out=c.out), ["NUL byte"])


def inspect_fifo(c: Ctx) -> Setup:
    fifo = c.tmp / "p.safetensors"
    os.mkfifo(fifo)
    return Setup(["inspect", str(fifo)], [str(fifo), "FIFO"])


def dev_zero(c: Ctx) -> Setup:
    (a,) = c.make(1)
    return Setup(uniform(a, "/dev/zero", out=c.out), ["/dev/zero", "character device"])


def dev_null(c: Ctx) -> Setup:
    (a,) = c.make(1, "pt")
    return Setup(uniform(a, "/dev/null", out=c.out), ["/dev/null", "character device"])


def unix_socket(c: Ctx) -> Setup:
    (a,) = c.make(1)
    path = c.tmp / "s.safetensors"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    c.stack.callback(sock.close)
    return Setup(uniform(a, path, out=c.out), [str(path), "socket"])


def symlink_loop(c: Ctx) -> Setup:
    (a,) = c.make(1)
    loop = c.tmp / "loop.safetensors"
    loop.symlink_to(loop)
    return Setup(uniform(a, loop, out=c.out), [str(loop), "symbolic links"])


# ---------------------------------------------------------------------------------------
# Pickles holding tensors that are not a dense block of numbers.


def _pickle_with(c: Ctx, value: torch.Tensor, fix: str) -> Setup:
    (a,) = c.make(1, "pt")
    b = c.tmp / "odd.pt"
    with warnings.catch_warnings():  # building them warns; loading them must not
        warnings.simplefilter("ignore")
        torch.save({**tiny_state_dict(1), "fc.weight": value}, b)
    return Setup(uniform(a, b, out=c.out), [str(b), "'fc.weight'", fix])


def pickle_sparse_coo(c: Ctx) -> Setup:
    return _pickle_with(c, tiny_state_dict(1)["fc.weight"].to_sparse(), "sparse_coo")


def pickle_sparse_csr(c: Ctx) -> Setup:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = tiny_state_dict(1)["fc.weight"].to_sparse_csr()
    return _pickle_with(c, value, "sparse_csr")


def pickle_meta(c: Ctx) -> Setup:
    return _pickle_with(c, torch.empty(5, 4, device="meta"), "meta device")


def _quantized(per_channel: bool) -> torch.Tensor:
    w = tiny_state_dict(1)["fc.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if per_channel:
            scales, zeros = torch.full((5,), 0.01), torch.zeros(5, dtype=torch.long)
            return torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        return torch.quantize_per_tensor(w, 0.01, 0, torch.qint8)


def pickle_quantized(c: Ctx) -> Setup:
    return _pickle_with(c, _quantized(False), "quantized")


def pickle_quantized_per_channel(c: Ctx) -> Setup:
    return _pickle_with(c, _quantized(True), "quantized")


def pickle_nested(c: Ctx) -> Setup:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    return _pickle_with(c, value, "nested")


CASES: list[tuple[str, Callable[[Ctx], Setup]]] = [
    ("index with an empty weight_map", index_empty_weight_map),
    ("index omits a whole shard", index_omits_a_whole_shard),
    ("every input's index omits the same shard", same_incomplete_index_everywhere),
    ("index names an absolute path", index_absolute_path),
    ("index names the folder itself", index_names_the_folder_itself),
    ("index maps a tensor to null", index_value_not_a_string),
    ("index names a tensor twice", index_key_twice),
    ("index nested 100000 deep", index_deeply_nested),
    ("index lists itself as a shard", index_lists_itself),
    ("index shard is a folder", index_shard_is_a_folder),
    ("shard is a broken symlink (interrupted download)", shard_is_a_broken_link),
    ("broken model.safetensors link beside a .bin", weights_file_broken_link_beside_a_bin),
    ("model.safetensors is a FIFO", weights_file_is_a_fifo),
    ("shard is a FIFO", shard_is_a_fifo),
    ("index is a FIFO", index_is_a_fifo),
    ("header names a tensor twice", header_tensor_twice_same),
    ("header names a tensor twice, other bytes", header_tensor_twice_other_data),
    ("header names __metadata__ twice", header_metadata_twice),
    ("header metadata names a key twice", header_metadata_key_twice),
    ("bytes after the last tensor", bytes_after_the_last_tensor),
    ("FIFO input", fifo_input),
    ("FIFO input without a suffix", fifo_without_suffix),
    ("FIFO named .pt", fifo_pickle),
    ("symlink to a FIFO", link_to_fifo),
    ("list file naming a FIFO", fifo_in_list_file),
    ("list file naming a file with a NUL byte", nul_in_list_file),
    ("soup inspect on a FIFO", inspect_fifo),
    ("/dev/zero", dev_zero),
    ("/dev/null", dev_null),
    ("unix socket", unix_socket),
    ("symlink loop", symlink_loop),
    ("pickle with a sparse COO tensor", pickle_sparse_coo),
    ("pickle with a sparse CSR tensor", pickle_sparse_csr),
    ("pickle with a meta tensor", pickle_meta),
    ("pickle with a quantized tensor", pickle_quantized),
    ("pickle with a per-channel quantized tensor", pickle_quantized_per_channel),
    ("pickle with a nested tensor", pickle_nested),
]


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[i for i, _ in CASES])
def test_bad_input_io(
    build: Case, tmp_path: Path, make_ingredients: Maker, capsys: pytest.CaptureFixture[str]
) -> None:
    run_case(build, tmp_path, make_ingredients, capsys)


def test_battery_io_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({i for i, _ in CASES}) == len(CASES)


@pytest.mark.slow  # a real process imports torch: 3-7 s on 2 busy cores
def test_quantized_pickle_prints_no_torch_warning(tmp_path: Path, make_ingredients: Maker) -> None:
    """torch warns while unpickling quantized tensors ("deprecated", "TypedStorage"); a
    real process shows exactly the one error line."""
    run_subprocess_case(pickle_quantized, tmp_path, make_ingredients)


# ---------------------------------------------------------------------------------------
# Allowed: the Hugging Face cache, made of symbolic links.


def cache_snapshot(cache: Path, sd: dict[str, torch.Tensor], name: str) -> Path:
    """A model as `huggingface_hub` stores it: files in `blobs/` named by hash, and a
    snapshot folder of relative links to them."""
    staged = save_as(sd, cache / f"staged-{name}", "hf-sharded")
    repo = cache / f"models--org--{name}"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for f in sorted(staged.iterdir()):
        blob = sha256(f)
        shutil.move(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob)
    staged.rmdir()
    return snap


def test_hf_cache_layout_soups_and_copies_only_model_files(tmp_path: Path) -> None:
    """Symlinked shards and config files of the HF cache are read and copied; files that
    are not model files (another format's weights, code, a README), links leading out of
    the model, and special files are not copied into the soup folder."""
    sds = [tiny_state_dict(i) for i in range(2)]
    snaps = [cache_snapshot(tmp_path / "cache", sd, f"tiny{i}") for i, sd in enumerate(sds)]
    first = snaps[0]
    (first / "onnx").mkdir()
    (first / "onnx" / "model.onnx").write_bytes(b"another model's weights")
    (first / "modeling_tiny.py").write_text("import os  # would run with trust_remote_code")
    (first / "README.md").write_text("model card of tiny0, not of the soup")
    secret = tmp_path / "secret.txt"
    secret.write_text("not to be published")
    (first / "special_tokens_map.json").symlink_to(secret)
    os.mkfifo(first / "vocab.json")  # copying it would block
    before = snapshot(tmp_path / "cache")

    out = tmp_path / "soup"
    assert main(uniform(*snaps, out=out)) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert not (out / "config.json").is_symlink()
    assert (out / "config.json").read_text() == (first / "config.json").read_text()
    soup = load_file(out / "model.safetensors")
    for k, v in soup.items():
        torch.testing.assert_close(v, sds[0][k] if not v.is_floating_point() else
                                   (sds[0][k] + sds[1][k]) / 2)  # fmt: skip
    assert snapshot(tmp_path / "cache") == before


def test_symlinked_weights_file_outside_the_folder_is_read(tmp_path: Path) -> None:
    """A weights file linked from elsewhere (another disk, say) is still the user's choice
    of input: read. Only the index, which is data, may not name files outside."""
    sds = [tiny_state_dict(i) for i in range(2)]
    folders = []
    for i, sd in enumerate(sds):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        save_as(sd, tmp_path / f"w{i}", "safetensors")
        (folder / "model.safetensors").symlink_to(tmp_path / f"w{i}.safetensors")
        folders.append(folder)
    out = tmp_path / "soup.safetensors"
    assert main(uniform(*folders, out=out)) == 0
    assert set(load_file(out)) == set(sds[0])
