"""Bar charts of bench/gpu_grpo.py results: seconds per step (split into generation, KL monitor
and the rest) and peak GPU memory, for the runs named below.

    python bench/plot_gpu_grpo.py            # reads bench/results/*.json, writes bench/results/gpu_grpo.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# (label, file): 1 prompt x 8 generations, the backends side by side.
RUNS = [
    ("512 tok\nTRL\nstage", "trl_512_p1_stage.json"),
    ("512 tok\nUnsloth\nstage", "unsloth_512_p1_stage.json"),
    ("512 tok\nTRL\nbatched KL", "trl_512_p1_batchedkl2.json"),
    ("512 tok\nUnsloth\nfixes", "unsloth_512_p1_fixed_kl8.json"),
    ("2048 tok\nTRL\nstage", "trl_2048_p1_stage.json"),
    ("2048 tok\nUnsloth\nstage", "unsloth_2048_p1_stage.json"),
    ("2048 tok\nUnsloth\nfixes", "unsloth_2048_p1_fixed_kl2.json"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSONs")
    ap.add_argument("--png", type=Path, default=RESULTS / "gpu_grpo.png", help="output image")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, gen, kl, rest, alloc, reserved = [], [], [], [], [], []
    for label, name in RUNS:
        data = json.loads((args.results / name).read_text())
        s, phases = data["summary"], data["summary"]["phases_median_s"]
        labels.append(label)
        gen.append(phases.get("transformers.generate", 0.0))
        kl.append(phases.get("kl_monitor", 0.0))
        rest.append(max(0.0, s["step_seconds_median"] - gen[-1] - kl[-1]))
        alloc.append(data["stage_metrics"]["memory/cuda_peak_allocated_gib"])
        reserved.append(data["stage_metrics"]["memory/cuda_peak_reserved_gib"])

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [4, 3, 7]})
    groups = [[i for i, label in enumerate(labels) if label.startswith(f"{n} ")] for n in (512, 2048)]
    for ax, idx, n in zip(axes[:2], groups, (512, 2048)):
        g, k, r = [gen[i] for i in idx], [kl[i] for i in idx], [rest[i] for i in idx]
        pos = range(len(idx))
        ax.bar(pos, g, label="generation")
        ax.bar(pos, k, bottom=g, label="stage KL monitor")
        ax.bar(pos, r, bottom=[a + b for a, b in zip(g, k)], label="fwd/bwd/optimizer/other")
        for j, total in enumerate(a + b + c for a, b, c in zip(g, k, r)):
            ax.text(j, total, f"{total:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set(title=f"s / step, {n}-token completions (median)", ylabel="s / step")
        ax.set_xticks(list(pos), [labels[i].split("\n", 1)[1] for i in idx], fontsize=8)
        ax.legend(fontsize=8)
    x = range(len(labels))
    width = 0.4
    axes[2].bar([i - width / 2 for i in x], alloc, width, label="peak allocated")
    axes[2].bar([i + width / 2 for i in x], reserved, width, label="peak reserved")
    axes[2].set(title="peak GPU memory (GiB)", ylabel="GiB")
    axes[2].set_xticks(list(x), labels, fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle("stages.grpo on one H200: random Qwen3-1.7B shapes, LoRA r32, 1 prompt x 8 generations, bf16")
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(args.png)


if __name__ == "__main__":
    main()
