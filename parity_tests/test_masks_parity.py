"""Padding masks, packed segments and per-row positions: PyTorch vs Flax, and each against the
unpadded / unpacked computation it must reproduce.

Specs are drawn over the dense ModelSpec space (GQA, RoPE, learned and sinusoidal positions,
sliding windows, tied embeddings); MoE is left out because expert capacity counts the padded
tokens too, so a padded MoE row is not the unpadded one. Values and every gradient are compared
in float32 with ``llm.parity.Tolerances``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, note, settings
from hypothesis import strategies as st

from llm.backend import backend
from llm.parity import Tolerances, compare, flax_pass, torch_pass
from llm.spec import ModelSpec, init_params
from parity_tests.recording import count, record
from parity_tests.strategies import examples, specs

TOL = Tolerances()


def assert_parity(spec: ModelSpec, ids: np.ndarray, targets: np.ndarray, inputs: dict[str, np.ndarray],
                  seed: int, label: str) -> None:
    params = init_params(spec, seed)
    ref = torch_pass(spec, params, ids, targets, inputs)
    other = flax_pass(spec, params, ids, targets, inputs)
    report = compare(spec, ref, other, TOL)
    note(f"spec={spec.to_dict()} inputs={ {k: v.tolist() for k, v in inputs.items()} }")
    for key in ("logits_rel_err", "loss_abs_err", "grad_max_rel_err", "hidden_max_rel_err"):
        record(key, report[key], label)
    count(label)
    for row in report["layers"]:
        assert row["rel_err"] <= TOL.hidden_rel, f"activation {row['name']}: rel err {row['rel_err']:.3e}"
    assert report["logits_rel_err"] <= TOL.logits_rel, report["logits_rel_err"]
    assert report["loss_abs_err"] <= TOL.loss_abs, (ref.loss, other.loss)
    for name, g in report["grads"].items():
        assert g["rel_err"] <= TOL.grad_rel, f"grad {name}: rel err {g['rel_err']:.3e}"
    assert np.all(np.isfinite(ref.logits)) and np.all(np.isfinite(other.logits))


def padded_batch(draw, spec: ModelSpec, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, targets (padding targets -100) and a mask with each row left- or right-padded."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, spec.vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        real = draw(st.integers(1, seq))
        if draw(st.booleans()):
            mask[b, seq - real:] = 1  # left padding
        else:
            mask[b, :real] = 1  # right padding
    ids = np.where(mask == 1, ids, 0 if spec.pad_token_id is None else spec.pad_token_id)
    targets = np.roll(ids, -1, axis=1)
    targets[:, -1] = -100
    targets[np.roll(mask, -1, axis=1) == 0] = -100  # a target that is padding
    return ids, targets, mask


def packed_batch(draw, spec: ModelSpec, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """ids, targets, and segment ids + restarting positions for rows of 1-3 documents."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    ids = rng.integers(0, spec.vocab_size, size=(batch, seq), dtype=np.int64)
    segments = np.zeros((batch, seq), np.int64)
    positions = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        cuts = sorted(draw(st.sets(st.integers(1, seq - 1), max_size=2))) if seq > 1 else []
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, seq])):
            segments[b, lo:hi] = i
            positions[b, lo:hi] = np.arange(hi - lo)
    targets = np.roll(ids, -1, axis=1)
    targets[:, -1] = -100
    targets[np.roll(segments, -1, axis=1) != segments] = -100  # no target across a document end
    return ids, targets, {"segment_ids": segments, "positions": positions}


# every example compiles new JAX programs: fewer under ci, the profile's count under thorough
DRAWN = examples(ci=4)


@settings(max_examples=DRAWN)
@given(spec=specs(moe=False), batch=st.integers(1, 3), seq=st.integers(1, 16), data=st.data())
def test_padded_batch_parity(spec, batch, seq, data):
    if data.draw(st.booleans()):
        spec = spec.replace(pad_token_id=data.draw(st.integers(0, spec.vocab_size - 1)))
    ids, targets, mask = padded_batch(data.draw, spec, batch, min(seq, spec.max_seq_len))
    assert_parity(spec, ids, targets, {"attention_mask": mask}, 0, "padded")


