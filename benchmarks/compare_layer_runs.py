"""Two trees' layer timings side by side: is one slower than the other beyond run-to-run noise?

Reads ``layer_*.csv`` files written by benchmarks/bench_layer.py, grouped by label (each label a tree,
each of its runs a separate process; the caller interleaves the labels' runs on one GPU), and writes a
Markdown table per (shape, T, implementation): each label's median over its runs of the per-run p50,
the ratio candidate / baseline, and the noise band, judged as the larger of the two labels' own
run-to-run spread (max / min of a label's run p50s) in that cell. A cell is "slower" only when the
ratio exceeds that band.

    python benchmarks/compare_layer_runs.py --baseline pre_move=run1/,run3/ --candidate head=run2/,run4/ \\
        --out benchmarks/results/layer_tree_comparison_nvidia-h200.md
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def _label_runs(spec: str) -> tuple[str, list[Path]]:
    label, _, folders = spec.partition("=")
    if not label or not folders:
        raise argparse.ArgumentTypeError(f"expected LABEL=FOLDER[,FOLDER...], got {spec!r}")
    return label, [Path(f) for f in folders.split(",")]


def read_runs(folders: list[Path]) -> list[dict[tuple, float]]:
    """One dict per run: (shape, T, impl) -> p50 ms."""
    runs = []
    for folder in folders:
        files = sorted(folder.glob("layer_*.csv"))
        if len(files) != 1:
            raise SystemExit(f"{folder}: expected one layer_*.csv, found {[f.name for f in files]}")
        with files[0].open() as f:
            runs.append({(row["shape"], int(row["T"]), row["impl"]): float(row["ms_p50"]) for row in csv.DictReader(f)})
    return runs


def compare(baseline: list[dict], candidate: list[dict]) -> list[dict]:
    """Per cell present in every run: medians, ratio candidate / baseline, noise band, verdict."""
    cells = set.intersection(*(set(run) for run in baseline + candidate))
    rows = []
    for cell in sorted(cells):
        base = [run[cell] for run in baseline]
        cand = [run[cell] for run in candidate]
        # Run-to-run spread of each tree on its own; one run gives no spread (band 1.0).
        noise = max(max(v) / min(v) for v in (base, cand))
        ratio = statistics.median(cand) / statistics.median(base)
        verdict = "slower" if ratio > noise else ("faster" if ratio < 1 / noise else "within noise")
        rows.append(dict(shape=cell[0], T=cell[1], impl=cell[2], baseline=statistics.median(base),
                         candidate=statistics.median(cand), ratio=ratio, noise=noise, verdict=verdict))
    return rows


def report(rows: list[dict], baseline_label: str, candidate_label: str, header: list[str]) -> str:
    lines = [f"# Layer timings: {candidate_label} against {baseline_label} (benchmarks/compare_layer_runs.py)", "",
             *header, "",
             f"| shape | T | impl | {baseline_label} ms | {candidate_label} ms | ratio | noise band | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['T']} | {r['impl']} | {r['baseline']:.4f} | {r['candidate']:.4f} | "
                     f"{r['ratio']:.3f} | {r['noise']:.3f} | {r['verdict']} |")
    slower = [r for r in rows if r["verdict"] == "slower"]
    lines += ["", f"{len(slower)} of {len(rows)} cells slower than {baseline_label} beyond the noise band."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=_label_runs, required=True, help="LABEL=FOLDER[,FOLDER...]")
    parser.add_argument("--candidate", type=_label_runs, required=True, help="LABEL=FOLDER[,FOLDER...]")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's header (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    (base_label, base_folders), (cand_label, cand_folders) = args.baseline, args.candidate
    rows = compare(read_runs(base_folders), read_runs(cand_folders))
    if not rows:
        raise SystemExit("no (shape, T, impl) cell is in every run")
    with sorted(base_folders[0].glob("layer_*.csv"))[0].open() as f:
        first = next(csv.DictReader(f))  # the run's GPU and versions
    header = [f"- GPU: {first['gpu']}; torch {first['torch']}, triton {first['triton']}, transformers "
              f"{first['transformers']}",
              f"- {len(base_folders)} runs of {base_label}, {len(cand_folders)} of {cand_label}, each a separate "
              "process of benchmarks/bench_layer.py (the same script for both trees), the trees' runs alternating",
              "- ms = median over a tree's runs of each run's p50; noise band = the larger of the two trees' own "
              "max / min over their runs in that cell", *(f"- {note}" for note in args.note)]
    text = report(rows, base_label, cand_label, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
