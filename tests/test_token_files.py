"""Pre-tokenized token files (``llm.data.tokens``): nanoGPT ``train.bin``/``val.bin``, llm.c shards with
their header, ``.npy``; memory-mapped, ids checked against the vocabulary with cached counts; the
same global batches whatever the world size and across a resume on another world size (checked for
text corpora too); one-line errors; a torch training run and the CLI on a ``.bin``."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

from llm.config import ConfigError, load_config
from llm.data import DataError, TextDataModule, TokenFileDataModule, batch_shard, build_datamodule
from llm.data import tokens as tokens_impl
from llm.data.tokens import LLMC_HEADER_BYTES, is_token_source, is_val_file, open_token_file
from llm.sharding import MeshShape
from llm.tokenization import build_tokenizer

VOCAB = 100


def ids(seed: int, n: int, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def write_llmc(path: Path, tokens: np.ndarray, *, magic: int = 20240520, version: int = 1,
               dtype: str = "uint16", count: int | None = None) -> Path:
    """A shard as llm.c's ``write_datafile`` writes it: 256 int32 header, then the tokens."""
    header = np.zeros(256, np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype).tobytes())
    return path


@pytest.fixture()
def nanogpt(tmp_path) -> Path:
    """nanoGPT's layout: train.bin and val.bin (raw uint16) beside its prepare script."""
    root = tmp_path / "owt"
    root.mkdir()
    ids(1, 6000).astype(np.uint16).tofile(root / "train.bin")
    ids(2, 1200).astype(np.uint16).tofile(root / "val.bin")
    (root / "prepare.py").write_text("# writes train.bin and val.bin\n")
    return root


def module(source, tmp_path, **kw) -> TokenFileDataModule:
    args = {"seq_len": 16, "batch_size": 8, "vocab_size": VOCAB, "cache_dir": tmp_path / "cache", "seed": 0}
    args.update(kw)
    dm = TokenFileDataModule(str(source), **args)
    dm.setup()
    return dm


def global_batches(make, world_size: int, steps) -> list[np.ndarray]:
    """The global batch at each step: the concatenation of every rank's slice."""
    ranks = [make(rank=r, world_size=world_size) for r in range(world_size)]
    return [np.concatenate([dm.batch_at(s)[0] for dm in ranks]) for s in steps]


# ---------------------------------------------------------------------- formats and splits
def test_nanogpt_train_and_val_bin_are_memmapped_and_split_by_file(nanogpt, tmp_path):
    train, val = np.fromfile(nanogpt / "train.bin", np.uint16), np.fromfile(nanogpt / "val.bin", np.uint16)
    dm = module(nanogpt / "train.bin", tmp_path)
    assert dm.split == "files" and dm.train_files == [nanogpt / "train.bin"] and dm.val_files == [nanogpt / "val.bin"]
    assert all(isinstance(a, np.memmap) for a in dm.arrays)  # no RAM copy of the corpus
    assert dm.num_tokens == 7200 and dm.meta["tokens"] == 7200 and dm.meta["layouts"] == ["raw"]
    T = 16
    assert dm.steps_per_epoch == (5999 // T) // 8 and dm.num_val_batches == (1199 // T) // 8
    x, y = next(dm.val_dataloader())
    np.testing.assert_array_equal(x[0], val[:T])  # val windows start at 0 of val.bin
    np.testing.assert_array_equal(y[1], val[T + 1:2 * T + 1])
    x, y = dm.batch_at(5)
    assert x.dtype == np.int64 and x.shape == (8, T)
    for row_x, row_y in zip(x, y, strict=True):  # every train window is a slice of train.bin
        start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(train, T) == row_x, axis=1))[0])
        np.testing.assert_array_equal(row_y, train[start + 1:start + T + 1])
    np.testing.assert_array_equal(dm.train_token_counts, np.trim_zeros(np.bincount(train), "b"))
    # the directory is the same source: same files, same batches, same fingerprint
    via_dir = module(nanogpt, tmp_path)
    assert via_dir.fingerprint == dm.fingerprint and via_dir.val_files == dm.val_files
    np.testing.assert_array_equal(via_dir.batch_at(5)[0], x)


