"""Tokenizers: ids, round trips, JSON files (and their failure modes), dispatch, vocab checks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.spec import ModelSpec
from llm.tokenization import (
    BPETokenizer,
    SimpleCharacterTokenizer,
    TokenizerError,
    build_tokenizer,
    check_vocab,
    load_tokenizer,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n",
    "# naïve café, 東京, emoji 🙂, tab\tand CRLF\r\n" * 3,
] * 20

UNICODE_SAMPLES = [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "naïve café — “quotes” ½",
    "日本語のテキストと中文",
    "emoji 🙂👍🏽 and ZWJ 👩‍💻",
    "combining e\u0301 vs é",
    "literal specials <PAD><EOS> stay text",
    "",
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=320)


# ---------------------------------------------------------------------- char
def test_char_ids_and_unknowns():
    tok = SimpleCharacterTokenizer("banana!")
    assert tok.vocab_size == 4 + 4  # <PAD> <UNK> <BOS> <EOS> ! a b n
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.id_to_token(0) == "<PAD>"
    assert tok.encode("ab!") == [5, 6, 4]  # sorted code points: '!' < 'a' < 'b' < 'n'
    assert tok.encode("abz") == [5, 6, tok.unk_id]
    assert tok.decode(tok.encode("banana")) == "banana"
    assert tok.decode([2, 6, 1, 3]) == "<BOS>b<UNK><EOS>"
    assert tok.decode([0, 2, 6, 3], skip_special_tokens=True) == "b"
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_char_from_many_texts_and_array_encode():
    tok = SimpleCharacterTokenizer(CORPUS)
    text = "".join(CORPUS)
    assert tok.decode(tok.encode(text)) == text
    arr = tok.encode_array(text)
    assert arr.dtype == np.int64 and arr.tolist() == [tok.token_to_id(c) for c in text]
    assert [a.tolist() for a in tok.encode_arrays(CORPUS[:3])] == tok.encode_batch(CORPUS[:3])


def test_char_decode_rejects_bad_ids():
    tok = SimpleCharacterTokenizer("abc")
    with pytest.raises(TokenizerError, match="token id 7 is out of range for a vocabulary of 7"):
        tok.decode([4, 7])
    with pytest.raises(TokenizerError, match="token id -1"):
        tok.decode([-1])


@given(st.text(alphabet="abc xyz\n\t🙂é", max_size=200))
@settings(max_examples=60, deadline=None)
def test_char_round_trip_property(text):
    tok = SimpleCharacterTokenizer("abc xyz\n\t🙂é")
    assert tok.decode(tok.encode(text)) == text


def test_char_save_load_is_json(tmp_path):
    tok = SimpleCharacterTokenizer(CORPUS)
    path = tmp_path / "sub" / "char.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "char" and data["format_version"] == 1
    assert data["vocab"][:4] == ["<PAD>", "<UNK>", "<BOS>", "<EOS>"]
    loaded = SimpleCharacterTokenizer.load(path)
    assert loaded == tok and loaded.identity == tok.identity
    assert loaded.encode("東京 🙂 xyz") == tok.encode("東京 🙂 xyz")
    assert isinstance(load_tokenizer(path), SimpleCharacterTokenizer)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "invalid JSON at line 1"),
    (b"[1, 2]", "not a tokenizer file"),
    (b'{"type": "char", "format_version": 99, "vocab": []}', "format_version=99"),
    (b'{"type": "bpe", "format_version": 1, "tokenizer": {}}', "tokenizer type is 'bpe', expected 'char'"),
    (b'{"type": "char", "format_version": 1, "vocab": ["<PAD>", "<UNK>", "<BOS>", "<EOS>", "ab"]}',
     "corrupt char tokenizer"),
    (b'{"type": "char", "format_version": 1, "vocab": ["a", "<PAD>"]}', "corrupt char tokenizer"),
    (b'{"type": "char", "format_version": 1, "vocab": 3}', "corrupt char tokenizer"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (pickle.dumps({"type": "char"}), "looks like a pickle"),
])
def test_char_load_errors_name_the_path(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as info:
        SimpleCharacterTokenizer.load(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_load_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "missing.json"
    for loader in (SimpleCharacterTokenizer.load, BPETokenizer.load, load_tokenizer):
        with pytest.raises(TokenizerError, match=f"tokenizer file not found: {missing}"):
            loader(missing)


# ---------------------------------------------------------------------- bpe
def test_bpe_special_ids_and_vocab(bpe):
    assert (bpe.pad_id, bpe.unk_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2, 3)
    assert 260 < bpe.vocab_size <= 320
    assert bpe.special_tokens == ("<PAD>", "<UNK>", "<BOS>", "<EOS>")
    ids = bpe.encode("def add(a, b):\n    return a + b\n")
    assert len(ids) < len("def add(a, b):\n    return a + b\n")  # merges were learned
    assert max(ids) < bpe.vocab_size and min(ids) >= 4  # plain text never yields special ids


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.encode_array(text).tolist() == ids


@given(st.text(max_size=80))
@settings(max_examples=80, deadline=None)
def test_bpe_round_trip_property(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_decode_specials_and_bad_ids(bpe):
    ids = [bpe.bos_id, *bpe.encode("hi"), bpe.eos_id]
    assert bpe.decode(ids) == "<BOS>hi<EOS>"
    assert bpe.decode(ids, skip_special_tokens=True) == "hi"
    with pytest.raises(TokenizerError, match=f"token id {bpe.vocab_size} is out of range"):
        bpe.decode([5, bpe.vocab_size])


def test_bpe_batch_matches_single(bpe):
    assert bpe.encode_batch(UNICODE_SAMPLES) == [bpe.encode(t) for t in UNICODE_SAMPLES]
    arrays = bpe.encode_arrays(UNICODE_SAMPLES)
    assert all(a.dtype == np.int64 for a in arrays)


def test_bpe_training_is_deterministic_and_accepts_files(tmp_path, bpe):
    again = BPETokenizer.train(CORPUS, vocab_size=320)
    assert again.identity == bpe.identity
    files = []
    for i, text in enumerate(CORPUS):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(text, encoding="utf-8")
        files.append(p)
    from_files = BPETokenizer.train(files, vocab_size=320)
    assert from_files.encode("return a + b") == bpe.encode("return a + b")
    with pytest.raises(TokenizerError, match="vocab_size=100 must be >= 260"):
        BPETokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(TokenizerError, match=str(tmp_path / "gone.txt")):
        BPETokenizer.train([tmp_path / "gone.txt"], vocab_size=300)


def test_bpe_save_load(tmp_path, bpe):
    path = tmp_path / "bpe.json"
    bpe.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "bpe" and "model" in data["tokenizer"]
    loaded = BPETokenizer.load(path)
    assert loaded == bpe and loaded.vocab_size == bpe.vocab_size
    for text in UNICODE_SAMPLES:
        assert loaded.encode(text) == bpe.encode(text)
        assert loaded.decode(loaded.encode(text)) == text  # encode_special_tokens survives loading
    assert isinstance(load_tokenizer(path), BPETokenizer)


def test_bpe_corrupt_file(tmp_path):
    path = tmp_path / "bpe.json"
    path.write_text(json.dumps({"type": "bpe", "format_version": 1, "tokenizer": {"model": "nonsense"}}))
    with pytest.raises(TokenizerError, match=f"{path}: corrupt bpe tokenizer"):
        BPETokenizer.load(path)
    path.write_text(json.dumps({"type": "bpe", "format_version": 1}))
    with pytest.raises(TokenizerError, match=f"{path}: corrupt bpe tokenizer"):
        load_tokenizer(path)


# ---------------------------------------------------------------------- dispatch and checks
def test_build_tokenizer_dispatch():
    char = build_tokenizer("char", ["abc", "cde"])
    assert isinstance(char, SimpleCharacterTokenizer) and char.vocab_size == 4 + 5
    bpe = build_tokenizer("bpe", CORPUS, vocab_size=300)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size <= 300
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'; expected one of: char, bpe"):
        build_tokenizer("wordpiece", CORPUS)


def test_load_tokenizer_unknown_type(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"type": "sentencepiece", "format_version": 1}))
    with pytest.raises(TokenizerError, match=f"{path}: unknown tokenizer type 'sentencepiece'"):
        load_tokenizer(path)


def test_check_vocab(bpe):
    check_vocab(bpe, bpe.vocab_size)
    check_vocab(bpe, ModelSpec(vocab_size=512))
    with pytest.raises(TokenizerError) as info:
        check_vocab(bpe, 256)
    msg = str(info.value)
    assert f"{bpe.vocab_size} tokens" in msg and "model.vocab_size=256" in msg
    char = SimpleCharacterTokenizer("".join(chr(0x4E00 + i) for i in range(300)))
    with pytest.raises(TokenizerError, match=r"\(char\) has 304 tokens but model.vocab_size=256"):
        check_vocab(char, ModelSpec())


def test_saved_files_are_never_pickles(tmp_path, bpe):
    for tok, name in ((SimpleCharacterTokenizer("xy"), "c.json"), (bpe, "b.json")):
        tok.save(tmp_path / name)
        raw = (tmp_path / name).read_bytes()
        assert raw[:1] == b"{" and json.loads(raw)["type"] == tok.type
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["b.json", "c.json"]  # no temp leftovers


def test_unknown_prompt_characters_warn_once_naming_them():
    import warnings

    tok = SimpleCharacterTokenizer("abc ")
    with pytest.warns(UserWarning) as caught:
        ids = tok.encode("abc é€é\n")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "3 character(s) not in the vocabulary encoded as <UNK>: 'é', '€', '\\n'" in message
    assert ids[4:] == [tok.unk_id] * 4 and ids[:4] == tok.encode("abc ")
    with pytest.warns(UserWarning) as caught:
        tok.encode("".join(chr(0x4E00 + i) for i in range(15)) * 2)
    message = str(caught[0].message)
    assert len(caught) == 1 and "15 character(s)" in message and message.endswith("and 5 more")
    assert f"'{chr(0x4E00 + 9)}'" in message and f"'{chr(0x4E00 + 10)}'" not in message  # the first 10 only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known text and the corpus path stay silent
        tok.encode("cab a")
        assert (tok.encode_array("zzz") == tok.unk_id).all()
