"""grpo.vllm_mode: server checks the `trl vllm-serve` health endpoint before loading anything.

`trl vllm-serve` needs a GPU, so a stand-in HTTP server on loopback plays its /health endpoint
(a test double for the server, not for the check). TRL 1.14.2's `trl vllm-serve` runs vLLM's own
server, whose health endpoint its client (VLLMClient.check_server) reads at /health."""
from __future__ import annotations

import http.server
import threading
import time

import pytest

from stages.common.ranks import free_port
from stages.common.vllm_server import VLLMServerUnavailable, check_health


def test_no_server_fails_fast_with_the_fix():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(VLLMServerUnavailable, match=rf"127.0.0.1:{port}/health .*trl vllm-serve"):
        check_health(f"http://127.0.0.1:{port}", timeout_s=1.0, poll_s=0.2)
    assert time.monotonic() - start < 5


def test_healthy_server_passes():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_health(f"http://127.0.0.1:{server.server_port}", timeout_s=5)
    finally:
        server.shutdown()
