"""Generation in both backends, ``llm.load`` / ``llm.api`` and ``python -m llm.generate``.

Models are tiny (V=48, D=16, 2 layers) with ``init_std=0.3``, so logits are spread out and greedy
choices are not near-ties; every batch shape is shared so the Flax steps compile once per spec.
The cross-backend greedy check over 32 tokens lives in ``parity_tests/test_generation_parity.py``.

Torch runs single-threaded here: with jax loaded in the same process, torch's intra-op thread pool
and XLA's fight over the 2 CPU cores and a 16-token torch decode goes from ~10 ms to ~2 s.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import backends.flax.inference as flax_gen
import backends.torch.inference as torch_gen
import llm
from backends.flax.convert import from_canonical as flax_from_canonical
from backends.torch.convert import from_canonical as torch_from_canonical
from llm.api import from_params
from llm.checkpoint import CheckpointError, save_checkpoint
from llm.generate import Sampling
from llm.spec import ModelSpec, init_params
from llm.tokenization import build_tokenizer

BASE = dict(vocab_size=48, max_seq_len=40, hidden_size=16, num_layers=2, num_heads=4, init_std=0.3)
SPECS = {
    "rope_gqa": ModelSpec(**BASE, num_kv_heads=2, norm_type="rmsnorm", use_glu=True, activation="silu"),
    "learned_tied": ModelSpec(**BASE, position="learned", tie_embeddings=True, attention_bias=True),
    "sliding_window": ModelSpec(**BASE, sliding_window=3, num_kv_heads=1, position="sinusoidal"),
    "moe_dropless": ModelSpec(**BASE, use_moe=True, num_experts=4, num_experts_per_token=2, num_kv_heads=2,
                              use_glu=True, norm_type="rmsnorm"),
}
B, T0, NEW = 2, 6, 16  # the prompt (6) is longer than the sliding window (3)
BACKENDS = {"torch": (torch_gen, torch_from_canonical), "jax": (flax_gen, flax_from_canonical)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _model(backend: str, name: str):
    return BACKENDS[backend][1](SPECS[name], init_params(SPECS[name], 1))


def _prompt(seed: int = 0, batch: int = B, length: int = T0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 48, (batch, length))


def _gen(backend: str):
    return BACKENDS[backend][0]


# ---------------------------------------------------------------------- cache vs recomputation
@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_greedy_equals_full_recomputation(backend, name):
    gen, model = _gen(backend), _model(backend, name)
    prompt = _prompt()
    cached = gen.generate(model, prompt, NEW)
    full = gen.generate_no_cache(model, prompt, NEW)
    assert cached.shape == (B, T0 + NEW) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached[:, :T0], prompt)
    np.testing.assert_array_equal(cached, full)
    assert len(np.unique(cached[:, T0:])) >= 3  # a real continuation, not one repeated id


def test_flax_decode_step_compiles_once_for_32_tokens():
    spec = SPECS["rope_gqa"].replace(max_seq_len=48)  # a new cache length, so nothing is cached yet
    model = flax_from_canonical(spec, init_params(spec, 1))
    before = dict(flax_gen.TRACES)
    out = flax_gen.generate(model, _prompt(batch=1), 32)
    assert out.shape == (1, T0 + 32)
    assert flax_gen.TRACES["decode_step"] - before.get("decode_step", 0) == 1
    assert flax_gen.TRACES["prefill"] - before.get("prefill", 0) == 1
    np.testing.assert_array_equal(flax_gen.generate(model, _prompt(seed=5, batch=1), 32)[:, :T0],
                                  _prompt(seed=5, batch=1))
    assert flax_gen.TRACES["decode_step"] - before.get("decode_step", 0) == 1  # reused across calls
    # Sampling values are traced: new temperature / top-k / top-p values reuse one compiled step.
    for kwargs in (dict(temperature=0.5, top_k=3), dict(temperature=1.5, top_k=7, top_p=0.8), dict(top_p=0.3)):
        flax_gen.generate(model, _prompt(batch=1), 32, **{"temperature": 1.0, **kwargs})
    assert flax_gen.TRACES["decode_step"] - before.get("decode_step", 0) == 2


# ---------------------------------------------------------------------- sampling
@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_is_seeded(backend):
    gen, model = _gen(backend), _model(backend, "rope_gqa")
    prompt = _prompt(1)
    a = gen.generate(model, prompt, NEW, temperature=1.0, seed=7)
    b = gen.generate(model, prompt, NEW, temperature=1.0, seed=7)
    c = gen.generate(model, prompt, NEW, temperature=1.0, seed=8)
    greedy = gen.generate(model, prompt, NEW)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    assert (a[0, T0:] != a[1, T0:]).any() or (prompt[0] != prompt[1]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_1_and_tiny_top_p_are_greedy(backend):
    gen, model = _gen(backend), _model(backend, "rope_gqa")
    prompt = _prompt(2)
    greedy = gen.generate(model, prompt, NEW)
    np.testing.assert_array_equal(gen.generate(model, prompt, NEW, temperature=1.5, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(gen.generate(model, prompt, NEW, temperature=1.5, top_p=1e-6, seed=3), greedy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_and_top_p_restrict_the_support(backend):
    gen, model = _gen(backend), _model(backend, "rope_gqa")
    prompt = _prompt(3)
    for kwargs in (dict(top_k=3), dict(top_p=0.5)):
        out = gen.generate(model, prompt, NEW, temperature=2.0, seed=11, **kwargs)
        logits = gen.logits(model, out)[:, T0 - 1:-1] / 2.0  # (B, NEW, V): what each draw saw
        chosen = out[:, T0:]
        picked = np.take_along_axis(logits, chosen[..., None], -1)
        rank = (logits > picked).sum(-1)  # how many ids beat the chosen one
        if "top_k" in kwargs:
            assert rank.max() < 3 and rank.max() > 0  # inside the top 3, and not always the argmax
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            mass_before = np.where(logits > picked, probs, 0.0).sum(-1)
            assert mass_before.max() < 0.5 + 1e-5 and rank.max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_ends_a_row_and_fills_it(backend):
    gen, model = _gen(backend), _model(backend, "rope_gqa")
    prompt = _prompt(4)
    greedy = gen.generate(model, prompt, NEW)
    eos = int(greedy[0, T0 + 3])
    out = gen.generate(model, prompt, NEW, eos_id=eos)
    first = T0 + int(np.argmax(greedy[0, T0:] == eos))
    np.testing.assert_array_equal(out[0, :first + 1], greedy[0, :first + 1])
    assert (out[0, first:] == eos).all()
    for row in range(B):  # every row: greedy up to its first eos, eos after
        hits = np.flatnonzero(greedy[row, T0:] == eos)
        end = T0 + (hits[0] if len(hits) else NEW)
        np.testing.assert_array_equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == eos).all()


def test_sampling_validation():
    for bad in (-0.1, float("nan"), float("inf"), "hot", True):
        with pytest.raises(ValueError, match="temperature"):
            Sampling.create(bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_k"):
            Sampling.create(1.0, top_k=bad)
    for bad in (0.0, -0.2, 1.01, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            Sampling.create(1.0, top_p=bad)
    assert Sampling.create(0.0, top_k=5, top_p=0.3) == Sampling(0.0)  # greedy ignores the filters
    assert Sampling.create(0.7, top_k=100, top_p=1.0, vocab_size=48) == Sampling(0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_argument_errors(backend):
    gen, model = _gen(backend), _model(backend, "rope_gqa")
    prompt = _prompt()
    cases = [
        (dict(token_ids=prompt, max_new_tokens=NEW, temperature=-1.0), "temperature"),
        (dict(token_ids=prompt, max_new_tokens=NEW, temperature=1.0, top_k=0), "top_k"),
        (dict(token_ids=prompt, max_new_tokens=NEW, temperature=1.0, top_p=2.0), "top_p"),
        (dict(token_ids=np.zeros((2, 0), np.int64), max_new_tokens=NEW), "empty prompt"),
        (dict(token_ids=prompt, max_new_tokens=40 - T0 + 1), "exceeds max_seq_len=40"),
        (dict(token_ids=prompt, max_new_tokens=-1), "max_new_tokens"),
        (dict(token_ids=prompt[0], max_new_tokens=NEW), r"\(batch, length\)"),
        (dict(token_ids=prompt + 48, max_new_tokens=NEW), "out of range"),
        (dict(token_ids=prompt.astype(np.float32), max_new_tokens=NEW), "integers"),
        (dict(token_ids=prompt, max_new_tokens=NEW, eos_id=48), "eos_id"),
        (dict(token_ids=prompt, max_new_tokens=NEW, temperature=1.0, seed=-1), "seed"),
    ]
    for kwargs, message in cases:
        kwargs = dict(kwargs)
        ids, n = kwargs.pop("token_ids"), kwargs.pop("max_new_tokens")
        with pytest.raises(ValueError, match=message):
            gen.generate(model, ids, n, **kwargs)
    out = gen.generate(model, prompt, 40 - T0)  # exactly max_seq_len is fine
    assert out.shape == (B, 40)
    np.testing.assert_array_equal(gen.generate(model, prompt, 0), prompt)


# ---------------------------------------------------------------------- llm.load / llm.api
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tok = build_tokenizer("char", ["the quick brown fox jumps over the lazy dog."])
    assert tok.vocab_size <= 48
    tok.save(root / "tok.json")
    spec = SPECS["rope_gqa"]
    save_checkpoint(root / "with_tok", init_params(spec, 2), {"model": spec.to_dict()},
                    extra_files={"tokenizer.json": root / "tok.json"})
    save_checkpoint(root / "no_tok", init_params(spec, 2), {"model": spec.to_dict()})
    return root


def test_load_logits_match_across_backends(checkpoint):
    ids = _prompt(6, batch=3, length=9)
    out = {}
    for backend in ("torch", "jax"):
        model = llm.load(checkpoint / "with_tok", backend=backend)
        assert model.backend == backend and model.spec == SPECS["rope_gqa"]
        assert model.tokenizer is not None and model.tokenizer.vocab_size < 48
        out[backend] = model.logits(ids)
        assert out[backend].shape == (3, 9, 48) and out[backend].dtype == np.float32
        one = model.logits(ids[0])  # 1-D = a batch of 1
        assert one.shape == (1, 9, 48)
        np.testing.assert_allclose(one, out[backend][:1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(model.logits(ids[0].tolist()), one)
    rel = np.linalg.norm(out["jax"] - out["torch"]) / np.linalg.norm(out["torch"])
    assert rel <= 1e-5, rel
    assert llm.load(checkpoint / "with_tok", backend="flax").backend == "jax"


def test_loaded_model_generates_text_and_ids(checkpoint):
    model = llm.load(checkpoint / "with_tok", backend="torch")
    text = model.generate_text("the fox", 12, temperature=1.0, seed=3)
    assert isinstance(text, str) and 0 < len(text) <= 12
    assert text == model.generate_text("the fox", 12, temperature=1.0, seed=3)
    assert set(text) <= set("the quick brown fox jumps over the lazy dog.")
    ids = model.generate([5, 6, 7], 4)
    assert ids.shape == (1, 7)
    np.testing.assert_array_equal(ids, torch_gen.generate(model.model, [[5, 6, 7]], 4))
    texts = model.generate_texts("the", 10, num_samples=3, temperature=1.0, seed=1)
    assert len(texts) == 3 and len(set(texts)) > 1
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate_text("", 5)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.load(checkpoint / "no_tok").generate_text("the", 5)
    with pytest.raises(ValueError, match="same length"):
        model.logits([[1, 2], [3]])


def test_load_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="choose one of: torch, jax"):
        llm.load(checkpoint / "with_tok", backend="tensorflow")
    with pytest.raises(ValueError, match="dtype"):
        llm.load(checkpoint / "with_tok", dtype="float64")
    with pytest.raises(CheckpointError, match="does not exist"):
        llm.load(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    spec = SPECS["rope_gqa"]
    save_checkpoint(corrupt, init_params(spec, 0), {"model": spec.to_dict()})
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        llm.load(corrupt, backend="jax")
    params = init_params(spec, 0)
    params.pop("final_norm.weight")
    with pytest.raises(ValueError, match="final_norm.weight"):
        from_params(spec, params, "torch")


def test_load_picks_newest_valid_step(tmp_path):
    spec = SPECS["rope_gqa"]
    for step, seed in ((10, 0), (20, 1)):
        save_checkpoint(tmp_path / f"step_{step}", init_params(spec, seed), {"model": spec.to_dict()})
    (tmp_path / "step_30").mkdir()  # torn: no manifest
    model = llm.load(tmp_path)
    assert model.path == tmp_path / "step_20"


def test_from_params_jax_matches_direct_model():
    spec = SPECS["moe_dropless"]
    model = from_params(spec, init_params(spec, 1), "jax")
    prompt = _prompt()
    np.testing.assert_array_equal(model.generate(prompt, NEW), flax_gen.generate(_model("jax", "moe_dropless"),
                                                                                 prompt, NEW))


# ---------------------------------------------------------------------- subprocesses
def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


@pytest.mark.parametrize("backend,absent", [("torch", {"jax", "jaxlib", "flax"}), ("jax", {"torch"})])
def test_load_imports_only_the_chosen_backend(checkpoint, backend, absent):
    done = _run(f"""
        import sys
        import llm.api, llm.generate
        assert not {{"torch", "jax", "flax"}} & {{m.split(".")[0] for m in sys.modules}}
        import llm
        m = llm.load({str(checkpoint / "no_tok")!r}, backend={backend!r})
        m.generate([1, 2], 2)
        print(" ".join(sorted({{k.split(".")[0] for k in sys.modules}})))
    """)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert not loaded & absent and ("torch" if backend == "torch" else "jax") in loaded


def test_cli_prints_text_and_one_line_errors(checkpoint, tmp_path):
    cli = [sys.executable, "-m", "llm.generate"]
    done = subprocess.run([*cli, "--checkpoint", str(checkpoint / "with_tok"), "--prompt", "the lazy",
                           "--max-new-tokens", "10", "--seed", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("the lazy") and len(done.stdout.rstrip("\n")) > len("the lazy")
    for args, message in [
        (["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"], "does not exist"),
        (["--checkpoint", str(checkpoint / "no_tok"), "--prompt", "hi"], "--prompt-ids"),
        (["--checkpoint", str(checkpoint / "no_tok"), "--prompt-ids", "1,2", "--top-p", "3"], "top_p"),
        (["--checkpoint", str(checkpoint / "no_tok"), "--prompt-ids", "1,2", "--backend", "mx"], "torch, jax"),
    ]:
        done = subprocess.run([*cli, *args], capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr
    done = subprocess.run([*cli, "--checkpoint", str(checkpoint / "no_tok"), "--prompt-ids", "1,2,3",
                           "--greedy", "--max-new-tokens", "4", "--num-samples", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [[int(t) for t in line.split(",")] for line in done.stdout.split()]
    expected = llm.load(checkpoint / "no_tok").generate([1, 2, 3], 4)[0].tolist()
    assert rows == [expected, expected]


# ---------------------------------------------------------------------- vocab_limit (a padded table)
def _boosted(backend: str, limit: int):
    """A model whose logits favour the ids ``>= limit`` (embedding rows past a tokenizer's size)."""
    spec = SPECS["learned_tied"]
    params = init_params(spec, 1)
    params["embed.weight"][limit:] *= 20.0  # tied head: these rows dominate every logit vector
    return BACKENDS[backend][1](spec, params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_limit_keeps_every_pick_below_it(backend):
    gen, limit = _gen(backend), 10
    model = _boosted(backend, limit)
    free = gen.generate(model, _prompt(), NEW)[:, T0:]
    assert (free >= limit).any()  # without the limit the padded rows win
    for kwargs in (dict(), dict(temperature=3.0, seed=1), dict(temperature=1.0, top_k=5, seed=2),
                   dict(temperature=1.0, top_p=0.9, seed=3)):
        out = gen.generate(model, _prompt(), NEW, vocab_limit=limit, **kwargs)[:, T0:]
        assert out.max() < limit, kwargs
    assert (gen.generate_no_cache(model, _prompt(), NEW, vocab_limit=limit)[:, T0:] < limit).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_limit_out_of_range_is_a_value_error(backend):
    model = _model(backend, "rope_gqa")
    for bad in (0, 49, 2.5, True):
        with pytest.raises(ValueError, match=r"vocab_limit=.* must be an integer in \[1, 48\]"):
            _gen(backend).generate(model, _prompt(), 2, vocab_limit=bad)


# ---------------------------------------------------------------------- left-padded batches
@pytest.mark.parametrize("name", ["rope_gqa", "learned_tied", "sliding_window"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_generates_each_prompt_as_alone(backend, name):
    """Prompts of lengths 6, 3 and 1 batched with left padding give, greedy, the tokens each gives alone."""
    lengths = (T0, 3, 1)
    prompts = [_prompt(seed=i, batch=1, length=n) for i, n in enumerate(lengths)]
    ids = np.zeros((len(lengths), T0), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, T0 - p.shape[1]:] = p[0]
        mask[row, T0 - p.shape[1]:] = 1
    model = _model(backend, name)
    batched = _gen(backend).generate(model, ids, NEW, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = _gen(backend).generate(model, p, NEW)
        np.testing.assert_array_equal(batched[row, T0:], alone[0, p.shape[1]:], err_msg=f"row {row}")
    recomputed = _gen(backend).generate_no_cache(model, ids, NEW, attention_mask=mask)
    np.testing.assert_array_equal(batched, recomputed)
    unpadded_rows_differ = _gen(backend).generate(model, ids, NEW)  # the mask is what makes them equal
    assert not np.array_equal(unpadded_rows_differ[1:, T0:], batched[1:, T0:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_attention_mask_errors(backend):
    model, ids = _model(backend, "rope_gqa"), _prompt()
    for mask, match in ((np.ones((B, T0 - 1)), "prompt's shape"), (np.full((B, T0), 2), "only 0"),
                        (np.tile([1, 1, 1, 1, 1, 0], (B, 1)), "left padding")):
        with pytest.raises(ValueError, match=match):
            _gen(backend).generate(model, ids, 2, attention_mask=mask)
