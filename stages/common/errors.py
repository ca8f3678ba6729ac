"""What kind of failure ended a stage, told across the `dvc repro` process boundary.

A stage runs as `python -m stages.<name>` under `dvc repro`, under the flow. The flow retries only
what a retry can fix, so it must know what kind of error ended the stage:

- `check`: the project's own validation and check errors (ParamsError, DataError, RewardConfigError,
  MergeCheckError, EvalError, GGUFCheckError, NonFiniteLossError, ...: every exception class defined
  in the `stages` package, except the two below) and a state-dict size mismatch. The same inputs
  fail the same way: the flow fails at once.
- `transient`: the tracking server or a `trl vllm-serve` server could not be reached at the start
  (TrackingUnavailable, VLLMServerUnavailable), a refused, reset or timed-out connection, a port
  already in use, anywhere in the error's chain.
- `unknown`: anything else (a bug, an out-of-memory error). Retried as before: a retried grpo
  stage resumes from its last checkpoint, so a retry costs little and may succeed.

The flow names a file in PIPELINE_ERROR_FILE; importing `stages` then installs an excepthook that
writes the uncaught error there as JSON (`{"kind", "error", "message"}`) after printing the usual
traceback. A stage killed by a signal writes nothing: the flow treats that as `unknown`.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from types import TracebackType

ERROR_FILE_ENV = "PIPELINE_ERROR_FILE"
CHECK, TRANSIENT, UNKNOWN = "check", "transient", "unknown"

_NETWORK_ERRNOS = {errno.EADDRINUSE, errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                   errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}


def _chain(err: BaseException) -> list[BaseException]:
    """The error and what caused it (explicitly or while handling it), outermost first."""
    seen: list[BaseException] = []
    while err is not None and all(err is not s for s in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _module(cls: type) -> str:
    """Where a class is defined; a stage run as `python -m stages.x` defines its classes in __main__."""
    if cls.__module__ == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        return spec.name if spec else "__main__"
    return cls.__module__


def _transient(err: BaseException) -> bool:
    from stages.common.tracking import TrackingUnavailable
    from stages.common.vllm_server import VLLMServerUnavailable

    if isinstance(err, (TrackingUnavailable, VLLMServerUnavailable, ConnectionError, TimeoutError)):
        return True
    return isinstance(err, OSError) and err.errno in _NETWORK_ERRNOS


def classify(err: BaseException) -> str:
    """`check`, `transient` or `unknown` (see the module docstring)."""
    if any(_transient(e) for e in _chain(err)):
        return TRANSIENT
    if _module(type(err)).split(".")[0] == "stages":
        return CHECK
    # torch's load_state_dict: a checkpoint or adapter made for another model shape.
    if isinstance(err, RuntimeError) and "size mismatch for" in str(err):
        return CHECK
    return UNKNOWN


def describe(err: BaseException) -> dict[str, str]:
    module, name = _module(type(err)), type(err).__qualname__
    # Python's own errors read as people write them: ConnectionError, not builtins.ConnectionError.
    return {"kind": classify(err), "error": name if module == "builtins" else f"{module}.{name}", "message": str(err)}


def read(file: Path) -> dict[str, str] | None:
    """What a stage wrote to its error file; None when it wrote nothing (killed, or DVC failed first)."""
    try:
        return json.loads(Path(file).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def install_hook() -> None:
    """When PIPELINE_ERROR_FILE is set: an uncaught error is also written there, classified."""
    target = os.environ.get(ERROR_FILE_ENV)
    if not target or getattr(sys.excepthook, "writes_error_file", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        previous(kind, err, tb)
        if isinstance(err, Exception):  # not KeyboardInterrupt / SystemExit
            Path(target).write_text(json.dumps(describe(err)) + "\n")

    hook.writes_error_file = True  # type: ignore[attr-defined]
    sys.excepthook = hook
