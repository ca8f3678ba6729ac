"""Bisects the CUDA illegal memory access of tests/gpu/test_grpo_vllm_trl.py (session 4): vLLM 0.26.0,
started the way TRL 1.14.2's colocated GRPO starts it, on the project's tiny model, crashed while
capturing CUDA graphs, while the same model's standalone engine in the evaluation test did not.

    python3 bench/repro_trl_vllm_tiny.py --out runs/repro_trl_vllm_tiny.json    # on a GPU (bench/gpu_env.sh)

Builds the tiny model once (the tiny preset's prepare and base_model stages), then starts one engine
per variant, each in its own process, one after the other, and samples 16 completions from it. The
first variant copies TRL's `LLM(...)` call (trl/generation/vllm_generation.py: external_launcher,
max_num_seqs = the test's 8, max_model_len 224, max_num_batched_tokens 4096, processed log-probs);
each other changes one thing. The JSON says which variants ran and which crashed, with the error.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRL_LIKE = {"gpu_memory_utilization": 0.15, "max_model_len": 224, "max_num_seqs": 8, "enable_sleep_mode": False,
            "model_impl": "auto", "distributed_executor_backend": "external_launcher", "seed": 0,
            "max_num_batched_tokens": 4096, "logprobs_mode": "processed_logprobs"}
# name -> (changes to TRL_LIKE's kwargs, extra environment)
VARIANTS = {
    "trl_like": ({}, {}),
    "trl_like_launch_blocking": ({}, {"CUDA_LAUNCH_BLOCKING": "1"}),
    "max_num_seqs_64": ({"max_num_seqs": 64}, {}),
    "v1_model_runner": ({}, {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
    "no_external_launcher": ({"distributed_executor_backend": None}, {}),
    "default_logprobs_mode": ({"logprobs_mode": None}, {}),
    "max_model_len_256": ({"max_model_len": 256}, {}),
    "enforce_eager": ({"enforce_eager": True}, {}),
}


def build_model(workdir: Path) -> Path:
    from stages import base_model, prepare
    from stages.common.params import validate
    from stages.preset import resolve

    params = validate(resolve("tiny").model_dump(), origin="preset tiny")
    prepare.run(params, workdir / "prepared")
    base_model.run(params, workdir / "prepared", workdir / "base")
    return workdir / "base" / "model"  # config, weights and tokenizer


def child(model: str, variant: str) -> None:
    """One engine, as TRL's colocate mode builds it, then one batch of sampled completions."""
    from vllm import LLM, SamplingParams

    changes, _ = VARIANTS[variant]
    kwargs = {k: v for k, v in {**TRL_LIKE, **changes}.items() if v is not None}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    llm = LLM(model=model, **kwargs)
    sampling = SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=32, logprobs=0)
    outputs = llm.generate(["What is 12 + 30?"] * 16, sampling, use_tqdm=False)
    print("GENERATED", sum(len(o.outputs[0].token_ids) for o in outputs), "tokens", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--limit", type=int, default=120, help="seconds per variant")
    parser.add_argument("--workdir", default="/tmp/repro_trl_vllm_tiny")
    parser.add_argument("--out", default="runs/repro_trl_vllm_tiny.json")
    parser.add_argument("--confirm", action="store_true",
                        help="when trl_like crashes and an environment-only variant does not, run the real GPU test "
                             "(tests/gpu/test_grpo_vllm_trl.py) with that variant's environment")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    model = build_model(Path(args.workdir))
    results = []
    for i, variant in enumerate(args.variants):
        if results and results[0]["variant"] == "trl_like" and results[0]["ok"]:
            print("trl_like ran: the crash does not reproduce outside TRL's trainer; other variants skipped")
            break
        if variant == "trl_like_launch_blocking" and not (results and not results[0]["ok"]):
            continue  # only to locate a crash that trl_like showed
        env = {**os.environ, **VARIANTS[variant][1], "MASTER_PORT": str(29533 + i)}
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(model), variant], env=env,
                                  capture_output=True, text=True, timeout=args.limit)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, log = "timeout", (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        errors = [line for line in log.splitlines() if "Error" in line or "error:" in line][-4:]
        results.append({"variant": variant, "changes": VARIANTS[variant][0], "env": VARIANTS[variant][1],
                        "ok": rc == 0 and "GENERATED" in log, "rc": rc, "seconds": round(time.time() - start, 1),
                        "errors": errors})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(f".{variant}.log").write_text(log)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"{variant}: {'ok' if results[-1]['ok'] else 'FAILED'} rc={rc} {results[-1]['seconds']} s {errors[-1:]}",
              flush=True)

    ok = {r["variant"]: r["ok"] for r in results}
    fixes = [v for v in ok if ok[v] and VARIANTS[v][1] and not VARIANTS[v][0] and v != "trl_like_launch_blocking"]
    if args.confirm and ok.get("trl_like") is False and fixes:
        env = {**os.environ, **VARIANTS[fixes[0]][1], "GPU_TEST_FILES": "tests/gpu/test_grpo_vllm_trl.py"}
        print(f"confirming with the real test under {VARIANTS[fixes[0]][1]}", flush=True)
        subprocess.run(["bash", "tests/gpu/run.sh"], cwd=ROOT, env=env)


if __name__ == "__main__":
    main()
