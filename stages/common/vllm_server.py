"""The `trl vllm-serve` server that grpo.vllm_mode: server sends rollouts to.

Layouts (README "More than one GPU / machine"):
- Started for you: launch.vllm_server.enabled makes `python -m stages.launch grpo` (dvc.yaml's
  cmd) start `trl vllm-serve` on launch.vllm_server.gpus with their tensor/data parallel sizes,
  wait for its health endpoint, train on the other GPUs, and stop the server afterwards (`serve`).
- A separate inference node: start the server there yourself and point the trainer at it:

      trl vllm-serve --model <base model> --host 0.0.0.0 --port 8000 --tensor_parallel_size 1
      # params: grpo.vllm_mode: server, grpo.vllm_server_host: <node>, grpo.vllm_server_port: 8000

  TRL then also opens grpo's NCCL weight-sync group to that node (port 51216) at every step.

The grpo stage checks the server's health endpoint before it loads anything, so a server that is
not there costs seconds and a clear message, not a model load and TRL's own 240 s wait.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from stages.common.ranks import die_with_parent


class VLLMServerUnavailable(RuntimeError):
    """grpo.vllm_mode is server and no healthy `trl vllm-serve` answers at the configured address."""


def base_url(g) -> str:
    """Where grpo's params say the server answers (GRPOParams: vllm_server_base_url, or host and port)."""
    return g.vllm_server_base_url or f"http://{g.vllm_server_host}:{g.vllm_server_port}"


def max_model_len(g) -> int:
    """vLLM's context length for grpo (GRPOParams): the longest sequence a rollout can hold, unless set."""
    return g.vllm_max_model_length or g.max_prompt_length + g.max_completion_length


def check_health(base_url: str, timeout_s: float, poll_s: float = 2.0, server: subprocess.Popen | None = None,
                 log: Path | None = None) -> None:
    """Wait up to timeout_s for GET <base_url>/health (TRL's VLLMClient checks the same path) to answer
    200; raise VLLMServerUnavailable otherwise, at once if `server` (the process serving it) exits."""
    url = base_url.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        if server is not None and server.poll() is not None:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:]) if log and log.exists() else ""
            raise VLLMServerUnavailable(f"the vLLM server exited with code {server.returncode} before {url} answered"
                                        + (f"; the end of its log ({log}):\n{tail}" if tail else ""))
        try:
            with urllib.request.urlopen(url, timeout=min(10.0, timeout_s)) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:  # answered, but not healthy yet
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() + poll_s > deadline:
            raise VLLMServerUnavailable(
                f"grpo.vllm_mode is server but no vLLM server is healthy at {url} after {timeout_s:g} s ({last}). "
                "Start one with `trl vllm-serve --model <base model> --port <port>` on the generation GPU(s), "
                "let `python -m stages.launch grpo` start it (launch.vllm_server.enabled), set "
                "grpo.vllm_server_host/port (or vllm_server_base_url), or use grpo.vllm_mode: colocate.")
        time.sleep(poll_s)


def trl_serve_command(model: str, revision: str | None, host: str, port: int, tensor_parallel_size: int,
                      data_parallel_size: int, dtype: str, max_model_len: int, trust_remote_code: bool) -> list[str]:
    """`trl vllm-serve ...` (run with this interpreter), which starts vLLM's server with the flags TRL's
    client needs (weight transfer over NCCL, processed logprobs)."""
    cmd = [sys.executable, "-m", "trl.cli.main", "vllm-serve", "--model", model, "--host", host, "--port", str(port),
           "--tensor_parallel_size", str(tensor_parallel_size), "--data_parallel_size", str(data_parallel_size),
           "--dtype", dtype, "--max_model_len", str(max_model_len)]
    if revision:
        cmd += ["--revision", revision]
    if trust_remote_code:
        cmd += ["--trust_remote_code"]
    return cmd


@contextlib.contextmanager
def serve(command: list[str], url: str, timeout_s: float, log: Path, gpus: list[int] | None = None,
          poll_s: float = 1.0, stop_grace_s: float = 30.0) -> Iterator[subprocess.Popen]:
    """Run a rollout server for the duration of the block: start `command` on `gpus`
    (CUDA_VISIBLE_DEVICES), wait until <url>/health answers, yield the process, stop it.

    The server gets a process group of its own, stopped as a whole (SIGTERM, then SIGKILL after
    stop_grace_s): vLLM starts engine and worker processes. If this process dies first, the
    kernel sends the server SIGTERM (die_with_parent), so no server outlives its trainer.
    Its output goes to `log` (appended)."""
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                  preexec_fn=functools.partial(die_with_parent, signal.SIGTERM))
    try:
        check_health(url, timeout_s, poll_s=poll_s, server=server, log=log)
        yield server
    finally:
        stop(server, stop_grace_s)


def stop(server: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the server's process group; after grace_s, SIGKILL to whatever of it is left."""
    _signal_group(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=grace_s)
    _signal_group(server.pid, signal.SIGKILL)
    server.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(pgid, sig)
