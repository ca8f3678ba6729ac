"""Where a colocated vLLM engine's decode step goes: wall time against GPU kernel time, per sampling setting.

    python bench/vllm_decode.py --out runs/V.json

The moonshot (issue 11: a GRPO step <= 3 s at 8 x 8 x 512) needs vLLM's rollout of 64 sequences x 512 tokens
well under its measured ~2 s (about 4 ms a decode step, where weights and KV cache read at the H200's bandwidth
take about 1.5 ms). This builds the engine the way TRL 1.14.2 colocates it (in-process, external_launcher,
max_num_seqs 64, max_num_batched_tokens 4096, processed log-probs) on the random Qwen3-1.7B-shaped model of
bench/gpu_grpo.py, times 64 forced 512-token completions under each sampling setting, then profiles one short
rollout with torch.profiler: if the GPU's kernel time is well below the wall time, the step is bound by the host
(scheduling, sampling bookkeeping), not by the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common.ranks import free_port  # noqa: E402
from stages.grpo import COLOCATED_SAMPLING  # noqa: E402  (the stage's own generation kwargs)

# name -> SamplingParams overrides. "trl" is what TRL asks for by default (min_p from params.yaml; one log-prob per
# token for the importance-sampling correction); "stage" adds the grpo stage's generation kwargs (flat log-probs:
# arrays instead of one Python object per token). Session 16 ran all but "stage" (added after that run).
SETTINGS = {
    "stage": {"min_p": 0.1, "logprobs": 0, **COLOCATED_SAMPLING},
    "trl": {"min_p": 0.1, "logprobs": 0},
    "no_logprobs": {"min_p": 0.1},
    "no_min_p": {"logprobs": 0},
    "plain": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=64, help="completions per rollout (8 prompts x 8)")
    ap.add_argument("--tokens", type=int, default=512, help="forced completion length")
    ap.add_argument("--repeats", type=int, default=3, help="timed rollouts per setting (after one warm-up)")
    ap.add_argument("--memory", type=float, default=0.3, help="gpu_memory_utilization")
    ap.add_argument("--profile-tokens", type=int, default=64,
                    help="length of the torch.profiler rollout (0: none; a profiled 512-token rollout ran > 30 s)")
    ap.add_argument("--base-dir", type=Path, default=Path("/tmp/bench_grpo/base"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from bench import gpu_grpo

    gpu_grpo.set_offline_env()
    base = gpu_grpo.ensure_base(args.base_dir.resolve(), "qwen3-1.7b") / "model"
    # what TRL's colocate mode runs under: one in-process engine, torch.distributed set up by "the launcher"
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), VLLM_ENABLE_V1_MULTIPROCESSING="0")

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts_file = args.out.resolve().with_suffix(".prompts.parquet")
    gpu_grpo.write_prompts(prompts_file)
    import pandas as pd

    messages = pd.read_parquet(prompts_file)["prompt"].tolist()[: args.sequences // 8]
    prompt_ids = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True) for m in messages]
    prompt_ids = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompt_ids]  # transformers 5: a BatchEncoding
    requests = [{"prompt_token_ids": p} for p in prompt_ids for _ in range(8)]

    started = time.perf_counter()
    llm = LLM(model=str(base), gpu_memory_utilization=args.memory, max_model_len=1024, max_num_seqs=args.sequences,
              distributed_executor_backend="external_launcher", max_num_batched_tokens=4096,
              logprobs_mode="processed_logprobs", seed=0)
    engine_start = time.perf_counter() - started
    print(f"engine ready after {engine_start:.1f} s", flush=True)

    def rollout(setting: dict, tokens: int) -> float:
        params = SamplingParams(**{"n": 1, "temperature": 1.0, "max_tokens": tokens, "min_tokens": tokens,
                                   "ignore_eos": True, "detokenize": False, **setting})
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        torch.cuda.synchronize()
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        return time.perf_counter() - t

    result = {"sequences": len(requests), "tokens": args.tokens, "engine_start_s": round(engine_start, 1), "settings": {}}
    for name, setting in SETTINGS.items():
        rollout(setting, args.tokens)
        times = [rollout(setting, args.tokens) for _ in range(args.repeats)]
        median = statistics.median(times)
        result["settings"][name] = {"rollout_s": round(median, 3), "ms_per_decode_step": round(1000 * median / args.tokens, 2),
                                    "generated_tokens_per_s": round(len(requests) * args.tokens / median),
                                    "all_s": [round(t, 3) for t in times]}
        print(name, result["settings"][name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))  # the timings stand even if profiling does not finish
    if not args.profile_tokens:
        return

    # one profiled (short) rollout of the stage's setting: GPU kernel time against wall time
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = rollout(SETTINGS["stage"], args.profile_tokens)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu_s = sum(e.self_device_time_total for e in kernels) / 1e6
    result["profiled"] = {"tokens": args.profile_tokens, "wall_s": round(wall, 3), "gpu_kernel_s": round(gpu_s, 3), "gpu_busy": round(gpu_s / wall, 3),
                          "top_kernels": [{"name": e.key[:90], "s": round(e.self_device_time_total / 1e6, 4), "calls": e.count}
                                          for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]]}
    print(json.dumps(result["profiled"], indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
