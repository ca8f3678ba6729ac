"""Learning proof: GRPO measurably improves a model on CPU (presets/learn.yaml).

    .venv/bin/python bench/learning.py [--seeds 0 1 2] [--preset learn] [--set grpo.max_steps=150]
    python3 bench/learning.py --preset learn-gpu --parallel 3 --out bench/results/learning_gpu.json   # on a GPU
    python3 bench/learning.py --merge a.json b.json --out all.json     # seeds run in separate calls, one median
    python3 bench/learning.py --preset learn-gpu --workdir /tmp/learn ...  # run again to continue where a cut run stopped

For each seed, in a fresh workspace (PIPELINE_WORKDIR), the real stages run as DVC would run
them: prepare (synthetic 2-digit addition), base_model (tokenizer + random Llama), sft (short
priming), grpo (question + answer only), evaluate_base and evaluate (lm-eval, greedy, the
held-out split). Reports base / SFT / GRPO strict accuracy per seed, the per-reward curves
and the fraction of zero-std groups (PNG), and flags reward hacking: a format reward that rises
while correctness stays flat. Writes bench/results/learning.json and learning.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = [["prepare"], ["base_model"], ["sft"], ["grpo"], ["evaluate", "base"], ["evaluate", "tuned"]]
FORMAT_REWARDS = ("format_exact", "format_approx", "tag_count")
# Output a vLLM engine prints once it has measured the GPU's memory and taken its KV cache: its INFO
# line (hidden under TRL's colocate mode, which logs vLLM at WARNING) or the CUDA graph capture's bar,
# which comes after the cache (on the H200, 2026-12-02, TRL's path printed only the bar).
ENGINE_READY = ("init engine (profile, create kv cache, warmup model) took", "Capturing CUDA graphs")
# A gate is let go after this long even if no such line came. Qwen3-1.7B shapes' engine took 50 s to start
# (bench/results/session13/U8.log); with learn-gpu's tiny model the second seed's GRPO began at most
# about 20 s after the first's (session 14: the stage times in bench/results/session14/LA.log).
ENGINE_START_LIMIT_S = 120


def hacking_flag(rows: list[dict[str, float]], correctness: str = "rewards/correctness/mean") -> dict:
    """Compare the first and last quarter of training: a format reward that rose while
    correctness did not (gain under 0.01) is flagged."""
    quarter = max(1, len(rows) // 4)
    first, last = rows[:quarter], rows[-quarter:]

    def gain(key: str) -> float | None:
        a = [r[key] for r in first if key in r]
        b = [r[key] for r in last if key in r]
        return statistics.mean(b) - statistics.mean(a) if a and b else None

    correct = gain(correctness)
    formats = {k: gain(f"rewards/{k}/mean") for k in FORMAT_REWARDS if gain(f"rewards/{k}/mean") is not None}
    flagged = correct is not None and correct < 0.01 and any(g > 0.01 for g in formats.values())
    return {"correctness_gain": correct, "format_gains": formats, "flagged": flagged}


def read_curve(file: Path) -> list[dict[str, float]]:
    with file.open() as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def run_stage(cmd: list[str], env: dict, gate: threading.Lock | None) -> tuple[int, str]:
    """Run one stage and return its exit code and output (stdout and stderr together). With a gate
    (a lock shared by the seeds on one GPU), hold it from the stage's start until its vLLM engine is
    up (ENGINE_READY), the stage ends, or ENGINE_START_LIMIT_S passes, so engines on one GPU start
    one at a time."""
    if gate is None:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return done.returncode, done.stdout
    gate.acquire()
    once = threading.Lock()

    def let_go() -> None:
        if once.acquire(blocking=False):  # the timer and this thread may both get here
            gate.release()

    timer = threading.Timer(ENGINE_START_LIMIT_S, let_go)
    timer.start()
    lines = []
    try:
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # text mode: a progress bar's \r ends a line too
                lines.append(line)
                if any(mark in line for mark in ENGINE_READY):
                    let_go()
        return proc.returncode, "".join(lines)
    finally:
        timer.cancel()
        let_go()


def seed_params(seed: int, preset: str, overrides: dict) -> str:
    """The params.yaml of one seed's workspace."""
    from stages.common.params import apply_overrides, validate
    from stages.preset import merge, render, resolve

    raw = merge(resolve(preset).model_dump(), {"project": {"seed": seed}, "sft": {"seed": seed}, "grpo": {"seed": seed}})
    return render(validate(apply_overrides(raw, overrides)))