@settings(max_examples=DRAWN)
@given(spec=specs(moe=False), batch=st.integers(1, 3), seq=st.integers(1, 16), data=st.data())
def test_packed_batch_parity(spec, batch, seq, data):
    ids, targets, inputs = packed_batch(data.draw, spec, batch, min(seq, spec.max_seq_len))
    if data.draw(st.booleans()):
        del inputs["positions"]  # positions run on across documents (data.reset_positions: false)
    assert_parity(spec, ids, targets, inputs, 1, "packed")


def _logits(name: str, spec: ModelSpec, params: dict, ids: np.ndarray, **inputs: np.ndarray) -> np.ndarray:
    """Float32 logits of one backend's eval-mode model with the extra (B, T) inputs."""
    impl = backend(name)
    model = impl.from_canonical(spec, params)
    if name == "torch":
        import torch

        model.eval()
        with torch.no_grad():
            extra = {k: torch.from_numpy(v) for k, v in inputs.items()}
            return model(torch.from_numpy(ids), **extra).logits.numpy()
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids), **{k: jnp.asarray(v) for k, v in inputs.items()}).logits)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


@settings(max_examples=DRAWN)
@given(spec=specs(moe=False), seq=st.integers(1, 12), pad=st.integers(1, 4), seed=st.integers(0, 2**16),
       name=st.sampled_from(["torch", "jax"]))
def test_left_padded_row_is_the_unpadded_row(spec, seq, pad, seed, name):
    """A left-padded row's real positions compute exactly what the row alone does."""
    seq = min(seq, spec.max_seq_len - pad)
    params = init_params(spec, seed)
    row = np.random.default_rng(seed).integers(0, spec.vocab_size, size=(1, seq), dtype=np.int64)
    other = np.random.default_rng(seed + 1).integers(0, spec.vocab_size, size=(1, seq + pad), dtype=np.int64)
    ids = np.concatenate([np.concatenate([np.zeros((1, pad), np.int64), row], axis=1), other])
    mask = np.ones_like(ids)
    mask[0, :pad] = 0
    padded = _logits(name, spec, params, ids, attention_mask=mask)
    alone = _logits(name, spec, params, row)
    assert _rel(padded[0, pad:], alone[0]) <= TOL.logits_rel
    full = _logits(name, spec, params, other)  # the unpadded second row is untouched by the mask
    assert _rel(padded[1], full[0]) <= TOL.logits_rel


@settings(max_examples=DRAWN)
@given(spec=specs(moe=False), data=st.data(), seed=st.integers(0, 2**16), name=st.sampled_from(["torch", "jax"]))
def test_packed_row_is_each_document_alone(spec, data, seed, name):
    """With segment ids and restarting positions, each document of a packed row is the document run alone."""
    lengths = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))  # <= 12, the smallest drawn max_seq_len
    params = init_params(spec, seed)
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, spec.vocab_size, size=(1, n), dtype=np.int64) for n in lengths]
    ids = np.concatenate(docs, axis=1)
    segments = np.concatenate([np.full((1, n), i, np.int64) for i, n in enumerate(lengths)], axis=1)
    positions = np.concatenate([np.arange(n)[None] for n in lengths], axis=1).astype(np.int64)
    packed = _logits(name, spec, params, ids, segment_ids=segments, positions=positions)
    start = 0
    for doc in docs:
        alone = _logits(name, spec, params, doc)
        assert _rel(packed[0, start:start + doc.shape[1]], alone[0]) <= TOL.logits_rel
        start += doc.shape[1]


def test_pad_token_row_gets_no_gradient():
    """model.pad_token_id: the pad row of an untied table has gradient exactly 0 in both backends,
    while the other rows that occur in the batch do get one."""
    spec = ModelSpec(vocab_size=16, max_seq_len=8, hidden_size=16, num_layers=1, num_heads=2, pad_token_id=3)
    ids = np.array([[3, 3, 5, 6, 7, 3], [1, 2, 3, 4, 3, 3]], np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int64)
    targets = np.roll(ids, -1, axis=1)
    targets[:, -1] = -100
    params = init_params(spec, 0)
    for result in (torch_pass(spec, params, ids, targets, {"attention_mask": mask}),
                   flax_pass(spec, params, ids, targets, {"attention_mask": mask})):
        g = result.grads["embed.weight"]
        assert np.all(g[3] == 0.0)
        assert np.all(np.abs(g[[1, 2, 5, 6]]).sum(axis=1) > 0)
