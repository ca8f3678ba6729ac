"""The `trl vllm-serve` server that grpo.vllm_mode: server sends rollouts to.

    trl vllm-serve --model <base model folder or hub id> --port 8000     # on the GPU(s) for generation

The grpo stage checks the server's health endpoint before it loads anything, so a server that is
not there costs seconds and a clear message, not a model load and TRL's own 240 s wait.
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request


class VLLMServerUnavailable(RuntimeError):
    """grpo.vllm_mode is server and no healthy `trl vllm-serve` answers at the configured address."""


def check_health(base_url: str, timeout_s: float, poll_s: float = 2.0) -> None:
    """Wait up to timeout_s for GET <base_url>/health/ to answer 200; raise VLLMServerUnavailable otherwise."""
    url = base_url.rstrip("/") + "/health/"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=min(10.0, timeout_s)) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() + poll_s > deadline:
            raise VLLMServerUnavailable(
                f"grpo.vllm_mode is server but no vLLM server is healthy at {url} after {timeout_s:g} s ({last}). "
                "Start one with `trl vllm-serve --model <base model> --port <port>` on the generation GPU(s), "
                "set grpo.vllm_server_host/port (or vllm_server_base_url), or use grpo.vllm_mode: colocate.")
        time.sleep(poll_s)
