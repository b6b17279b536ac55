"""The covering array of ``parity_tests.covering`` holds every pair of feature choices (cheap: no model runs)."""

from __future__ import annotations

import itertools

from parity_tests.covering import FACTORS, ROWS, allowed, missing_pairs, required_pairs, row_spec


def test_every_pair_of_choices_is_in_some_row():
    missing = missing_pairs(ROWS)
    assert not missing, f"{len(missing)} pairs in no row, e.g. {missing[:3]}"


def test_required_pairs_are_all_pairs_but_the_impossible():
    """Only RoPE with an odd head size (rotate-half needs an even head_dim) and a tied head with a
    bias of its own are left out."""
    every = sum(len(a) * len(b) for a, b in itertools.combinations(FACTORS.values(), 2))
    assert len(required_pairs()) == every - 2
    assert (("position", "rope"), ("head_dim", "odd")) not in required_pairs()
    assert (("tie_embeddings", True), ("lm_head_bias", True)) not in required_pairs()


def test_rows_are_complete_valid_specs():
    assert len(ROWS) <= 24  # a CI budget: each row is one whole-model comparison
    for row in ROWS:
        assert set(row) == set(FACTORS) and allowed(row)
        spec = row_spec(row)
        assert spec.position.value == row["position"] and spec.use_moe == (row["mlp"] != "dense")


def test_the_check_sees_a_missing_pair():
    """The last row was added for pairs no earlier row held: without it the check reports them."""
    assert missing_pairs(ROWS[:-1])
    assert missing_pairs([]) == sorted(required_pairs(), key=repr)
