"""``python -m llm.parity`` on the files users give it."""

from __future__ import annotations

import json

from llm.parity import main


def test_a_model_only_config_with_a_short_max_seq_len_runs(tmp_path, capsys):
    """Only the model section is used: the run config's default data.seq_len (128) is not checked
    against max_seq_len=16, and --seq-len defaults to what fits."""
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  vocab_size: 32\n  max_seq_len: 16\n  hidden_size: 16\n  num_layers: 1\n"
                    "  num_heads: 2\n")
    assert main(["--config", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["seq_len"] == 16
    assert main(["--config", str(path), "--seq-len", "16", "--json"]) == 0
