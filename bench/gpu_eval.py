"""GSM8K evaluation speed on a GPU: the evaluate stage's model evaluation (lm-eval, the project's
task) over all 1,319 test questions, through lm-eval's vLLM backend.

    python bench/gpu_eval.py --backend vllm --out eval_vllm.json [--limit N] [--max-new-tokens 1024]

On the random Qwen3-1.7B-shaped model of bench/gpu_grpo.py, whose eos is never chosen: every answer
runs to max_new_tokens, the slowest case (1,319 x 1,024 tokens by default). Accuracy is ~0 by design.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--limit", type=int, default=None, help="first N test questions (default: all 1,319)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--gpu-memory", type=float, default=0.7, help="model.gpu_memory_utilization")
    ap.add_argument("--base-dir", type=Path, default=Path("/tmp/bench_grpo/base"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from bench import gpu_grpo

    gpu_grpo.set_offline_env()
    base_dir = gpu_grpo.ensure_base(args.base_dir.resolve(), "qwen3-1.7b")
    from stages import evaluate, prepare
    from stages.common.params import validate
    from stages.preset import merge, resolve

    raw = merge(resolve("qwen3-1.7b").model_dump(), {
        "model": {"name_or_path": str(base_dir / "model"), "dtype": "bfloat16", "gpu_memory_utilization": args.gpu_memory},
        "evaluate": {"backend": args.backend, "limit": args.limit, "max_new_tokens": args.max_new_tokens}})
    params = validate(raw, origin="bench/gpu_eval.py")
    work = Path(tempfile.mkdtemp(prefix="gpu-eval-"))
    prepare.run(params, work / "prepared")
    start = time.perf_counter()
    result = evaluate.evaluate_model(params, evaluate.resolve_model("base", base_dir, None),
                                     work / "prepared" / "eval.parquet", work / "out")
    seconds = time.perf_counter() - start
    lengths = [len(r["completion"]) for r in result.records]
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), "backend": result.backend,
           "questions": len(result.records), "max_new_tokens": args.max_new_tokens, "seconds_total": round(seconds, 1),
           "seconds_stage_reported": result.scores.get("seconds"), "mean_completion_chars": sum(lengths) / len(lengths),
           "scores": {k: v for k, v in result.scores.items() if isinstance(v, (int, float))},
           "versions": gpu_grpo.versions(), "machine": gpu_grpo.machine()}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "versions"}, indent=2))


if __name__ == "__main__":
    main()
