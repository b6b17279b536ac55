"""A pairwise covering array of feature choices: every PAIR of choices appears in some row.

Hypothesis draws a dozen examples per CI run, far too few to meet every combination of a dozen
features (RoPE with attention bias, GQA with MoE capacity, an odd head size with tied embeddings,
...). These rows are run as fixed whole-model examples on every CI run (``test_model_parity.py``),
so any interaction between two features is compared at least once; ``test_covering.py`` checks the
covering property of the list itself.

The rows are built once, deterministically (a seeded greedy construction in the style of AETG: each
new row starts from a pair not yet covered and fills the other features to cover as many new pairs
as possible).
"""

from __future__ import annotations

import itertools
import random

from llm.spec import ModelSpec

FACTORS: dict[str, tuple] = {
    "position": ("rope", "learned", "sinusoidal"),
    "norm_type": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post"),
    "activation": ("gelu", "gelu_tanh", "silu", "relu"),
    "use_glu": (False, True),
    "attention_bias": (False, True),
    "heads": ("mha", "gqa", "mqa"),
    "mlp": ("dense", "moe_dropless", "moe_capacity"),
    "tie_embeddings": (False, True),
    "lm_head_bias": (False, True),
    "sliding_window": (None, 1, 3),
    "head_dim": ("even", "odd"),
    "mlp_bias": (False, True),
    "weights": ("init", "perturbed"),
}
HEADS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (4, 1)}  # (num_heads, num_kv_heads)
HEAD_DIM = {"even": 4, "odd": 5}


def allowed(row: dict) -> bool:
    """Whether a (partial) row can be built: rotate-half RoPE needs an even head_dim; a tied head
    has no bias of its own."""
    return (not (row.get("position") == "rope" and row.get("head_dim") == "odd")
            and not (row.get("tie_embeddings") is True and row.get("lm_head_bias") is True))


def required_pairs() -> set[tuple[tuple[str, object], tuple[str, object]]]:
    """Every pair of choices of two different features that some valid row can hold."""
    pairs = set()
    for (f, values), (g, others) in itertools.combinations(FACTORS.items(), 2):
        for a, b in itertools.product(values, others):
            if allowed({f: a, g: b}):
                pairs.add(((f, a), (g, b)))
    return pairs


def pairs_of(row: dict) -> set[tuple[tuple[str, object], tuple[str, object]]]:
    items = [(f, row[f]) for f in FACTORS if f in row]
    return set(itertools.combinations(items, 2))


def missing_pairs(rows: list[dict]) -> list:
    """The required pairs that no row holds."""
    held = set().union(*(pairs_of(row) for row in rows))
    return sorted((pair for pair in required_pairs() if pair not in held), key=repr)


def _new_row(uncovered: set, rng: random.Random) -> dict:
    (f, a), (g, b) = min(uncovered, key=repr)  # deterministic start: the first uncovered pair
    row = {f: a, g: b}
    rest = [name for name in FACTORS if name not in row]
    rng.shuffle(rest)
    for name in rest:
        options = [v for v in FACTORS[name] if allowed({**row, name: v})]
        rng.shuffle(options)
        row[name] = max(options, key=lambda v: len(pairs_of({**row, name: v}) & uncovered))
    return {name: row[name] for name in FACTORS}


def covering_rows(seed: int = 0, candidates: int = 5) -> list[dict]:
    """Rows (feature -> choice) that together hold every pair of ``required_pairs()``."""
    rng = random.Random(seed)
    uncovered = required_pairs()
    rows = []
    while uncovered:
        best = max((_new_row(uncovered, rng) for _ in range(candidates)),
                   key=lambda r: len(pairs_of(r) & uncovered))
        rows.append(best)
        uncovered -= pairs_of(best)
    return rows


def row_spec(row: dict) -> ModelSpec:
    """The small one-block model a row describes (one block holds every feature of the row)."""
    num_heads, num_kv_heads = HEADS[row["heads"]]
    moe = row["mlp"] != "dense"
    return ModelSpec(
        vocab_size=32, max_seq_len=12, hidden_size=16, num_layers=1, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=HEAD_DIM[row["head_dim"]], activation=row["activation"],
        use_glu=row["use_glu"], norm_type=row["norm_type"], norm_position=row["norm_position"],
        position=row["position"], tie_embeddings=row["tie_embeddings"], lm_head_bias=row["lm_head_bias"],
        attention_bias=row["attention_bias"],
        sliding_window=row["sliding_window"], mlp_bias=row["mlp_bias"], use_moe=moe, num_experts=4,
        num_experts_per_token=2, capacity_factor=0.5 if row["mlp"] == "moe_capacity" else None,
        router_aux_loss_coef=0.01, router_z_loss_coef=1e-3 if moe else 0.0, init_std=0.1,
    )


ROWS = covering_rows()
