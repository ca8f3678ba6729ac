"""Peak GPU memory per training step against completion length, from bench/gpu_long_context.py.

    python bench/plot_long_context.py     # reads bench/results/long_context_{unsloth,trl}.json, writes long_context.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CAPACITY_GIB = 139.80  # what torch reports as the H200's total capacity in the out-of-memory message


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["long_context_unsloth.json", "long_context_trl.json"])
    ap.add_argument("--png", type=Path, default=RESULTS / "long_context.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, color in zip(args.runs, ["tab:green", "tab:red", "tab:blue", "tab:orange"]):
        run = json.loads((RESULTS / name).read_text())
        label = {"unsloth": "project stage, Unsloth", "trl": "plain TRL"}[run["backend"]]
        lengths = [s["length"] for s in run["steps"]]
        ax.plot(lengths, [s["peak_allocated_gib"] for s in run["steps"]], "o-", color=color, label=f"{label}: allocated")
        ax.plot(lengths, [s["peak_reserved_gib"] for s in run["steps"]], "o--", color=color, alpha=0.5, label=f"{label}: reserved")
        if run["status"] == "out_of_memory":
            failed = int(run["error"].split(":")[0].split()[-1])
            ax.plot([failed], [CAPACITY_GIB], "x", color=color, markersize=12, mew=3, label=f"{label}: out of memory at {failed}")
    ax.axhline(CAPACITY_GIB, color="grey", lw=1)
    ax.text(14000, CAPACITY_GIB + 2, "H200 capacity (139.8 GiB)", color="grey")
    ax.set(xlabel="completion length (tokens), 8 completions per step", ylabel="peak GPU memory per step (GiB)",
           title="Llama-3.1-8B shapes, LoRA r32, bf16: training side (generation excluded)")
    ax.set_ylim(0, 150)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(args.png)


if __name__ == "__main__":
    main()
