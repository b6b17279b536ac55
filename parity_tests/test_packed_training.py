"""Packed text (``data.pack_documents`` + ``data.reset_positions``) through both engines: each trains
on ``(inputs, targets, segment_ids, positions)`` batches, and each LM half's loss is its model's loss
with those arguments (loads both frameworks, so it lives here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.config import load_config
from llm.loop.tasks import get_task
from llm.train import main

REPO = Path(__file__).resolve().parents[1]
RUN = ["--max-steps", "2", "--sample-tokens", "0", "--set", "logging.progress=false",
       "--set", "training.log_every=1", "--set", "logging.every_steps=1"]


def tiny_yaml(path: Path, task: str) -> Path:
    path.write_text((REPO / "configs" / "tiny.yaml").read_text() + f"task: {task}\n")
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_packed_text_trains_and_the_lm_half_passes_segments_and_positions(backend, tmp_path, capsys):
    """data.pack_documents + reset_positions: both engines train on (inputs, targets, segment_ids,
    positions) batches, and the LM half's loss is the model's loss with those arguments."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "abc def " * (3 + i), encoding="utf-8")
    data = ["--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "data.pack_documents=true", "--set", "data.reset_positions=true",
            "--set", "data.seq_len=16", "--set", "data.val_fraction=0.3", "--set", "training.batch_size=2"]
    run = tmp_path / "run"
    rc = main(["--backend", backend, "--config", str(tiny_yaml(tmp_path / "run.yaml", "lm")),
               "--run-dir", str(run), *RUN, *data])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert losses(run).keys() == {1, 2}

    config = load_config(env={}, overrides=[f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                                            "data.pack_documents=true", "data.reset_positions=true",
                                            "data.seq_len=16", "training.batch_size=2", "data.val_fraction=0.3"])
    config = config.replace(model=config.model.replace(vocab_size=128, max_seq_len=16))
    dm = get_task("lm").build_datamodule(config)
    dm.setup()
    batch = next(b for b in (dm.batch_at(s) for s in range(dm.steps_per_epoch)) if b[2].max() > 0)
    half = get_task("lm").backend(backend)
    model = half.new_model(config)
    if backend == "torch":
        import torch

        t = [torch.from_numpy(a) for a in batch]
        with torch.no_grad():
            loss = float(half.loss(model, t)[1]["loss"])
            want = float(model(t[0], t[1], segment_ids=t[2], positions=t[3]).loss)
            unpacked = float(model(t[0], t[1]).loss)
    else:
        import jax.numpy as jnp

        j = [jnp.asarray(a) for a in batch]
        loss = float(half.loss(model, j, deterministic=True)[1]["loss"])
        want = float(model(j[0], j[1], segment_ids=j[2], positions=j[3]).loss)
        unpacked = float(model(j[0], j[1]).loss)
    assert loss == pytest.approx(want, rel=1e-6) and loss != pytest.approx(unpacked, rel=1e-6)