def test_a_lone_file_splits_off_its_tail(tmp_path):
    tokens = ids(3, 5000).astype(np.uint16)
    tokens.tofile(tmp_path / "corpus.bin")
    dm = module(tmp_path / "corpus.bin", tmp_path, val_fraction=0.2)
    cut = 5000 - int(5000 * 0.2)
    assert dm.split == "tail" and dm.val_files == []
    np.testing.assert_array_equal(next(dm.val_dataloader())[0][0], tokens[cut:cut + 16])
    np.testing.assert_array_equal(dm.train_token_counts, np.trim_zeros(np.bincount(tokens[:cut]), "b"))
    assert not any(np.array_equal(dm.batch_at(s)[0][r], tokens[cut:cut + 16])
                   for s in range(dm.steps_per_epoch) for r in range(8))
    assert module(tmp_path / "corpus.bin", tmp_path, val_fraction=0.0)._num_items("val") == 0


def test_llmc_shards_with_their_header_and_a_glob_of_them(tmp_path):
    root = tmp_path / "fineweb"
    root.mkdir()
    a, b, v = ids(4, 3000), ids(5, 2000), ids(6, 900)
    write_llmc(root / "fineweb_train_000001.bin", a)
    write_llmc(root / "fineweb_train_000002.bin", b)
    write_llmc(root / "fineweb_val_000000.bin", v)
    info = open_token_file(root / "fineweb_train_000001.bin")
    assert (info.layout, info.dtype, info.offset, info.num_tokens) == ("llm.c v1", "uint16", LLMC_HEADER_BYTES, 3000)
    np.testing.assert_array_equal(info.tokens(), a)
    dm = module(root / "*.bin", tmp_path)
    assert [p.name for p in dm.train_files] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in dm.val_files] == ["fineweb_val_000000.bin"]
    np.testing.assert_array_equal(next(dm.val_dataloader())[0][0], v[:16])
    # windows never cross a file: (3000-1)//16 + (2000-1)//16 train items
    assert dm._num_items("train") == 2999 // 16 + 1999 // 16
    epoch = np.concatenate([dm.batch_at(s)[0] for s in range(dm.steps_per_epoch)])
    assert len({row.tobytes() for row in epoch}) == len(epoch)  # each window once per epoch
    # llama-3 shards: another magic, version 7, uint32 ids
    big = ids(7, 2000, vocab=70_000)
    write_llmc(tmp_path / "llama.bin", big, magic=20240801, version=7, dtype="uint32")
    info = open_token_file(tmp_path / "llama.bin")
    assert (info.layout, info.dtype) == ("llm.c v7", "uint32")
    np.testing.assert_array_equal(info.tokens(), big)
    assert module(tmp_path / "llama.bin", tmp_path, vocab_size=70_000).batch_at(0)[0].max() < 70_000


def test_npy_and_raw_uint32_files(tmp_path):
    tokens = ids(8, 4000, vocab=70_000)
    np.save(tmp_path / "corpus.npy", tokens.astype(np.uint32))
    dm = module(tmp_path / "corpus.npy", tmp_path, vocab_size=70_000)
    assert isinstance(dm.arrays[0], np.memmap) and dm.files[0].layout == "npy" and dm.files[0].dtype == "uint32"
    tokens.astype(np.uint32).tofile(tmp_path / "raw.bin")
    raw = module(tmp_path / "raw.bin", tmp_path, vocab_size=70_000, token_dtype="uint32")
    np.testing.assert_array_equal(raw.batch_at(3)[0], dm.batch_at(3)[0])  # same ids, same batches
    with pytest.raises(DataError, match="token id 6\\d{4} at index \\d+ is >= model.vocab_size=65536"):
        module(tmp_path / "raw.bin", tmp_path, vocab_size=65_536, token_dtype="uint32")


