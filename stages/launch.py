"""Run a training stage as params.launch says: `python -m stages.launch sft|grpo` (dvc.yaml's cmd).

    python -m stages.launch grpo                               # as params.yaml's launch section says
    python -m stages.launch grpo --set launch.machine_rank=1   # the same, on the second machine
    python -m stages.launch grpo --dry-run                     # print the command(s), run nothing

This module only builds command lines for the field's launchers; it starts no training process
of its own:
- launch.num_processes 1, config ddp, no gpus, no vLLM server (the default): the stage runs as
  `python -m stages.<stage>` in this very process (exec), exactly as without this module.
- One process in all on chosen GPUs (launch.gpus, or the GPUs a rollout server leaves): plain
  `python -m stages.<stage>` with CUDA_VISIBLE_DEVICES (accelerate refuses one GPU id with its
  multi-GPU config).
- Otherwise accelerate runs it, once per process, on every machine:

      python -m accelerate.commands.launch --config_file recipes/accelerate/<config>.yaml
          --num_processes N --num_machines M --machine_rank R --main_process_port P
          [--main_process_ip IP] [--gpu_ids 1,2,3] -m stages.<stage>

- With launch.vllm_server.enabled (grpo, machine 0): `trl vllm-serve` is started first on its
  GPUs, waited for (its /health endpoint), and stopped when the training command ends
  (stages/common/vllm_server.py); its output goes to the declared `vllm_server_log` path.
  Training takes launch.gpus, or every other GPU of the machine.

`--set` takes launch.* keys only (the values that differ between machines); everything the
training reads comes from params.yaml, the same file on every machine.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shlex
import signal
import subprocess
import sys

from stages.common.params import ROOT, LaunchParams, Params, ParamsError, load_params, parse_overrides

CONFIGS = ROOT / "recipes" / "accelerate"
STAGES = ("sft", "grpo")


def check_engine(launch: LaunchParams) -> None:
    """Fail before launching when this machine cannot run launch.config."""
    if launch.config == "ddp":
        return
    if launch.config in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        raise ParamsError(f"launch.config: got {launch.config!r}; DeepSpeed is not installed here "
                          "(pip install deepspeed, on a CUDA machine). Or use launch.config: ddp or fsdp2")
    import torch

    if not torch.cuda.is_available():
        raise ParamsError(f"launch.config: got {launch.config!r}; it shards the model over GPUs and this machine "
                          "has no CUDA. On CPU use launch.config: ddp (gloo)")


def serves_rollouts(launch: LaunchParams, stage: str) -> bool:
    """Whether this launch starts the vLLM server: grpo on the main machine, when asked."""
    return launch.vllm_server.enabled and stage == "grpo" and launch.machine_rank == 0


def training_gpus(launch: LaunchParams, device_count: int | None = None) -> list[int] | None:
    """GPU indices for the training processes: launch.gpus, else (with a rollout server) every GPU
    but the server's; None: accelerate's default, all of them."""
    if launch.gpus is not None or not launch.vllm_server.enabled:
        return launch.gpus
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    gpus = [i for i in range(device_count) if i not in launch.vllm_server.gpus]
    per_machine = launch.num_processes // launch.num_machines
    if len(gpus) != per_machine:
        raise ParamsError(f"launch: {device_count} GPUs here, {len(launch.vllm_server.gpus)} for the vLLM server "
                          f"(vllm_server.gpus {launch.vllm_server.gpus}) leave {len(gpus)} for training, but "
                          f"num_processes / num_machines is {per_machine}; set launch.num_processes or launch.gpus")
    return gpus


def accelerate_command(launch: LaunchParams, module: str, gpus: list[int] | None, args: tuple[str, ...] = ()) -> list[str]:
    """`accelerate launch` of `python -m module args` with launch's layout and engine."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{launch.config}.yaml"),
           "--num_processes", str(launch.num_processes), "--num_machines", str(launch.num_machines),
           "--machine_rank", str(launch.machine_rank), "--main_process_port", str(launch.main_process_port)]
    if launch.main_process_ip:
        cmd += ["--main_process_ip", launch.main_process_ip]
    if gpus is not None:
        cmd += ["--gpu_ids", ",".join(str(g) for g in gpus)]
    return cmd + ["-m", module, *args]


def training_command(launch: LaunchParams, module: str, gpus: list[int] | None) -> tuple[list[str], dict[str, str]]:
    """The training command and the environment it adds. One DDP process in all runs as plain
    `python -m module` on its GPU (CUDA_VISIBLE_DEVICES): accelerate refuses a multi-GPU config with a
    single GPU id ("Less than two GPU ids were configured"), which is the server layout on 2 GPUs."""
    if launch.one_process:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus is not None else {}
        return [sys.executable, "-m", module], env
    return accelerate_command(launch, module, gpus), {}


def server_command(params: Params) -> list[str]:
    """`trl vllm-serve` for the grpo stage: the base model (TRL pushes the trained weights into it at
    every step), the project's tokenizer, grpo's address and context length."""
    from stages.common import models, vllm_server
    from stages.common.paths import path

    info, g, s = models.base_info(path("base_model")), params.grpo, params.launch.vllm_server
    cmd = vllm_server.trl_serve_command(
        info["model"], info.get("revision"), g.vllm_server_host, g.vllm_server_port, s.tensor_parallel_size,
        s.data_parallel_size, params.model.dtype, vllm_server.max_model_len(g), params.model.trust_remote_code)
    return cmd + ["--tokenizer", str(info["tokenizer"])]  # passed through to `vllm serve`


def launch_overrides(pairs: list[str]) -> dict:
    overrides = parse_overrides(pairs)
    others = [key for key in overrides if not key.startswith("launch.")]
    if others:
        raise ParamsError(f"--set {', '.join(others)}: only launch.* keys can be set here (they may differ between "
                          "machines); training params come from params.yaml: edit it or use `dvc exp run -S`")
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="launch.KEY=VALUE",
                        help="override a launch key for this machine, e.g. launch.machine_rank=1")
    parser.add_argument("--dry-run", action="store_true", help="print the command(s) and exit")
    args = parser.parse_args(argv)
    params = load_params(overrides=launch_overrides(args.overrides))
    launch, module = params.launch, f"stages.{args.stage}"

    if launch.plain:
        cmd = [sys.executable, "-m", module]
        print(f"launch: {shlex.join(cmd)}", flush=True)
        if not args.dry_run:
            os.execv(sys.executable, cmd)
        return
    check_engine(launch)
    cmd, env = training_command(launch, module, training_gpus(launch))
    server = server_command(params) if serves_rollouts(launch, args.stage) else None
    if server:
        print(f"launch: CUDA_VISIBLE_DEVICES={','.join(map(str, launch.vllm_server.gpus))} {shlex.join(server)}", flush=True)
    print(f"launch: {''.join(f'{k}={v} ' for k, v in env.items())}{shlex.join(cmd)}", flush=True)
    if args.dry_run:
        return
    os.environ.update(env)
    if not server:
        os.execv(sys.executable, cmd)
    from stages.common import ranks, vllm_server
    from stages.common.paths import path

    url = vllm_server.base_url(params.grpo)
    with vllm_server.serve(server, url, launch.vllm_server.startup_timeout, path("vllm_server_log"),
                           gpus=launch.vllm_server.gpus):
        print(f"launch: vLLM server healthy at {url}; training", flush=True)
        code = subprocess.call(cmd, preexec_fn=functools.partial(ranks.die_with_parent, signal.SIGTERM))
    sys.exit(code)


if __name__ == "__main__":
    main()
