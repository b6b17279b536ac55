"""The throughput harness on the CPU (tiny preset): files written and well-formed, failures reported.

Timings are never asserted (timings live in the benchmark results, with their card, versions and config); what is asserted is the
harness: every mode yields a record, the same weights and data give the same first loss in both
backends, a broken mode is reported with its error instead of hidden, and JSON / Markdown / PNG
are written and parse.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.hardware import card_peak_tflops, card_slug  # noqa: E402
from benchmarks.throughput import parse_mode  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--out-dir", str(out),
           "--date", "2000-01-01", "--modes", "torch-eager", "jax-jit", "jax-jit[attention=bogus]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_smoke_writes_wellformed_files(smoke_run):
    stem = smoke_run / "tiny_cpu_2000-01-01"
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["preset"] == "tiny" and record["config"]["model"]["hidden_size"] == 64
    for key in ("torch", "jax", "flax", "optax", "numpy"):
        assert record["env"][key], key
    w = record["workload"]
    assert w["tokens_per_step"] == w["global_batch"] * w["seq_len"] == 8 * 32
    modes = [r["mode"] for r in record["results"]]
    assert modes == ["torch-eager", "jax-jit", "jax-jit[attention=bogus]"]
    ok = [r for r in record["results"] if r["status"] == "ok"]
    assert [r["mode"] for r in ok] == ["torch-eager", "jax-jit"]
    for r in ok:
        st = r["step_time"]
        assert st["min_s"] <= st["median_s"] <= st["max_s"] and st["windows"] == 2
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["mfu_card"] is None  # no card on a CPU: no datasheet peak to divide by
        assert math.isfinite(r["loss_last"])
    # Same seeded weights, same batches: the first loss agrees across backends (float32 on CPU).
    assert ok[0]["loss_step0"] == pytest.approx(ok[1]["loss_step0"], rel=1e-5)
    assert ok[0]["loss_step0"] == pytest.approx(math.log(128), rel=0.05)  # near-uniform at init

    md = stem.with_suffix(".md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per mode
    assert "| torch-eager | ok |" in md and "| jax-jit | ok |" in md
    assert stem.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    latest = (smoke_run / "LATEST.md").read_text()
    assert "tiny_cpu_2000-01-01.png" in latest


def test_failed_mode_is_reported_with_its_error(smoke_run):
    record = json.loads((smoke_run / "tiny_cpu_2000-01-01.json").read_text())
    bad = record["results"][-1]
    assert bad["status"] == "failed"
    assert "attention_impl='bogus'" in bad["error"]
    md = (smoke_run / "tiny_cpu_2000-01-01.md").read_text()
    assert "| jax-jit[attention=bogus] | **failed**: ValueError" in md


def test_render_rebuilds_md_and_png_from_json(smoke_run, tmp_path):
    src = smoke_run / "tiny_cpu_2000-01-01.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--render", str(src),
           "--out-dir", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "tiny_cpu_2000-01-01.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "tiny_cpu_2000-01-01.md").read_text() == (smoke_run / "tiny_cpu_2000-01-01.md").read_text()


def test_parse_mode():
    assert parse_mode("torch-compile") == ("torch-compile", {})
    assert parse_mode("jax-jit[attention=xla,donate=0]") == ("jax-jit", {"attention": "xla", "donate": "0"})
    with pytest.raises(SystemExit, match="unknown mode"):
        parse_mode("tf-eager")


def test_card_peak_and_slug():
    assert card_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert card_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert card_peak_tflops(None) is None
    assert card_slug("NVIDIA H100 80GB HBM3") == "H100-80GB-HBM3"
    assert card_slug(None) == "cpu"


def _record(results):
    return {"workload": {"flops_per_token": 1e9}, "peak": {"card_bf16_tflops": 1000.0,
                                                          "measured_matmul_tflops": 800.0},
            "results": results}


def test_mfu_and_targets_say_by_how_much():
    rec = _record([{"mode": "a", "status": "ok", "tokens_per_s": 400_000.0},
                   {"mode": "b", "status": "failed", "error": "OOM"}])
    report.add_derived(rec)
    a = rec["results"][0]
    assert a["mfu_card"] == pytest.approx(0.4) and a["mfu_measured"] == pytest.approx(0.5)
    assert "mfu_card_causal" not in a  # the workload gave no causal count
    causal = _record([{"mode": "a", "status": "ok", "tokens_per_s": 400_000.0}])
    causal["workload"]["flops_per_token_causal"] = 0.75e9
    report.add_derived(causal)
    assert causal["results"][0]["mfu_card_causal"] == pytest.approx(0.3)
    out = report.check_targets(rec, [
        {"mode": "a", "metric": "tokens_per_s", "threshold": 500_000, "label": "a fast"},
        {"mode": "a", "metric": "mfu_card", "threshold": 0.3, "label": "a mfu"},
        {"mode": "b", "metric": "tokens_per_s", "threshold": 1, "label": "b runs"},
        {"mode": "*", "metric": "all_modes_ok", "threshold": 1, "label": "all"},
    ])
    assert [t["met"] for t in out] == [False, True, False, False]
    assert out[0]["ratio"] == pytest.approx(0.8) and "-20.0%" in out[0]["detail"]
    assert "failed" in out[2]["detail"] and "['b']" in out[3]["detail"]


def test_scaling_harness_on_cpu(tmp_path):
    """Two host 'devices': every variant gets a 2-process/2-device run; DDP-only options share one 1-GPU run."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--device", "cpu", "--presets", "tiny",
           "--modes", "torch-eager", "torch-eager[bucket_mb=1,static_graph=1]", "jax-jit[xla=lhs]",
           "--gpus", "2", "--warmup", "1", "--steps", "1", "--repeats", "2", "--out-dir", str(tmp_path),
           "--profile-steps", "1", "--mode-timeout-s", "120",  # profiled steps on every rank, or DDP hangs
           "--date", "2000-01-01"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "scaling_cpux2_2000-01-01.json").read_text())
    runs = record["runs"]
    assert [r["mode"] for r in runs] == ["torch-eager", "torch-eager[bucket_mb=1,static_graph=1]", "jax-jit[xla=lhs]"]
    for r in runs:
        assert r["gpus_1"]["status"] == "ok" and r["gpus_2"]["status"] == "ok", r
        assert r["gpus_2"]["global_batch"] == 2 * r["gpus_1"]["global_batch"]
        assert r["ratio"] == pytest.approx(r["gpus_2"]["tokens_per_s"] / r["gpus_1"]["tokens_per_s"])
    assert runs[0]["gpus_1"] == runs[1]["gpus_1"]  # the same 1-process run, not a second one
    assert runs[1]["gpus_2"]["options"]["bucket_mb"] == "1" and runs[1]["gpus_2"]["options"]["static_graph"] == "1"
    assert runs[0]["gpus_2"]["options"]["bucket_mb"] == "auto" and runs[0]["gpus_2"]["options"]["bucket_mb_used"] == "25.0"
    assert runs[2]["gpus_2"]["options"]["xla"] == "lhs"
    for r in runs[:2]:
        assert "profile" in r["gpus_2"], r  # rank 0 reports it; the other rank ran the same steps
    md = (tmp_path / "scaling_cpux2_2000-01-01.md").read_text()
    assert md.count("| tiny |") == 3


def test_unknown_xla_flag_set_is_refused():
    with pytest.raises(SystemExit, match="xla='nope' is not one of"):
        parse_mode("jax-jit[xla=nope]")


def test_worker_timeout_kills_the_whole_process_tree(tmp_path):
    """A timed-out launcher's children (torchrun's workers) must not outlive it and hold the GPUs."""
    from benchmarks.throughput import run_worker

    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    res = run_worker("unused", {}, tmp_path, "hang", timeout=3.0, device="cpu", launcher=[sys.executable, "-c", code])
    assert res["status"] == "failed" and "timed out after 3 s" in res["error"]
    pid = int(pid_file.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {pid} still running after the timeout")
