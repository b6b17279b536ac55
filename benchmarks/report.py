"""Result files of the throughput benchmark: ``<preset>_<card>_<date>.{json,md,png}`` and ``LATEST.md``.

The JSON is the record (config, versions, card, peaks, every mode's numbers or its error, targets);
the Markdown table and the PNG bar chart are rendered from it, so ``throughput.py --render`` can
rebuild them from JSON alone. Framework-free (matplotlib with the Agg backend).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["add_derived", "check_targets", "write_preset_files", "render_markdown", "render_chart",
           "write_latest", "update_readme", "GIB"]

GIB = 1024**3
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def add_derived(record: dict) -> None:
    """Fill each ok mode's MFU (vs the card's datasheet peak and vs the measured matmul peak)."""
    fpt = record["workload"]["flops_per_token"]
    executed = record["workload"].get("executed_flops_per_token")
    card = record["peak"].get("card_bf16_tflops")
    measured = record["peak"].get("measured_matmul_tflops")
    for r in record["results"]:
        if r.get("status") != "ok":
            continue
        rate = r["tokens_per_s"] * fpt / 1e12  # achieved model TFLOP/s
        r["model_tflops"] = rate
        r["mfu_card"] = rate / card if card else None
        r["mfu_measured"] = rate / measured if measured else None
        causal = record["workload"].get("flops_per_token_causal")
        if causal and card:  # the same run counted with the causal discount on attention
            r["mfu_card_causal"] = r["tokens_per_s"] * causal / 1e12 / card
        if executed:
            # The blocked and grouped MoE dispatches run only the selected experts (blocked's few %
            # of padding rows not counted); the dense reference runs all of them.
            sparse = (r.get("options") or {}).get("moe", "dense") != "dense"
            r["executed_tflops"] = r["tokens_per_s"] * (fpt if sparse else executed) / 1e12
            r["hfu_card"] = r["executed_tflops"] / card if card else None
        if r.get("peak_memory_bytes") is not None:
            r["peak_memory_gib"] = r["peak_memory_bytes"] / GIB


def check_targets(record: dict, targets: list[dict]) -> list[dict]:
    """Evaluate ``targets`` ({mode, metric, threshold, label}) against the results; say by how much."""
    out = []
    by_mode = {r["mode"]: r for r in record["results"]}
    card = record.get("env", {}).get("card") or "CPU"
    for tgt in targets:
        r = by_mode.get(tgt["mode"])
        entry = dict(tgt)
        if tgt.get("card") and not re.search(tgt["card"], card):
            entry.update(measured=None, met=None, detail=f"set for {tgt['card']}; this run is on {card}")
        elif tgt["metric"] == "all_modes_ok":  # the plain modes; ablations (name[options]) are extra
            main = [m for m in record["results"] if "[" not in m["mode"]]
            bad = [m["mode"] for m in main if m.get("status") != "ok"]
            entry.update(measured=len(main) - len(bad), met=not bad and bool(main),
                         detail=f"failed or skipped: {bad}" if bad else "every mode reported")
        elif r is None or r.get("status") != "ok":
            entry.update(measured=None, met=False,
                         detail=f"mode {tgt['mode']} {'not run' if r is None else r.get('status')}")
        else:
            value = r.get(tgt["metric"])
            entry["measured"] = value
            entry["met"] = value is not None and value >= tgt["threshold"]
            if value is not None:
                entry["ratio"] = value / tgt["threshold"]
                entry["detail"] = (f"{_fmt_metric(tgt['metric'], value)} vs {_fmt_metric(tgt['metric'], tgt['threshold'])}"
                                   f" ({(value / tgt['threshold'] - 1) * 100:+.1f}%)")
        out.append(entry)
    return out


def _fmt_metric(metric: str, value: float) -> str:
    if metric.startswith("mfu") or metric.startswith("hfu"):
        return f"{value * 100:.1f}%"
    if metric == "tokens_per_s":
        return f"{value:,.0f} tok/s"
    return f"{value:g}"


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def render_markdown(record: dict, *, image: str | None = None, level: int = 2, notes: bool = True) -> str:
    """The Markdown section for one preset: workload, peaks, the per-mode table, targets, notes."""
    w, pk, env = record["workload"], record["peak"], record["env"]
    h = "#" * level
    lines = [f"{h} {record['preset']} on {env.get('card') or 'CPU'} ({record['date']})", ""]
    lines.append(f"Global batch {w['global_batch']} x {w['seq_len']} = {w['tokens_per_step']:,} tokens/step, "
                 f"{w['dtype']} (fp32 master weights), {w['params'] / 1e6:.1f}M parameters"
                 + (f" ({w['active_params'] / 1e6:.1f}M active)" if w.get("active_params") != w["params"] else "")
                 + f"; {w['flops_per_token'] / 1e9:.3f} GFLOP/token (spec, fwd+bwd"
                 + (", active experts" if w.get("executed_flops_per_token") else "")
                 + ", attention without a causal discount, as nanoGPT counts"
                 + (f"; {w['flops_per_token_causal'] / 1e9:.3f} with it, the 'causal' column"
                    if w.get("flops_per_token_causal") else "") + ").")
    meas = pk.get("measured_matmul_tflops")
    lines.append(f"Peaks: card dense bf16 {pk.get('card_bf16_tflops') or '-'} TFLOP/s (datasheet); measured "
                 f"{'-' if meas is None else f'{meas:.0f}'} TFLOP/s ({pk.get('measured_how', '-')})"
                 + (f"; copy {pk['copy_tb_per_s']:.2f} TB/s" if pk.get("copy_tb_per_s") else "") + ".")
    p = record["protocol"]
    lines.append(f"Protocol: {p['warmup']} warm-up steps after the first (compile) step, then "
                 f"{p['repeats']} windows x {p['steps']} steps, synchronised at window edges; each mode in "
                 f"its own process. Versions: torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
                 f"jax {env.get('jax')}, flax {env.get('flax')}, optax {env.get('optax')}, "
                 f"driver {env.get('driver') or '-'}.")
    lines.append("")
    hfu = any(r.get("hfu_card") is not None for r in record["results"])
    causal = any(r.get("mfu_card_causal") is not None for r in record["results"])
    head = ["mode", "status", "tokens/s", "step ms median [min, max]", "MFU vs card", "MFU vs measured"]
    head += ["MFU vs card (causal)"] if causal else []
    head += ["HFU vs card (executed)"] if hfu else []
    head += ["peak mem GiB", "compile s", "loss@0"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in record["results"]:
        if r.get("status") != "ok":
            err = (r.get("error") or r.get("status") or "").replace("|", "/").replace("\n", " ")[:240]
            row = [r["mode"], f"**{r.get('status')}**: {err}"] + ["-"] * (len(head) - 2)
        else:
            st = r["step_time"]
            row = [r["mode"], "ok", f"{r['tokens_per_s']:,.0f}",
                   f"{st['median_s'] * 1e3:.1f} [{st['min_s'] * 1e3:.1f}, {st['max_s'] * 1e3:.1f}]",
                   _pct(r.get("mfu_card")), _pct(r.get("mfu_measured"))]
            row += [_pct(r.get("mfu_card_causal"))] if causal else []
            row += [_pct(r.get("hfu_card"))] if hfu else []
            mem = r.get("peak_memory_gib")
            row += ["-" if mem is None else f"{mem:.1f}",
                    "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
                    f"{r['loss_step0']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    if record.get("targets"):
        lines += ["", "Targets:", ""]
        for t in record["targets"]:
            mark = {True: "MET", False: "MISSED", None: "not applicable"}[t.get("met")]
            lines.append(f"- {t['label']}: **{mark}** ({t.get('detail', '-')})")
    if notes and record.get("notes"):
        lines += [""] + [f"- {n}" for n in record["notes"]]
    if image:
        lines += ["", f"![{record['preset']} throughput]({image})"]
    return "\n".join(lines) + "\n"


def render_chart(record: dict, path: str | os.PathLike) -> None:
    """Bar chart of tokens/s per mode, MFU (vs the card's peak) written on each bar; failures marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    names = [r["mode"] for r in results]
    values = [r.get("tokens_per_s", 0.0) if r.get("status") == "ok" else 0.0 for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4.2), dpi=110)
    colors = ["#d62728" if r.get("status") != "ok" else
              ("#1f77b4" if r["mode"].startswith("torch") else "#2ca02c") for r in results]
    bars = ax.bar(range(len(names)), values, color=colors)
    top = max(values + [1.0])
    for bar, r in zip(bars, results, strict=True):
        if r.get("status") == "ok":
            label = f"{r['tokens_per_s']:,.0f}"
            if r.get("mfu_card") is not None:
                label += f"\nMFU {r['mfu_card'] * 100:.1f}%"
        else:
            label = str(r.get("status"))
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + top * 0.01, label,
                ha="center", va="bottom", fontsize=8)
    for tgt in record.get("targets", []):
        if tgt.get("metric") == "tokens_per_s":
            ax.axhline(tgt["threshold"], color="gray", ls="--", lw=1)
            ax.text(len(names) - 0.5, tgt["threshold"], " target", va="bottom", ha="right", fontsize=7,
                    color="gray")
            break
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_ylim(0, top * 1.22)
    w = record["workload"]
    ax.set_title(f"{record['preset']}  {w['global_batch']}x{w['seq_len']} {w['dtype']}  "
                 f"{record['env'].get('card') or 'CPU'}  {record['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def file_stem(record: dict) -> str:
    return f"{record['preset']}_{record['env'].get('card_slug') or 'cpu'}_{record['date']}"


def write_preset_files(record: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``<preset>_<card>_<date>.json/.md/.png``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(record)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(record, indent=1, default=str) + "\n")
    render_chart(record, paths["png"])
    paths["md"].write_text(render_markdown(record, image=paths["png"].name, level=1))
    return paths


def write_latest(records: list[dict], out_dir: str | os.PathLike) -> Path:
    """``LATEST.md``: every preset of the newest run, tables and charts."""
    out_dir = Path(out_dir)
    parts = ["# Latest throughput results", "",
             "Written by `benchmarks/throughput.py` (`make bench`); the JSON files next to this one hold "
             "the full record. Notes and the measured effect of each speed change: `benchmarks/NOTES.md`.", ""]
    for rec in records:
        parts.append(render_markdown(rec, image=f"{file_stem(rec)}.png", level=2))
    path = out_dir / "LATEST.md"
    path.write_text("\n".join(parts))
    return path


def update_readme(readme: str | os.PathLike, records: list[dict], results_rel: str) -> bool:
    """Replace the block between the bench markers in the README with the newest tables and charts."""
    readme = Path(readme)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    body = [README_START, "", f"Written by `benchmarks/throughput.py --render ... --update-readme`; the notes on "
            f"each run (profiles, what limits a missed target) are in [`{results_rel}/LATEST.md`]"
            f"({results_rel}/LATEST.md) and `benchmarks/NOTES.md`.", ""]
    for rec in records:
        md = render_markdown(rec, image=f"{results_rel}/{file_stem(rec)}.png", level=3, notes=False)
        body.append(md)
    body.append(README_END)
    new = re.sub(re.escape(README_START) + r".*?" + re.escape(README_END), lambda _: "\n".join(body), text,
                 flags=re.S)
    readme.write_text(new)
    return True
