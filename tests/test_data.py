"""Data modules: sources, per-document split, cache reuse, determinism, resumable cursor, rank
sharding, errors."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llm.config import ConfigError, load_config
from llm.data import (
    BaseDataModule,
    DataError,
    SyntheticDataModule,
    TextDataModule,
    build_datamodule,
)
from llm.data import text as text_module_impl
from llm.data.text import SPLIT_RULE, read_corpus, split_rank, stdlib_files, val_document_count
from llm.tokenization import BPETokenizer, SimpleCharacterTokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "return", "def", "class", "self", "café", "λ", "(", ")", ":"]


def make_text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(n_words // 6)]
    return "\n".join(lines) + "\n"


@pytest.fixture()
def corpus_dir(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text(make_text(1, 3000), encoding="utf-8")
    (root / "sub" / "b.md").write_text(make_text(2, 3000), encoding="utf-8")
    (root / "sub" / "deeper" / "c.py").write_text(make_text(3, 3000), encoding="utf-8")
    (root / "sub" / "image.bin").write_bytes(bytes(range(256)) * 10)  # not text: skipped
    (root / ".hidden" / "secret.txt").write_text("never read", encoding="utf-8")
    return root


def text_module(source, cache, **kw) -> TextDataModule:
    args = {"seq_len": 16, "batch_size": 8, "cache_dir": cache, "val_fraction": 0.1, "seed": 0}
    args.update(kw)
    dm = TextDataModule(str(source), **args)
    dm.setup()
    return dm


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


# ---------------------------------------------------------------------- sources
def test_directory_source_is_recursive_sorted_and_text_only(corpus_dir, tmp_path):
    corpus = read_corpus(str(corpus_dir))
    assert [p.relative_to(corpus_dir).as_posix() for p in corpus.files] == [
        "a.txt", "sub/b.md", "sub/deeper/c.py"]
    assert corpus.names == ["a.txt", "sub/b.md", "sub/deeper/c.py"]
    assert [p.name for p in corpus.skipped] == ["image.bin"]
    assert corpus.docs[0] == (corpus_dir / "a.txt").read_text(encoding="utf-8")
    assert not corpus.truncated


def test_glob_and_single_file_sources(corpus_dir):
    via_glob = read_corpus(str(corpus_dir / "**" / "*.py"))
    assert [p.name for p in via_glob.files] == ["c.py"]
    assert via_glob.names == ["sub/deeper/c.py"]  # relative to the glob's leading directories
    single = read_corpus(str(corpus_dir / "sub" / "b.md"))
    assert single.docs == [(corpus_dir / "sub" / "b.md").read_text(encoding="utf-8")]
    assert single.names == ["b.md"]


def test_max_bytes_cuts_at_a_character_boundary(corpus_dir):
    first = (corpus_dir / "a.txt").read_bytes()
    cut = read_corpus(str(corpus_dir), max_bytes=len(first) + 101)
    assert cut.truncated and len(cut.docs) == 2
    assert cut.num_bytes <= len(first) + 101 and cut.num_bytes >= len(first) + 98  # 'café'/'λ' are 2 bytes
    assert (corpus_dir / "sub" / "b.md").read_text(encoding="utf-8").startswith(cut.docs[1])


def test_stdlib_source_with_a_small_cap(tmp_path):
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert all(r.endswith(".py") for r in rel)
    parts = {part for r in rel for part in r.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not {r.split("/")[0] for r in rel} & {"encodings", "pydoc_data"}  # generated data
    assert (root / "encodings" / "cp1252.py").is_file()  # ... which this Python does have
    dm = text_module("stdlib", tmp_path, max_bytes=60_000, seq_len=32)
    assert dm.meta["truncated"] and dm.meta["bytes"] <= 60_000
    assert abs(dm.num_tokens - 60_000) < 2_000  # char tokens ~ bytes (+ one <EOS> per file)
    x, _ = dm.batch_at(0)
    assert "<UNK>" not in dm.tokenizer.decode(x.reshape(-1))


# ---------------------------------------------------------------------- split
def make_docs(root: Path, count: int, *, first: int = 0) -> dict[str, str]:
    """``count`` files under ``root`` (two folders deep for some), each text marked with its number."""
    texts = {}
    for i in range(first, first + count):
        name = f"pkg{i % 3}/mod_{i:02d}.py" if i % 2 else f"top_{i:02d}.txt"
        text = f"<<doc {i:02d}>>\n" + make_text(100 + i, 120 + 40 * (i % 5))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
        texts[name] = text
    return texts


def split_texts(dm: TextDataModule) -> tuple[str, str]:
    return dm.tokenizer.decode(dm.train_tokens), dm.tokenizer.decode(dm.val_tokens)


def test_split_rank_is_sha256_of_the_name():
    # pinned: the rank must not depend on the machine, the process (hash() is salted) or file order
    names = ["a.txt", "b.txt", "c.txt", "sub/x.py", "λ.md"]
    expected = ["a.txt", "c.txt", "sub/x.py", "λ.md", "b.txt"]
    assert [names[i] for i in split_rank(names)] == expected
    shuffled = ["λ.md", "sub/x.py", "b.txt", "c.txt", "a.txt"]
    assert [shuffled[i] for i in split_rank(shuffled)] == expected


def test_val_document_count_takes_the_prefix_closest_to_the_fraction():
    ends = np.array([10, 30, 60, 100])  # ranked documents of 10, 20, 30 and 40 tokens
    assert val_document_count(ends, 0.25) == 2  # 30 tokens is closest to 25
    assert val_document_count(ends, 0.5) == 3  # 60 is 10 from 50, 30 is 20 from it
    assert val_document_count(ends, 0.2) == 1  # 10 and 30 both 10 from 20: the fewer documents
    assert val_document_count(ends, 0.001) == 1  # at least one document is val
    assert val_document_count(ends, 0.99) == 3  # at least one document is train
    assert val_document_count(ends, 0.0) == 0
    assert val_document_count(np.array([50]), 0.5) == 0  # one document: no document split


def test_split_is_per_document(tmp_path):
    root = tmp_path / "corpus"
    texts = make_docs(root, 24)
    dm = text_module(root, tmp_path / "cache", val_fraction=0.2, seq_len=16, batch_size=4)
    assert dm.split == "documents" and dm.meta["documents"] == 24
    assert sorted(dm.train_documents + dm.val_documents) == sorted(texts)
    assert not set(dm.train_documents) & set(dm.val_documents) and dm.val_documents
    train, val = split_texts(dm)
    # each split is the whole documents of its side, joined with <EOS>, in rank order
    assert val == "".join(texts[n] + "<EOS>" for n in dm.val_documents)
    assert train == "".join(texts[n] + "<EOS>" for n in dm.train_documents)
    for name, text in texts.items():
        marker = text.split("\n", 1)[0]
        assert (marker in train) != (marker in val), name  # no document in both splits
    assert dm.val_documents + dm.train_documents == [sorted(texts)[i] for i in split_rank(sorted(texts))]
    assert dm.num_tokens == len(dm.train_tokens) + len(dm.val_tokens)
    vx, _ = next(dm.val_dataloader())
    assert all(dm.tokenizer.decode(row) in val for row in vx)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_val_fraction_is_roughly_respected(tmp_path, fraction):
    root = tmp_path / "corpus"
    texts = make_docs(root, 40)
    dm = text_module(root, tmp_path / "cache", val_fraction=fraction, seq_len=8, batch_size=2)
    longest = max(len(t) + 1 for t in texts.values())  # char tokens + <EOS>
    assert abs(len(dm.val_tokens) - fraction * dm.num_tokens) <= longest / 2
    assert abs(len(dm.val_documents) - fraction * 40) <= 6


def test_split_is_deterministic_across_runs_places_and_additions(tmp_path):
    here, there = tmp_path / "here" / "corpus", tmp_path / "elsewhere" / "copy"
    make_docs(here, 20)
    shutil.copytree(here, there)
    a = text_module(here, tmp_path / "cache_a", val_fraction=0.2, seq_len=8, batch_size=2)
    again = text_module(here, tmp_path / "cache_b", val_fraction=0.2, seq_len=8, batch_size=2)
    moved = text_module(there, tmp_path / "cache_a", val_fraction=0.2, seq_len=8, batch_size=2)
    assert again.from_cache is False and moved.from_cache is True  # same names and contents
    for other in (again, moved):
        assert other.val_documents == a.val_documents and other.train_documents == a.train_documents
        np.testing.assert_array_equal(other.val_tokens, a.val_tokens)
    via_glob = text_module(str(here / "**" / "*"), tmp_path / "cache_a", val_fraction=0.2, seq_len=8,
                           batch_size=2)
    assert via_glob.val_documents == a.val_documents

    added = make_docs(here, 1, first=20)
    (new_name,) = added
    grown = text_module(here, tmp_path / "cache_a", val_fraction=0.2, seq_len=8, batch_size=2)
    old_order = a.val_documents + a.train_documents
    assert [n for n in grown.val_documents + grown.train_documents if n != new_name] == old_order
    moved_sides = set(a.val_documents) ^ (set(grown.val_documents) - {new_name})
    assert len(moved_sides) <= 2  # only documents at the cut change side


def test_one_document_falls_back_to_the_tail(tmp_path, caplog):
    single = tmp_path / "only.txt"
    text = make_text(5, 3000)
    single.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="llm.data.text"):
        dm = text_module(single, tmp_path / "cache", val_fraction=0.1)
    assert dm.split == "tail" and dm.val_documents == []
    n = dm.num_tokens
    assert len(dm.val_tokens) == int(0.1 * n) and len(dm.train_tokens) == n - int(0.1 * n)
    train, val = split_texts(dm)
    assert train + val == text + "<EOS>" and val.endswith("<EOS>")
    assert any("one document" in r.getMessage() and "contiguous tail" in r.getMessage()
               for r in caplog.records)
    # a byte cap that reaches only the first file of a directory is one document too
    root = tmp_path / "corpus"
    texts = make_docs(root, 4)
    first = min(texts)
    capped = text_module(root, tmp_path / "cache", max_bytes=len(texts[first].encode()) - 10, batch_size=2)
    assert capped.meta["documents"] == 1 and capped.split == "tail"


def test_split_error_names_the_documents(tmp_path):
    root = tmp_path / "corpus"
    make_docs(root, 6)
    with pytest.raises(DataError, match=r"data.val_fraction=0.1 leaves \d+ val tokens \(1 whole document\(s\)\) = "
                                        r"\d+ windows of data.seq_len=128, fewer than training.batch_size=8"):
        text_module(root, tmp_path / "cache", seq_len=128, batch_size=8)


# ---------------------------------------------------------------------- batches
def test_windows_are_shifted_corpus_slices(corpus_dir, tmp_path):
    dm = text_module(corpus_dir, tmp_path / "cache")
    assert isinstance(dm.tokenizer, SimpleCharacterTokenizer)
    assert dm.vocab_size == dm.tokenizer.vocab_size
    train = dm.tokenizer.decode(dm.train_tokens)
    val = dm.tokenizer.decode(dm.val_tokens)
    x, y = dm.batch_at(3)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        window = dm.tokenizer.decode(np.concatenate([row_x, row_y[-1:]]))
        assert window in train
    vx, vy = next(dm.val_dataloader())
    assert vx.shape == (8, 16)
    assert dm.tokenizer.decode(np.concatenate([vx[-1], vy[-1, -1:]])) in val


def test_epoch_visits_every_train_window_once(corpus_dir, tmp_path):
    dm = text_module(corpus_dir, tmp_path / "cache", seq_len=32, batch_size=16)
    spe = dm.steps_per_epoch
    assert spe == dm._num_items("train") // 16 and spe > 2
    seen = np.concatenate([dm.batch_indices(s) for s in range(spe)])
    assert len(np.unique(seen)) == spe * 16  # no repeats within an epoch
    next_epoch = np.concatenate([dm.batch_indices(s) for s in range(spe, 2 * spe)])
    assert not np.array_equal(seen, next_epoch)  # reshuffled


def test_same_seed_same_batches_other_seed_different(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    a = take(text_module(corpus_dir, cache, seed=7).train_dataloader(), 5)
    b = take(text_module(corpus_dir, cache, seed=7).train_dataloader(), 5)
    c = take(text_module(corpus_dir, cache, seed=8).train_dataloader(), 5)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c, strict=True))


def test_cursor_save_restore_continues_exactly(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    full = text_module(corpus_dir, cache, seq_len=32, batch_size=16)
    spe = full.steps_per_epoch
    stop = spe - 2  # the resumed run crosses an epoch boundary
    uninterrupted = take(full.train_dataloader(), stop + 6)

    first = text_module(corpus_dir, cache, seq_len=32, batch_size=16)
    it = first.train_dataloader()
    take(it, stop)
    state = first.state_dict()
    assert state["step"] == stop == first.step
    assert set(state) == {"step", "seed", "batch_size", "fingerprint"}

    resumed = text_module(corpus_dir, cache, seq_len=32, batch_size=16)
    resumed.load_state_dict(state)
    assert_batches_equal(take(resumed.train_dataloader(), 6), uninterrupted[stop:])
    assert resumed.step == stop + 6 and resumed.epoch == 1


def test_resume_rejects_other_data(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    state = text_module(corpus_dir, cache, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1 but this run has seed=2"):
        text_module(corpus_dir, cache, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="fingerprint"):
        text_module(corpus_dir, cache, seed=1, seq_len=8).load_state_dict(state)
    with pytest.raises(DataError, match="missing"):
        text_module(corpus_dir, cache, seed=1).load_state_dict({"step": 3})
    assert state["fingerprint"].endswith(f":split={SPLIT_RULE}")
    before_split_rule = dict(state, fingerprint=state["fingerprint"].rsplit(":split=", 1)[0])
    with pytest.raises(DataError, match="fingerprint"):  # a run saved under another split rule
        text_module(corpus_dir, cache, seed=1).load_state_dict(before_split_rule)


def test_rank_shards_are_disjoint_and_make_the_global_batch(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    single = text_module(corpus_dir, cache, batch_size=12)
    ranks = [text_module(corpus_dir, cache, batch_size=12, rank=r, world_size=3) for r in range(3)]
    for step in (0, 1, single.steps_per_epoch + 1):
        idx = [dm.batch_indices(step) for dm in ranks]
        assert all(len(i) == 4 for i in idx)
        assert len(np.unique(np.concatenate(idx))) == 12  # disjoint
        xs = [dm.batch_at(step)[0] for dm in ranks]
        np.testing.assert_array_equal(np.concatenate(xs), single.batch_at(step)[0])
    val = [next(dm.val_dataloader())[0] for dm in ranks]
    np.testing.assert_array_equal(np.concatenate(val), next(single.val_dataloader())[0])
    with pytest.raises(DataError, match="batch_size=10 .* divisible by world_size=3"):
        TextDataModule(str(corpus_dir), seq_len=16, batch_size=10, world_size=3, cache_dir=cache)
    with pytest.raises(DataError, match="rank=3, world_size=3"):
        TextDataModule(str(corpus_dir), seq_len=16, batch_size=12, rank=3, world_size=3, cache_dir=cache)


def test_val_loader_is_the_same_every_call(corpus_dir, tmp_path):
    dm = text_module(corpus_dir, tmp_path / "cache")
    first = list(dm.val_dataloader())
    assert len(first) == dm.num_val_batches > 1
    assert_batches_equal(first, list(dm.val_dataloader()))
    assert len(list(dm.val_dataloader(num_batches=2))) == 2
    take(dm.train_dataloader(), 3)
    assert dm.step == 3  # val does not move the cursor
    no_val = text_module(corpus_dir, tmp_path / "cache", val_fraction=0.0)
    with pytest.raises(DataError, match="no validation split"):
        next(no_val.val_dataloader())


# ---------------------------------------------------------------------- cache
def test_second_setup_reads_the_cache(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    first = text_module(corpus_dir, cache)
    assert first.from_cache is False
    tokens_file = first.cache_path / "tokens.npy"
    stamp = tokens_file.stat().st_mtime_ns
    os.utime(tokens_file, ns=(stamp - 10**9, stamp - 10**9))  # any rewrite would move mtime forward
    stamp = tokens_file.stat().st_mtime_ns

    second = text_module(corpus_dir, cache)
    assert second.from_cache is True and second.cache_path == first.cache_path
    assert tokens_file.stat().st_mtime_ns == stamp
    assert second.tokenizer == first.tokenizer
    assert_batches_equal([second.batch_at(0)], [first.batch_at(0)])
    assert len([p for p in cache.iterdir()]) == 1  # no temp directories left behind

    other_tokenizer = text_module(corpus_dir, cache, tokenizer="bpe", vocab_size=300)
    assert other_tokenizer.from_cache is False and other_tokenizer.cache_path != first.cache_path
    (corpus_dir / "a.txt").write_text(make_text(9, 3000), encoding="utf-8")
    changed = text_module(corpus_dir, cache)
    assert changed.from_cache is False and changed.cache_path != first.cache_path


def test_a_cache_of_another_format_is_rebuilt_not_read(corpus_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(text_module_impl, "_CACHE_FORMAT", "llm-text-cache-v1")
    old = text_module(corpus_dir, cache)
    monkeypatch.undo()
    new = text_module(corpus_dir, cache)
    assert new.from_cache is False and new.cache_path != old.cache_path
    assert new.meta["format"] == text_module_impl._CACHE_FORMAT != old.meta["format"]
    assert new.fingerprint != old.fingerprint

    # a cache at the current key without documents.json (the v1 layout) is rebuilt, never split by
    # guesswork; another format in meta.json (which holds the checksums) is reported
    (new.cache_path / "documents.json").unlink()
    rebuilt = text_module(corpus_dir, cache)
    assert rebuilt.from_cache is False and (rebuilt.cache_path / "documents.json").is_file()
    meta = json.loads((rebuilt.cache_path / "meta.json").read_text())
    (rebuilt.cache_path / "meta.json").write_text(json.dumps(dict(meta, format="llm-text-cache-v1")))
    with pytest.raises(DataError, match=r"corrupt token cache .*do not match.*delete it to rebuild"):
        text_module(corpus_dir, cache)


def test_prepare_then_setup_tokenizes_once(corpus_dir, tmp_path):
    dm = TextDataModule(str(corpus_dir), seq_len=16, batch_size=8, cache_dir=tmp_path)
    dm.prepare_data()
    assert dm.from_cache is False
    dm.setup()
    assert dm.from_cache is False and dm.num_tokens == dm.meta["tokens"]
    assert dm.meta["dtype"] == "uint16"


def test_bpe_and_given_tokenizer(corpus_dir, tmp_path):
    dm = text_module(corpus_dir, tmp_path / "cache", tokenizer="bpe", vocab_size=300)
    assert isinstance(dm.tokenizer, BPETokenizer) and dm.vocab_size <= 300
    x, y = dm.batch_at(0)
    assert 0 <= x.min() and max(x.max(), y.max()) < dm.vocab_size
    given = SimpleCharacterTokenizer("abcdefghijklmnopqrstuvwxyz \n")
    dm2 = text_module(corpus_dir, tmp_path / "cache", tokenizer=given)
    assert dm2.tokenizer is given
    assert given.unk_id in dm2.batch_at(0)[0]  # 'é', 'λ', '(' are not in the given vocabulary


# ---------------------------------------------------------------------- errors
def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such.txt"
    with pytest.raises(DataError, match=f"data.source='{missing}': no such file or directory"):
        text_module(missing, tmp_path)
    with pytest.raises(DataError, match=r"the glob matched no files"):
        text_module(tmp_path / "*.nothing", tmp_path)


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"data.source='{empty}': the directory has no files"):
        text_module(empty, tmp_path)
    (empty / "blank.txt").write_text("")
    (empty / "blob.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"the corpus is empty \(2 file\(s\), 1 skipped as non-text\)"):
        text_module(empty, tmp_path)


def test_binary_single_file_is_an_error(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(DataError, match=f"{blob} is not UTF-8 text"):
        text_module(blob, tmp_path)


def test_seq_len_larger_than_the_data(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n" * 10)
    with pytest.raises(DataError, match=r"data.seq_len=100 is too large .* the train split has \d+ tokens"):
        text_module(small, tmp_path / "cache", seq_len=100, val_fraction=0.0)
    with pytest.raises(DataError, match=r"training.batch_size=8 is larger than the \d+ train windows"):
        text_module(small, tmp_path / "cache", seq_len=20, val_fraction=0.0)
    with pytest.raises(DataError, match=r"data.val_fraction=0.1 leaves \d+ val tokens"):
        text_module(small, tmp_path / "cache", seq_len=4, batch_size=2)


def test_batches_before_setup(corpus_dir, tmp_path):
    dm = TextDataModule(str(corpus_dir), seq_len=16, batch_size=8, cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"call setup\(\) before"):
        dm.train_dataloader()


# ---------------------------------------------------------------------- synthetic
def test_synthetic_lm():
    def make(**kw):
        dm = SyntheticDataModule(batch_size=8, seq_len=12, vocab_size=50, num_samples=200, seed=3, **kw)
        dm.setup()
        return dm

    dm = make()
    x, y = dm.batch_at(0)
    assert x.shape == y.shape == (8, 12) and x.dtype == np.int64
    assert 0 <= x.min() and x.max() < 50
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert dm.steps_per_epoch == 180 // 8
    assert_batches_equal(take(make().train_dataloader(), 4), take(dm.train_dataloader(), 4))
    resumed = make()
    resumed.load_state_dict(dm.state_dict())
    assert_batches_equal(take(resumed.train_dataloader(), 3), take(dm.train_dataloader(), 3))
    shards = [make(rank=r, world_size=2).batch_at(5)[0] for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(shards), make().batch_at(5)[0])
    assert len(list(dm.val_dataloader())) == 20 // 8


def test_synthetic_regression():
    dm = SyntheticDataModule(task="regression", batch_size=32, num_samples=2000, in_features=5,
                             out_features=2, noise_std=0.1, seed=0)
    dm.setup()
    x, y = dm.batch_at(0)
    assert x.shape == (32, 5) and y.shape == (32, 2) and x.dtype == y.dtype == np.float32
    xs, ys = map(np.concatenate, zip(*dm.val_dataloader(), strict=True))
    residual = ys - xs @ dm.weight
    assert 0.07 < residual.std() < 0.13  # exactly the noise left
    w_fit, *_ = np.linalg.lstsq(xs, ys, rcond=None)
    np.testing.assert_allclose(w_fit, dm.weight, atol=0.05)
    with pytest.raises(DataError, match="larger than the 9 synthetic train samples"):
        SyntheticDataModule(batch_size=16, num_samples=10).setup()


# ---------------------------------------------------------------------- from a run config
def test_build_datamodule_from_config(corpus_dir, tmp_path):
    cfg = load_config(env={}, overrides=[f"data.source={corpus_dir}", f"data.cache_dir={tmp_path}",
                                         "data.seq_len=16", "training.batch_size=4", "training.seed=2"])
    dm = build_datamodule(cfg, rank=1, world_size=2)
    assert isinstance(dm, TextDataModule) and isinstance(dm, BaseDataModule)
    dm.setup()
    assert dm.batch_at(0)[0].shape == (2, 16) and dm.cache_path.parent == tmp_path

    synth = build_datamodule(load_config(env={}, overrides=["data.source=synthetic", "training.batch_size=4"]))
    assert isinstance(synth, SyntheticDataModule) and synth.vocab_size == cfg.model.vocab_size
    # the data section alone decides: a task's own data is the task's business (llm.loop.tasks)
    other = build_datamodule(load_config(env={}, overrides=["task=regression", "data.source=synthetic",
                                                            "training.batch_size=4"]))
    other.setup()
    assert other.task == "lm" and other.batch_at(0)[0].dtype == np.int64


def test_partial_eval_spreads_its_batches_over_the_val_split():
    dm = SyntheticDataModule(batch_size=4, seq_len=8, vocab_size=50, num_samples=500, seed=1)  # 50 val rows
    dm.setup()
    full = list(dm.val_dataloader())
    assert len(full) == dm.num_val_batches == 12
    picked = list(dm.val_dataloader(num_batches=3))
    assert_batches_equal(picked, [full[0], full[4], full[8]])  # k * 12 // 3
    assert_batches_equal(list(dm.val_dataloader(num_batches=3)), picked)  # the same on every call
    shards = [SyntheticDataModule(batch_size=4, seq_len=8, vocab_size=50, num_samples=500, seed=1, rank=r,
                                  world_size=2) for r in range(2)]
    for s in shards:
        s.setup()
    halves = [list(s.val_dataloader(num_batches=3)) for s in shards]
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][k][0], halves[1][k][0]]), picked[k][0])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_cache_that_fails_its_checksum_is_rebuilt_with_a_message(corpus_dir, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    good = text_module(corpus_dir, cache)
    expected = np.asarray(good.train_tokens).copy()
    tokens = good.cache_path / "tokens.npy"
    blob = bytearray(tokens.read_bytes())
    if damage == "flip":
        blob[-5] ^= 0xFF  # a token id far out of the vocabulary
    else:
        blob = blob[: len(blob) - 64]
    tokens.write_bytes(bytes(blob))
    with caplog.at_level("WARNING"):
        again = text_module(corpus_dir, cache)
    assert any("does not match its checksum" in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    assert again.from_cache is False and np.array_equal(np.asarray(again.train_tokens), expected)


# ---------------------------------------------------------------------- packed documents
def test_packed_batches_carry_segments_that_change_after_each_eos(tmp_path):
    root = tmp_path / "docs"
    make_docs(root, 12)
    plain = text_module(root, tmp_path / "cache", seq_len=32)
    packed = text_module(root, tmp_path / "cache", seq_len=32, pack_documents=True)
    reset = text_module(root, tmp_path / "cache", seq_len=32, pack_documents=True, reset_positions=True)
    eos = packed.tokenizer.eos_id
    seen_boundary = False
    for step in range(packed.steps_per_epoch):
        inputs, targets = plain.batch_at(step)
        p_inputs, p_targets, segments = packed.batch_at(step)
        r_inputs, _, r_segments, positions = reset.batch_at(step)
        np.testing.assert_array_equal(p_inputs, inputs)  # the same windows as unpacked
        np.testing.assert_array_equal(p_targets, targets)
        np.testing.assert_array_equal(r_segments, segments)
        for row, seg, pos in zip(inputs, segments, positions):
            expected = np.concatenate([[0], np.cumsum(row[:-1] == eos)])  # a new id right after each EOS
            np.testing.assert_array_equal(seg, expected)
            starts = np.flatnonzero(np.diff(seg)) + 1
            seen_boundary |= len(starts) > 0
            for lo, hi in zip([0, *starts], [*starts, len(row)]):
                np.testing.assert_array_equal(pos[lo:hi], np.arange(hi - lo))
    assert seen_boundary  # the corpus has documents shorter than a few windows
    assert packed.fingerprint != plain.fingerprint != reset.fingerprint
    val = next(iter(packed.val_dataloader(1)))
    assert len(val) == 3 and val[2].shape == val[0].shape


def test_packing_config_is_validated(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.reset_positions"):
        load_config(env={}, overrides=["data.reset_positions=true"])
    with pytest.raises(ConfigError, match="data.pack_documents"):
        load_config(env={}, overrides=["data.source=synthetic", "data.pack_documents=true"])
    cfg = load_config(env={}, overrides=[f"data.source={corpus_dir}", f"data.cache_dir={tmp_path}",
                                         "data.pack_documents=true", "data.reset_positions=true"])
    dm = build_datamodule(cfg)
    assert dm.pack_documents and dm.reset_positions
    with pytest.raises(DataError, match="data.reset_positions"):
        TextDataModule(str(corpus_dir), seq_len=16, batch_size=8, cache_dir=tmp_path, reset_positions=True)