def test_which_sources_are_token_files(nanogpt, tmp_path):
    assert is_token_source(str(nanogpt)) and is_token_source(str(nanogpt / "train.bin"))
    assert is_token_source(str(tmp_path / "missing.npy")) and is_token_source(str(tmp_path / "*" / "*.bin"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    assert not is_token_source(str(tmp_path / "text")) and not is_token_source("stdlib")
    assert not is_token_source(str(tmp_path / "text" / "a.txt"))
    assert [is_val_file(Path(n)) for n in ("val.bin", "x_val_000.bin", "val-2.npy", "interval.bin", "train.bin")] \
        == [True, True, True, False, False]


# ---------------------------------------------------------------------- world size and resume
@pytest.mark.parametrize("kind", ["token files", "text"])
def test_the_global_batch_is_the_same_at_every_world_size(kind, nanogpt, tmp_path):
    if kind == "text":
        (tmp_path / "docs").mkdir()
        for i in range(6):
            (tmp_path / "docs" / f"d{i}.txt").write_text("".join(chr(97 + (i * j) % 26) for j in range(900)))

        def make(**kw):
            dm = TextDataModule(str(tmp_path / "docs"), seq_len=16, batch_size=8, cache_dir=tmp_path / "c", **kw)
            dm.setup()
            return dm
    else:
        def make(**kw):
            return module(nanogpt, tmp_path, **kw)
    steps = range(0, 3 * make().steps_per_epoch, 7)  # across epochs
    one = global_batches(make, 1, steps)
    for world_size in (2, 4):
        for a, b in zip(one, global_batches(make, world_size, steps), strict=True):
            np.testing.assert_array_equal(a, b)
    val = [make(rank=r, world_size=4) for r in range(4)]
    for batches in zip(make().val_dataloader(3), *(dm.val_dataloader(3) for dm in val), strict=True):
        np.testing.assert_array_equal(batches[0][0], np.concatenate([b[0] for b in batches[1:]]))


@pytest.mark.parametrize("resume_world_size", [4, 1])
def test_resume_on_another_world_size_continues_the_global_batches(resume_world_size, nanogpt, tmp_path):
    def make(**kw):
        return module(nanogpt, tmp_path, **kw)

    saved_run = [make(rank=r, world_size=2) for r in range(2)]
    for dm in saved_run:
        loader = dm.train_dataloader()
        for _ in range(23):
            next(loader)
    states = [dm.state_dict() for dm in saved_run]
    assert states[0] == states[1]  # the cursor is global: any rank's state resumes every rank
    resumed = [make(rank=r, world_size=resume_world_size) for r in range(resume_world_size)]
    for dm in resumed:
        dm.load_state_dict(states[0])
    loaders = [dm.train_dataloader() for dm in resumed]
    uninterrupted = make()
    for step in range(23, 23 + 2 * uninterrupted.steps_per_epoch):
        np.testing.assert_array_equal(np.concatenate([next(it)[0] for it in loaders]), uninterrupted.batch_at(step)[0])
    other = module(nanogpt / "train.bin", tmp_path, seq_len=8)
    with pytest.raises(DataError, match="fingerprint"):
        other.load_state_dict(states[0])


def test_a_mesh_splits_the_batch_over_data_and_fsdp_and_a_resume_may_change_the_mesh(nanogpt, tmp_path):
    mesh = MeshShape(data=2, fsdp=2, tensor=2)
    assert [batch_shard(mesh, d) for d in range(8)] == [(d // 2, 4) for d in range(8)]  # tensor pairs share
    with pytest.raises(DataError, match="device=8: the mesh .* has 8 devices"):
        batch_shard(mesh, 8)

    def on_mesh(mesh: MeshShape) -> list[TokenFileDataModule]:
        shards = {batch_shard(mesh, d) for d in range(mesh.devices)}
        return [module(nanogpt, tmp_path, rank=r, world_size=w) for r, w in sorted(shards)]

    before = on_mesh(MeshShape(data=2, fsdp=1, tensor=1))
    for dm in before:
        dm.load_state_dict({**dm.state_dict(), "step": 17})
    after = on_mesh(MeshShape(data=1, fsdp=2, tensor=4))  # 8 devices, 2 batch shards: another mesh
    single = module(nanogpt, tmp_path)
    for dm in after:
        dm.load_state_dict(before[0].state_dict())
    for step in (17, 18, 40):
        np.testing.assert_array_equal(np.concatenate([dm.batch_at(step)[0] for dm in after]),
                                      single.batch_at(step)[0])
        np.testing.assert_array_equal(np.concatenate([dm.batch_at(step)[0] for dm in before]),
                                      single.batch_at(step)[0])
    assert [dm.step for dm in after] == [17, 17]


# ---------------------------------------------------------------------- the id check and its cache
def test_an_id_past_the_vocabulary_names_the_file_the_id_and_the_vocab(tmp_path):
    tokens = ids(9, 3000).astype(np.uint16)
    tokens[1234] = 777
    tokens.tofile(tmp_path / "train.bin")
    with pytest.raises(DataError) as e:
        module(tmp_path / "train.bin", tmp_path)
    assert str(e.value) == (f"token file {tmp_path / 'train.bin'}: token id 777 at index 1234 is >= "
                            f"model.vocab_size={VOCAB} (the file's largest id is 777)")
    assert "\n" not in str(e.value)


def test_counts_are_chunked_and_cached_by_size_and_mtime(tmp_path, monkeypatch):
    tokens = ids(10, 5000).astype(np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    cut = 5000 - int(5000 * 0.1)
    monkeypatch.setattr(tokens_impl, "COUNT_CHUNK", 333)  # many chunks, one partial
    first = TokenFileDataModule(str(tmp_path / "train.bin"), seq_len=16, batch_size=8, vocab_size=VOCAB,
                                cache_dir=tmp_path / "cache")
    first.prepare_data()  # what process 0 runs before the others set up
    assert first.counts_from_cache is False
    np.testing.assert_array_equal(first.train_token_counts, np.trim_zeros(np.bincount(tokens[:cut]), "b"))

    def no_counting(*a, **k):
        raise AssertionError("counted again")

    monkeypatch.setattr(tokens_impl, "count_ids", no_counting)
    again = module(tmp_path / "train.bin", tmp_path, rank=1, world_size=2)  # the file's and the tail's counts
    assert again.counts_from_cache is True
    np.testing.assert_array_equal(again.train_token_counts, first.train_token_counts)
    monkeypatch.undo()
    tokens[:10] = 99  # same size, new mtime: counted again, and the new ids seen
    tokens.tofile(tmp_path / "train.bin")
    stat = os.stat(tmp_path / "train.bin")
    os.utime(tmp_path / "train.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = module(tmp_path / "train.bin", tmp_path)
    assert changed.counts_from_cache is False and changed.train_token_counts[99] == np.sum(tokens[:cut] == 99)
    assert changed.fingerprint != again.fingerprint  # the head bytes changed: a resume would refuse


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("case, message", [
    ("missing", "token file {path} does not exist"),
    ("empty", "token file {path} is empty"),
    ("odd", "token file {path}: 2001 bytes is not a whole number of data.token_dtype=uint16 tokens (2 bytes each)"),
    ("extension", "token file {path}: unknown extension '.txt' (expected .bin or .npy)"),
    ("header count", "token file {path}: the llm.c header counts 500 uint16 tokens (1000 bytes) but 800 bytes follow it"),
    ("header version", "token file {path}: llm.c header magic 20240520 with unknown version 3 (known: 20240520 v1, 20240801 v7)"),
    ("npy shape", "token file {path} holds a int64 array of shape (10, 10); expected one dimension of integer token ids"),
])
def test_bad_token_files_are_one_line_errors_naming_the_file(case, message, tmp_path):
    path = tmp_path / {"extension": "tokens.txt", "npy shape": "x.npy"}.get(case, "train.bin")
    if case == "empty":
        path.write_bytes(b"")
    elif case == "odd":
        path.write_bytes(bytes(2001))
    elif case == "extension":
        path.write_text("1 2 3")
    elif case == "header count":
        write_llmc(path, ids(0, 400), count=500)
    elif case == "header version":
        write_llmc(path, ids(0, 400), version=3)
    elif case == "npy shape":
        np.save(path, np.zeros((10, 10), np.int64))
    with pytest.raises(DataError) as e:
        module(path, tmp_path)
    assert str(e.value) == message.format(path=path)


def test_too_little_data_and_packing_without_a_tokenizer(tmp_path):
    ids(0, 100).astype(np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="training.batch_size=8 is larger than the 6 train windows"):
        module(tmp_path / "train.bin", tmp_path, val_fraction=0.0)
    with pytest.raises(DataError, match="data.seq_len=200 is too large .* longest train segment has 90 tokens"):
        module(tmp_path / "train.bin", tmp_path, seq_len=200)
    with pytest.raises(DataError, match="data.pack_documents on token files needs data.tokenizer_file"):
        TokenFileDataModule(str(tmp_path / "train.bin"), seq_len=16, batch_size=8, vocab_size=VOCAB,
                            pack_documents=True)


def test_packing_with_a_tokenizer_that_has_an_eos(tmp_path):
    tok = build_tokenizer("char", ["abc"])
    eos = tok.eos_id
    doc = np.array(tok.encode("abcabcab") + [eos], np.uint16)  # 9 tokens, the last one ends the document
    np.tile(doc, 200).tofile(tmp_path / "train.bin")
    dm = module(tmp_path / "train.bin", tmp_path, vocab_size=tok.vocab_size, tokenizer=tok, pack_documents=True,
                reset_positions=True, val_fraction=0.0)
    x, _, segment_ids, positions = dm.batch_at(0)
    for row_x, row_s, row_p in zip(x, segment_ids, positions, strict=True):
        after_eos = np.flatnonzero(row_x[:-1] == eos) + 1
        assert np.all(np.diff(row_s)[after_eos - 1] == 1) and np.all(row_p[after_eos] == 0)
        assert row_s[-1] == np.sum(row_x[:-1] == eos)


# ---------------------------------------------------------------------- from a run config, training, the CLI
def test_build_datamodule_from_config_reads_the_vocabulary_and_the_tokenizer_file(nanogpt, tmp_path):
    over = [f"data.source={nanogpt / 'train.bin'}", f"data.cache_dir={tmp_path}", "data.seq_len=16",
            "training.batch_size=4", "model.vocab_size=128", "data.token_dtype=uint16"]
    dm = build_datamodule(load_config(env={}, overrides=over), rank=1, world_size=2)
    assert isinstance(dm, TokenFileDataModule) and dm.vocab_size == 128 and dm.tokenizer is None
    dm.setup()
    assert dm.batch_at(0)[0].shape == (2, 16)
    build_tokenizer("char", ["abcdef"]).save(tmp_path / "tokenizer.json")
    with_tok = build_datamodule(load_config(env={}, overrides=[*over, f"data.tokenizer_file={tmp_path / 'tokenizer.json'}"]))
    assert with_tok.tokenizer is not None and with_tok.tokenizer.type == "char"
    with pytest.raises(ConfigError, match="data.token_dtype"):
        load_config(env={}, overrides=[*over, "data.token_dtype=uint8"])
    with pytest.raises(ConfigError, match="data.tokenizer_file='t.json' applies to text and token-file sources"):
        load_config(env={}, overrides=["data.source=synthetic", "data.tokenizer_file=t.json"])


def bin_corpus(corpus: Path) -> Path:
    """The ``corpus`` fixture's text as char-tokenizer ids in a nanoGPT-style uint16 .bin."""
    text = corpus.read_text()
    path = corpus.with_suffix(".bin")
    np.asarray(build_tokenizer("char", [text]).encode(text), np.uint16).tofile(path)
    return path


@pytest.mark.usefixtures("one_torch_thread")
def test_torch_engine_trains_on_a_bin_file(tmp_path, corpus, caplog):
    pytest.importorskip("torch")
    from engine_checks import losses, tiny

    from backends.torch.engine import TrainingEngine

    path = bin_corpus(corpus)
    config = tiny(tmp_path, "training.max_steps=30", "training.eval_every=15", source=path)
    with caplog.at_level(logging.INFO), TrainingEngine(config, run_dir=tmp_path / "run") as engine:
        result = engine.fit()
        assert isinstance(engine.datamodule, TokenFileDataModule)
        assert engine.sample(max_new_tokens=5) is None  # no tokenizer: no text, no crash
    tokens = np.fromfile(path, np.uint16)
    train = tokens[:len(tokens) - int(0.1 * len(tokens))]
    p = np.bincount(train)[np.bincount(train) > 0] / len(train)
    assert result.baselines["unigram_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
    steps = losses(tmp_path / "run")
    assert len(steps) == 30 and result.stop_reason == "completed"
    assert np.mean([steps[s] for s in range(26, 31)]) < 0.6 * np.mean([steps[s] for s in range(1, 6)])
    assert result.val_loss < result.baselines["unigram_entropy"] < math.log(64)
    assert sum("training runs on the ids and the text sample is skipped" in r.getMessage()
               for r in caplog.records) == 1


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_trains_on_a_bin_file_and_skips_the_sample(tmp_path, corpus, capsys):
    pytest.importorskip("torch")
    from engine_checks import TINY

    from llm.config import dump_yaml
    from llm.train import main

    path = bin_corpus(corpus)
    dump_yaml(load_config(None, [*TINY, f"data.source={path}", f"data.cache_dir={tmp_path / 'cache'}",
                                 "training.max_steps=3"], env={}), tmp_path / "tiny.yaml")
    rc = main(["--config", str(tmp_path / "tiny.yaml"), "--run-dir", str(tmp_path / "run"), "--sample-tokens", "20"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "--- sample" not in out.out and "Traceback" not in out.err
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    path.write_bytes(path.read_bytes()[:-1])  # a truncated copy: one line, exit 1
    rc = main(["--config", str(tmp_path / "tiny.yaml"), "--run-dir", str(tmp_path / "run2")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == (f"llm-train: error: token file {path}: {path.stat().st_size} bytes is not a whole "
                               "number of data.token_dtype=uint16 tokens (2 bytes each)")
