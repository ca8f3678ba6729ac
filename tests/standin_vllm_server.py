"""Test double for `trl vllm-serve` (which needs a GPU): an HTTP server on loopback with vLLM's
/health endpoint, for the start / wait / stop logic of stages/common/vllm_server.serve.

    python tests/standin_vllm_server.py --port P --state DIR [--delay S] [--health-status 200] [--exit-code N]

Like vLLM it starts a worker process of its own (its pid in DIR/worker.pid; it ends with the server) and takes a while to
become healthy (--delay); it writes its own pid and CUDA_VISIBLE_DEVICES to DIR. --exit-code
makes it die before listening; --health-status 503 keeps it unhealthy.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--health-status", type=int, default=200)
    parser.add_argument("--exit-code", type=int)
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    (args.state / "server.json").write_text(json.dumps(
        {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    # Like vLLM's engine processes, the worker ends when the server does.
    worker = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               "while os.getppid() == int(sys.argv[1]): time.sleep(0.2)", str(os.getpid())])
    (args.state / "worker.pid").write_text(str(worker.pid))
    print("stand-in server: loading the model", flush=True)
    time.sleep(args.delay)
    if args.exit_code is not None:
        print("stand-in server: CUDA out of memory (on purpose)", flush=True)
        sys.exit(args.exit_code)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            self.send_response(args.health_status if self.path == "/health" else 404)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", args.port), Health).serve_forever()


if __name__ == "__main__":
    main()