def check_workspaces(base: Path, seeds: list[int], preset: str, overrides: dict) -> None:
    """A kept workspace (--workdir) is continued only with the params it was made with."""
    for seed in seeds:
        made_with = base / f"seed{seed}" / "params.yaml"
        if made_with.exists() and made_with.read_text() != seed_params(seed, preset, overrides):
            raise SystemExit(f"--workdir {base}: seed {seed}'s workspace was made with other params ({made_with}); "
                             "continue it with the same --preset and --set, or use another --workdir")


def run_seed(seed: int, preset: str, overrides: dict, base: Path, env: dict, log: Path,
             engine_gate: threading.Lock | None = None) -> dict:
    """Run the seed's stages in base/seed<N>. Stages an earlier run of this workspace finished
    (progress.json) are not run again; an unfinished grpo resumes from its last checkpoint (the
    stage's own resume, which checks that the checkpoint was made from the same inputs)."""
    work = base / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(seed_params(seed, preset, overrides))
    progress_file = work / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {"seconds": {}, "grpo_engine": []}
    earlier = list(progress["seconds"])
    # Seeds starting together each get their own rendezvous port from the grpo stage (ranks.own_rendezvous_port).
    seed_env = {**env, "PIPELINE_WORKDIR": str(work), "PIPELINE_MLRUNS_DIR": str(work / "mlruns")}
    times = progress["seconds"]
    for stage in STAGES:
        key = "_".join(stage)
        if key in times:
            print(f"seed {seed}: {' '.join(stage)} finished in an earlier run ({times[key]} s)", flush=True)
            continue
        start = time.perf_counter()
        code, output = run_stage([sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]], seed_env,
                                 engine_gate if stage == ["grpo"] else None)
        seconds = round(time.perf_counter() - start, 1)
        if code:
            # The other seeds go on; this seed's whole stage log is kept beside --out.
            log.with_suffix(f".seed{seed}.log").write_text(output)
            print(f"seed {seed}: stage {' '.join(stage)} failed:\n{output[-3000:]}", flush=True)
            return {"seed": seed, "seconds": {**times, key: seconds}, "failed_stage": " ".join(stage), "error": output[-1500:]}
        times[key] = seconds
        progress["grpo_engine"] = progress["grpo_engine"] or [line for line in output.splitlines() if line.startswith("grpo: backend=")][:1]
        progress_file.write_text(json.dumps(progress, indent=2) + "\n")
        print(f"seed {seed}: {' '.join(stage)} {seconds} s", flush=True)
    evaluation = json.loads((work / "metrics" / "evaluate.json").read_text())
    rows = read_curve(work / "plots" / "grpo_rewards.csv")
    resumed = json.loads((work / "metrics" / "grpo.json").read_text()).get("resumed_from_checkpoint")
    return {
        "seed": seed, "seconds": times, "total_seconds": round(sum(times.values()), 1), "grpo_engine": progress["grpo_engine"],
        "accuracy": {m: evaluation[m]["strict"] for m in ("base", "sft", "grpo")},
        "grpo_minus_sft": evaluation["grpo"]["strict"] - evaluation["sft"]["strict"],
        "curve": rows, "hacking": hacking_flag(rows),
        # What continued from an earlier run: a resumed grpo's seconds are its last attempt's only.
        "finished_in_earlier_runs": earlier, "grpo_resumed_from": resumed,
    }


