"""Scaling benchmark (issue 12 part 4): the grpo stage as shipped, `python -m stages.launch grpo`,
in layouts over the GPUs of one machine. Measured on 2x H200 (docs/benchmarks.md, "Session 6").

    python bench/gpu_scaling.py run one-gpu --gpus 2 --out-dir bench/results/scaling
    python bench/gpu_scaling.py run ddp-colocate --gpus 2 --out-dir bench/results/scaling
    python bench/gpu_scaling.py run server --gpus 2 --out-dir bench/results/scaling
    python bench/gpu_scaling.py run memory-ddp --gpus 2 --out-dir bench/results/scaling    # also memory-fsdp2, memory-zero3
    python bench/gpu_scaling.py table --out-dir bench/results/scaling                     # the markdown table
    bash bench/gpu_scaling_device.sh 2 one-gpu ddp-colocate server memory-ddp memory-fsdp2   # on the GPU machine

One layout per call (each fits the GPU machine's 10-minute command limit); each writes
<out-dir>/<layout>.json. Every layout runs the same stage code through the same launcher as
`dvc repro` does, in a workspace of its own (PIPELINE_WORKDIR): a random model with real shapes
(bench/gpu_grpo.py builds it: no weights on the GPU machine), GSM8K prompts, params.yaml rendered
from presets/qwen3-1.7b.yaml (or llama3.1-8b) plus the layout's `launch` section.

Throughput, Qwen3-1.7B shapes, LoRA r32, 16 prompts x 8 generations x 512 tokens per step (forced
full length), TRL backend (Unsloth is single-GPU), vLLM rollouts:
- one-gpu: 1 process on GPU 0, vLLM colocated.
- ddp-colocate: --gpus processes (DDP), each with its own colocated vLLM engine.
- server: `trl vllm-serve` on GPU 0 (data parallel over --server-gpus GPUs), training on the rest.
The global batch is the same in every layout (micro-batches of --micro-batch completions per
process, accumulated to 128), so seconds per step compare directly. Figures are medians over
the steps after --warmup, read from the stage's own MLflow run: step_seconds and
throughput/generated_tokens_per_s (all processes' completions).

Memory, Llama-3.1-8B shapes, LoRA r32 in 16-bit, 2 prompts x 8 x 256 tokens with transformers
generate, AdamW in 32-bit: rank 0's peak CUDA memory under ddp, fsdp2 and zero3 (zero3 needs deepspeed:
carry .whl/zero3 from bench/gpu_zero3_wheels.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_grpo  # noqa: E402 - the random model, prompts, machine and version records

THROUGHPUT = ("one-gpu", "ddp-colocate", "server")
MEMORY = {"memory-ddp": "ddp", "memory-fsdp2": "fsdp2", "memory-zero3": "zero3"}
GLOBAL_COMPLETIONS = 16 * 8


def layout_params(layout: str, gpus: int, server_gpus: int, micro_batch: int) -> dict:
    """Overrides of the preset for one layout: shapes of the run and params.launch."""
    if layout in MEMORY:
        # adamw_torch in every engine: bitsandbytes' 8-bit update cannot take FSDP2's sharded tensors (seen on 2x H200)
        grpo = {"max_completion_length": 256, "per_device_train_batch_size": 2 * 8 // gpus, "gradient_accumulation_steps": 1,
                "optim": "adamw_torch"}
        return {"model": {"generation": "transformers"}, "grpo": grpo,
                "launch": {"num_processes": gpus, "config": MEMORY[layout]}}
    training = {"one-gpu": 1, "ddp-colocate": gpus, "server": gpus - server_gpus}[layout]
    if training < 1 or GLOBAL_COMPLETIONS % (micro_batch * training):
        raise SystemExit(f"{layout}: {training} training processes x micro-batches of {micro_batch} cannot make "
                         f"{GLOBAL_COMPLETIONS} completions per step")
    grpo = {"max_completion_length": 512, "per_device_train_batch_size": micro_batch,
            "gradient_accumulation_steps": GLOBAL_COMPLETIONS // (micro_batch * training)}
    launch: dict = {"num_processes": training, "config": "ddp"}
    if layout == "one-gpu":
        launch["gpus"] = [0]
    if layout == "server":
        grpo["vllm_mode"] = "server"
        launch["vllm_server"] = {"enabled": True, "gpus": list(range(server_gpus)), "data_parallel_size": server_gpus}
    return {"model": {"generation": "vllm"}, "grpo": grpo, "launch": launch}


def params_for(layout: str, args, base_model: Path):
    from stages.common.params import validate
    from stages.preset import merge, resolve

    shapes_preset = "llama3.1-8b" if layout in MEMORY else "qwen3-1.7b"
    raw = resolve(shapes_preset).model_dump()
    common = {
        "model": {"name_or_path": str(base_model), "backend": "trl", "dtype": "bfloat16", "load_in_4bit": False,
                  "lora": {"enabled": True, "r": 32, "alpha": 64, "dropout": 0.0}},
        "sft": {"enabled": False},
        "grpo": {"num_generations": 8, "steps_per_generation": None, "generation_batch_size": None, "beta": 0.0,
                 "max_prompt_length": 256, "max_steps": args.steps, "save_steps": 100_000, "logging_steps": 1,
                 "log_completions_every": 0},
    }
    raw = merge(merge(raw, common), layout_params(layout, args.gpus, args.server_gpus, args.micro_batch))
    return validate(raw, origin=f"bench/gpu_scaling.py {layout}")


def prepare_workspace(work: Path, base_dir: Path, params) -> None:
    """The declared paths a grpo run reads: models/base (the random model), data/prepared/grpo.parquet, params.yaml."""
    from stages.preset import render

    (work / "models").mkdir(parents=True, exist_ok=True)
    if not (work / "models" / "base").exists():
        (work / "models" / "base").symlink_to(base_dir, target_is_directory=True)
    (work / "data" / "prepared").mkdir(parents=True, exist_ok=True)
    gpu_grpo.write_prompts(work / "data" / "prepared" / "grpo.parquet")
    (work / "params.yaml").write_text(render(params, header="bench/gpu_scaling.py"))


def per_step(work: Path) -> dict[str, list[tuple[int, float]]]:
    """The stage's per-step metrics from its MLflow run (the run named in checkpoints/grpo/run_state.json)."""
    import mlflow

    run_id = json.loads((work / "checkpoints" / "grpo" / "run_state.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    keys = ("step_seconds", "throughput/generated_tokens_per_s", "completions/mean_length",
            "memory/cuda_peak_allocated_gib", "memory/cuda_peak_reserved_gib")
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def run_layout(args) -> None:
    gpu_grpo.set_offline_env()
    shapes = "llama3.1-8b" if args.layout in MEMORY else "qwen3-1.7b"
    base_dir = gpu_grpo.ensure_base(args.base_dir.resolve(), shapes)
    work = args.work_dir.resolve() / args.layout
    shutil.rmtree(work, ignore_errors=True)
    params = params_for(args.layout, args, base_dir / "model")
    prepare_workspace(work, base_dir, params)
    env = {**os.environ, "PIPELINE_WORKDIR": str(work), "PIPELINE_MLRUNS_DIR": str(work / "mlruns"),
           "MLFLOW_EXPERIMENT_NAME": f"scaling-{args.layout}"}
    if args.layout == "memory-zero3" and Path("/tmp/zero3/deepspeed").is_dir():  # bench/gpu_env.sh put it there
        env["PYTHONPATH"] = os.pathsep.join(p for p in ("/tmp/zero3", env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "stages.launch", "grpo"]
    dry = subprocess.run([*cmd, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    start = time.perf_counter()
    with (work / "stage.log").open("w") as log:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    steps = per_step(work) if (work / "checkpoints" / "grpo" / "run_state.json").exists() else {}

    def median_after_warmup(key: str) -> float | None:
        return gpu_grpo.median([v for s, v in steps.get(key, []) if s > args.warmup])

    result = {
        "layout": args.layout, "gpus": args.gpus, "server_gpus": args.server_gpus if args.layout == "server" else 0,
        "exit_code": code, "wall_seconds": round(seconds, 1), "launch_commands": dry.strip().splitlines(),
        "params": {"model": params.model.model_dump(exclude={"tiny"}), "launch": params.launch.model_dump(),
                   "grpo": params.grpo.model_dump(exclude={"rewards"})},
        "step_seconds_median": median_after_warmup("step_seconds"),
        "generated_tokens_per_s_median": median_after_warmup("throughput/generated_tokens_per_s"),
        "completion_length_median": median_after_warmup("completions/mean_length"),
        "peak_allocated_gib_rank0": max((v for _, v in steps.get("memory/cuda_peak_allocated_gib", [])), default=None),
        "peak_reserved_gib_rank0": max((v for _, v in steps.get("memory/cuda_peak_reserved_gib", [])), default=None),
        "per_step": steps, "warmup": args.warmup, "machine": gpu_grpo.machine(), "versions": gpu_grpo.versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.layout}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_step", "params")}, indent=2, default=str))
    if code:
        raise SystemExit(f"{args.layout}: the stage exited with {code}; see {work / 'stage.log'}")


def table(args) -> None:
    """Markdown tables of the layouts measured in --out-dir, with the goal of issue 12 (>= 1.8x one GPU)."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(args.out_dir.glob("*.json"))}
    print("| layout | GPUs | s/step | generated tok/s | vs one GPU |\n|---|---|---|---|---|")
    base = (found.get("one-gpu") or {}).get("generated_tokens_per_s_median")
    for name in THROUGHPUT:
        r = found.get(name)
        if r:
            tps = r["generated_tokens_per_s_median"]
            ratio = f"{tps / base:.2f}x" if tps and base else "-"
            print(f"| {name} | {1 if name == 'one-gpu' else r['gpus']} | {r['step_seconds_median']} | {tps} | {ratio} |")
    print("\n| engine | GPUs | peak allocated GiB (rank 0) | peak reserved GiB (rank 0) |\n|---|---|---|---|")
    for name in MEMORY:
        r = found.get(name)
        if r:
            print(f"| {MEMORY[name]} | {r['gpus']} | {r['peak_allocated_gib_rank0']} | {r['peak_reserved_gib_rank0']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one layout")
    run.add_argument("layout", choices=[*THROUGHPUT, *MEMORY])
    run.add_argument("--gpus", type=int, default=2, help="GPUs of this machine the layout may use")
    run.add_argument("--server-gpus", type=int, default=1, help="server layout: GPUs for `trl vllm-serve` (data parallel)")
    run.add_argument("--micro-batch", type=int, default=64, help="completions per process per micro-batch")
    run.add_argument("--steps", type=int, help="grpo.max_steps (default 6 for the throughput layouts, as session 6 "
                     "measured; 3 for the memory layouts: their peak is there by step 2, after the first optimizer "
                     "step, and an 8B step takes 15-26 s on 2 H200s, session 7)")
    run.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    run.add_argument("--base-dir", type=Path, default=Path("/tmp/bench_grpo/base"), help="random models (reused)")
    run.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_scaling"), help="one workspace per layout")
    run.add_argument("--out-dir", type=Path, required=True)
    tab = sub.add_parser("table", help="print the tables of the layouts measured")
    tab.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args()
    if args.command == "run":
        if args.steps is None:
            args.steps = 3 if args.layout in MEMORY else 6
        run_layout(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
