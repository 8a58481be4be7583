"""Draw bench_layer.py's table: time against tokens, one panel per shape, with the floor as a line.

    python benchmarks/plot_layer.py benchmarks/results/layer_nvidia-h100-80gb-hbm3.csv   # writes .png beside it

Runs anywhere matplotlib does (no GPU): the CSV holds every number the plot shows.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from bench_layer import IMPL_LABELS, IMPLS  # noqa: E402

STYLE = {  # impl: (colour, marker); moe_ops solid, peers dashed
    "hf_eager": ("tab:gray", "x"),
    "compile_hf_eager": ("tab:brown", "x"),
    "hf_grouped_mm": ("tab:orange", "v"),
    "compile_hf_grouped_mm": ("tab:red", "^"),
    "moe_ops": ("tab:cyan", "o"),
    "moe_ops_compile_hf_grouped_mm": ("tab:blue", "o"),
    "moe_ops_extern_compile_hf_grouped_mm": ("tab:purple", "s"),
}


def plot(csv_path: Path) -> Path:
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 5), squeeze=False)
    for ax, name in zip(axes[0], shapes, strict=True):
        shape_rows = [r for r in rows if r["shape"] == name]
        for impl in IMPLS:
            cells = sorted((int(r["T"]), float(r["ms_p50"])) for r in shape_rows if r["impl"] == impl)
            if cells:
                colour, marker = STYLE[impl]
                ax.plot(*zip(*cells, strict=True), marker=marker, color=colour, label=IMPL_LABELS[impl],
                        linestyle="-" if impl.startswith("moe_ops") else "--")
        floor = sorted({(int(r["T"]), float(r["floor_ms"])) for r in shape_rows})
        ax.plot(*zip(*floor, strict=True), color="black", linewidth=2, label="floor")
        first = shape_rows[0]
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms per layer (do_bench p50)",
               title=f"{name} (E={first['E']}, K={first['K']}, H={first['H']}, F={first['F']})")
        ax.set_xticks(sorted({t for t, _ in floor}), labels=[str(t) for t, _ in floor])
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    versions = {f"{r['gpu']}, torch {r['torch']}, triton {r['triton']}, transformers {r['transformers']}" for r in rows}
    fig.suptitle("one MoE layer (transformers' MixtralSparseMoeBlock), bf16: " + "; ".join(sorted(versions)))
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="a layer_<gpu>.csv written by bench_layer.py")
    print(plot(parser.parse_args().csv))


if __name__ == "__main__":
    main()