def machine() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPU cores{gpu}"


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for r in (r for r in results if r["curve"]):  # a run shorter than logging_steps logs no row
        steps = [row["step"] for row in r["curve"]]
        for key, ax in (("rewards/correctness/mean", axes[0]), ("frac_reward_zero_std", axes[2])):
            ax.plot(steps, [row.get(key) for row in r["curve"]], label=f"seed {r['seed']}")
        fmt = next((k for k in FORMAT_REWARDS if f"rewards/{k}/mean" in r["curve"][0]), None)
        if fmt:
            axes[1].plot(steps, [row.get(f"rewards/{fmt}/mean") for row in r["curve"]], label=f"seed {r['seed']} ({fmt})")
    axes[0].set(title="correctness reward (mean per step)", xlabel="GRPO step")
    axes[1].set(title="format reward (mean per step)", xlabel="GRPO step")
    axes[2].set(title="fraction of groups with zero reward std", xlabel="GRPO step", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def report(results: list[dict], meta: dict, out: Path) -> None:
    """Write the summary JSON (and the curves' PNG when the runs carry them), print the table, and
    exit nonzero when a seed failed."""
    done = [r for r in results if "failed_stage" not in r]
    gains = [r["grpo_minus_sft"] for r in done]
    median = statistics.median(gains) if gains else None
    summary = {**meta, "median_gain_points": None if median is None else round(100 * median, 1),
               "goal_met": len(done) == len(results) and median >= 0.25,
               "per_seed": [{k: v for k, v in r.items() if k != "curve"} for r in results]}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    if done and all("curve" in r for r in done):
        plot(done, out.with_suffix(".png"))
    print("| seed | base | SFT | GRPO | GRPO - SFT | wall s | hacking flag |\n|---|---|---|---|---|---|---|")
    for r in results:
        if "failed_stage" in r:
            print(f"| {r['seed']} | failed in {r['failed_stage']} | | | | | |")
            continue
        a = r["accuracy"]
        print(f"| {r['seed']} | {a['base']:.1%} | {a['sft']:.1%} | {a['grpo']:.1%} | {100 * r['grpo_minus_sft']:+.1f} pts "
              f"| {r['total_seconds']} | {r['hacking']['flagged']} |")
    if median is not None:
        print(f"median gain: {summary['median_gain_points']:+.1f} points over {len(done)} of {len(results)} seeds (goal +25)")
    if len(done) < len(results):
        raise SystemExit(f"{len(results) - len(done)} seed(s) failed; their logs: {out.with_suffix('.seed*.log')}")


def merge(files: list[Path], out: Path) -> None:
    """One summary from runs of the same preset and overrides made in several calls (a GPU machine's
    10-minute limit), summaries or the per-seed files a run writes as its seeds end: each seed's
    last finished result wins; the PNG too when every seed's file carries its curve (per-seed files
    do, summaries don't)."""
    runs = [json.loads(f.read_text()) for f in files]
    recipes = {json.dumps([r["preset"], r["overrides"]], sort_keys=True) for r in runs}
    if len(recipes) > 1:
        raise SystemExit(f"--merge: the runs differ in preset or overrides ({sorted(recipes)}); only runs of one recipe "
                         "can share a median")
    seeds: dict[int, dict] = {}
    for run in runs:
        for r in run["per_seed"]:
            if "failed_stage" not in r or r["seed"] not in seeds:
                seeds[r["seed"]] = {**r, "run_date": run["date"]}
    report([seeds[k] for k in sorted(seeds)], {"date": time.strftime("%Y-%m-%d"), "machine": runs[-1]["machine"],
                                               "preset": runs[0]["preset"], "overrides": runs[0]["overrides"],
                                               "merged_from": [str(f) for f in files]}, out)


def gpu_plan(preset: str, overrides: dict, seeds: list[int]) -> dict[int, tuple[str, threading.Lock]]:
    """With vLLM generation on a GPU machine: each seed's GPU (round robin) and the engine-start gate
    of that GPU; empty when seeds need no plan (transformers generation, no GPU).

    A colocated vLLM engine sizes its KV cache from the GPU memory in use while it starts, other
    processes' included: with three seeds on one H200 (2026-11-30), the engine that started while
    another engine took its cache found no memory left and the seed failed. Engines on one GPU
    therefore start one at a time (run_stage)."""
    from stages.common.params import apply_overrides, validate
    from stages.preset import resolve

    if validate(apply_overrides(resolve(preset).model_dump(), overrides)).model.generation == "transformers":
        return {}
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gates = [threading.Lock() for _ in range(count)]
    return {seed: (str(i % count), gates[i % count]) for i, seed in enumerate(seeds)} if count else {}


def seed_file(out: Path, seed: int) -> Path:
    return out.with_name(f"{out.stem}.seed{seed}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="learn")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--parallel", type=int, default=1, help="seeds run at once, each in its own workspace (for a GPU; with vLLM, seeds share GPUs round robin "
                        "and their engines on one GPU start one at a time)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "learning.json"))
    parser.add_argument("--workdir", type=Path,
                        help="keep each seed's workspace here (default: a temporary folder, removed at the end); a "
                             "later run with the same --workdir, --preset and --set continues each seed where it "
                             "stopped, e.g. over consecutive calls of a GPU machine kept warm")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="combine the JSON of earlier runs of one recipe into --out (no training)")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    from stages.common.params import parse_overrides

    overrides = parse_overrides(args.overrides)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="learning-"))
    check_workspaces(base, args.seeds, args.preset, overrides)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = gpu_plan(args.preset, overrides, args.seeds)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "parallel": args.parallel,
            "preset": args.preset, "overrides": overrides}

    def one_seed(seed: int) -> dict:
        gpu, gate = plan.get(seed, (None, None))
        seed_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
        result = run_seed(seed, args.preset, overrides, base, seed_env, out, gate)
        # Kept as each seed ends, so a run cut short (a GPU call's time limit) keeps its finished seeds
        # for --merge.
        seed_file(out, seed).write_text(json.dumps({**meta, "per_seed": [result]}, indent=2) + "\n")
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results = list(pool.map(one_seed, args.seeds))
    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)
    report(results, meta, out)


if __name__ == "__main__":
    main()
