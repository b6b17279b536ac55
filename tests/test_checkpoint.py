"""The canonical checkpoint format: atomic writes, hashes, strict loading."""

import json

import numpy as np
import pytest

from llm.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from llm.spec import ModelSpec, init_params

SPEC = ModelSpec(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=8)


def _save(path, **kw):
    return save_checkpoint(path, init_params(SPEC, 3), {"model": SPEC.to_dict()}, **kw)


def test_round_trip_with_state(tmp_path):
    moments = {"exp_avg.embed.weight": np.ones((32, 16), np.float32)}
    _save(tmp_path / "ck", state_tensors=moments, state_meta={"step": 7})
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.spec == SPEC and ck.state_meta == {"step": 7}
    ref = init_params(SPEC, 3)
    for k, v in ref.items():
        np.testing.assert_array_equal(ck.params[k], v)
    np.testing.assert_array_equal(ck.state_tensors["exp_avg.embed.weight"], 1.0)
    files = json.loads((tmp_path / "ck" / "manifest.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "config.json", "state.safetensors", "state.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_refuses_to_overwrite_unless_asked(tmp_path):
    _save(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="already exists"):
        _save(tmp_path / "ck")
    _save(tmp_path / "ck", overwrite=True)
    verify_checkpoint(tmp_path / "ck")


def test_bad_params_are_rejected_before_writing(tmp_path):
    params = init_params(SPEC)
    params.pop("lm_head.weight")
    with pytest.raises(Exception, match="missing 1: lm_head.weight"):
        save_checkpoint(tmp_path / "ck", params, {"model": SPEC.to_dict()})
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove_manifest", "remove_model"])
def test_corruption_is_detected(tmp_path, damage):
    path = _save(tmp_path / "ck")
    model = path / "model.safetensors"
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[-5] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "remove_manifest":
        (path / "manifest.json").unlink()
    else:
        model.unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_latest_valid_skips_corrupt_newer(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root / "step_10")
    _save(root / "step_20")
    (root / "step_20" / "model.safetensors").write_bytes(b"torn")
    (root / "step_30").mkdir()  # torn: no manifest
    best, skipped = latest_valid_checkpoint(root)
    assert best == root / "step_10"
    assert [p.name for p, _ in skipped] == ["step_30", "step_20"]
    assert "sha256 mismatch" in skipped[1][1]


def test_extra_files_are_hashed(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"type": "char"}')
    path = _save(tmp_path / "ck", extra_files={"tokenizer.json": tok, "notes.txt": b"hello"})
    assert (path / "tokenizer.json").read_text() == '{"type": "char"}'
    (path / "notes.txt").write_bytes(b"HELLO")
    with pytest.raises(CheckpointError, match="notes.txt: sha256 mismatch"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="plain file name"):
        _save(tmp_path / "ck2", extra_files={"../x": b""})


# ---------------------------------------------------------------------- corrupt files behind or in the manifest
def _tiny_checkpoint(tmp_path):
    from llm.spec import ModelSpec, init_params

    spec = ModelSpec(vocab_size=16, max_seq_len=8, hidden_size=8, num_layers=1, num_heads=2)
    return save_checkpoint(tmp_path / "ck", init_params(spec, 0), {"model": spec.to_dict()},
                           state_tensors={}, state_meta={"format": "x", "step": 1, "data": {}})


@pytest.mark.parametrize("manifest", ["[]", "3", '{"format": "llm-dual-checkpoint", "files": [1]}'])
def test_a_manifest_of_the_wrong_shape_is_corrupt(tmp_path, manifest):
    path = _tiny_checkpoint(tmp_path)
    (path / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(path)


def _rehash(path):
    import hashlib

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name,data", [("state.json", b"{not json"), ("state.json", b"[1, 2]"),
                                       ("state.safetensors", b"\xff" * 64),
                                       ("state.safetensors", (2**40).to_bytes(8, "little") + b"{}")])
def test_unreadable_training_state_behind_a_valid_manifest_is_a_checkpoint_error(tmp_path, name, data):
    path = _tiny_checkpoint(tmp_path)
    (path / name).write_bytes(data)
    _rehash(path)
    load_checkpoint(path, load_state=False)  # the weights alone still load
    with pytest.raises(CheckpointError, match="unreadable training state"):
        load_checkpoint(path)


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["oserror", "safetensors"])
def test_a_full_disk_is_a_checkpoint_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, writer):
    from safetensors import SafetensorError

    import llm.checkpoint

    _save(tmp_path / "step_1")
    before = (tmp_path / "step_1" / "model.safetensors").read_bytes()

    def wrapped(*args, **kwargs):  # the text safetensors gives an OS error it hit while writing
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(llm.checkpoint, "save_file", _disk_full if writer == "oserror" else wrapped)
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path / "step_2")
    message = str(info.value)
    assert "the disk is full (ENOSPC" in message and "previous checkpoints are intact" in message
    assert str(tmp_path / "step_2") in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]  # no temp dir, no torn step_2
    assert (tmp_path / "step_1" / "model.safetensors").read_bytes() == before
    verify_checkpoint(tmp_path / "step_1")
    # overwriting in place fails the same way and keeps the old contents
    with pytest.raises(CheckpointError, match="disk is full"):
        _save(tmp_path / "step_1", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    assert load_checkpoint(tmp_path / "step_1").spec == SPEC


# ---------------------------------------------------------------------- named checkpoints (a task's own model)
NAMED = {"hidden.weight": np.arange(12, dtype=np.float32).reshape(4, 3), "hidden.bias": np.ones(4, np.float32)}


def _save_named(path, **kw):
    return save_checkpoint(path, NAMED, {"task": "regression"}, kind="named", **kw)


def test_a_named_checkpoint_verifies_and_loads_only_when_asked(tmp_path):
    path = _save_named(tmp_path / "ck", state_tensors={"exp_avg.hidden.bias": np.full(4, 2, np.float32)},
                       state_meta={"step": 3})
    manifest = verify_checkpoint(path)
    assert manifest["kind"] == "named" and set(manifest["files"]) == {"model.safetensors", "config.json",
                                                                      "state.safetensors", "state.json"}
    with pytest.raises(CheckpointError, match=r"named-tensor checkpoint of task 'regression', not a decoder"):
        load_checkpoint(path)
    ck = load_checkpoint(path, allow_named=True)
    assert (ck.kind, ck.spec, ck.state_meta) == ("named", None, {"step": 3})
    for name, value in NAMED.items():
        np.testing.assert_array_equal(ck.params[name], value)
    np.testing.assert_array_equal(ck.state_tensors["exp_avg.hidden.bias"], 2.0)
    assert load_checkpoint(_save(tmp_path / "canonical")).kind == "canonical"


@pytest.mark.parametrize("damage", ["flip", "kind"])
def test_a_corrupt_named_checkpoint_is_refused(tmp_path, damage):
    path = _save_named(tmp_path / "ck")
    if damage == "flip":
        model = path / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
        match = "sha256 mismatch"
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "kind": "pickle"}))
        match = "kind 'pickle' is not one of canonical, named"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, allow_named=True)


def test_a_named_checkpoint_needs_a_known_kind_and_a_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="kind='pickle' must be one of canonical, named"):
        save_checkpoint(tmp_path / "a", NAMED, {}, kind="pickle")
    with pytest.raises(CheckpointError, match="needs at least one tensor"):
        save_checkpoint(tmp_path / "b", {}, {}, kind="named")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_llm_load_of_a_named_checkpoint_says_it_is_not_a_decoder(tmp_path):
    import llm

    _save_named(tmp_path / "run" / "step_4")
    for where in (tmp_path / "run" / "step_4", tmp_path / "run"):  # the checkpoint, or a directory of them
        with pytest.raises(CheckpointError, match=r"step_4: a named-tensor checkpoint of task 'regression', "
                                                  r"not a decoder"):
            llm.load(where, backend="torch")
