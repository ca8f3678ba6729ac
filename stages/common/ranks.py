"""Who does what when a training stage runs as several processes (`python -m stages.launch`, which
hands the stage to `accelerate launch`).

Every process runs the whole stage; TRL and transformers split the batches and average the
gradients. Only the main process (global rank 0) writes: it opens the MLflow run, prepares the
checkpoint folder and decides the resume point, saves the outputs, metrics, plots and
run_state.json. The others wait for its decisions (`main_decides`). A single process (no
`WORLD_SIZE` in the environment) is the main process and nothing here waits or talks.

The process group is accelerate's (PartialState: NCCL on GPUs, gloo on CPU), created by `join`
before the trainer would create it, so that decisions can be shared before training.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from typing import Any, Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Global rank 0, or a process not started by a distributed launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def free_port() -> int:
    """A TCP port no process listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_rendezvous_port() -> int | None:
    """Give a single process its own free MASTER_PORT; the port, or None when left alone.

    A colocated vLLM engine opens a torch.distributed store even in one process, and with
    MASTER_PORT unset TRL 1.14 takes 29500 whenever it is free at that moment, so two runs
    starting together on one machine (`dvc queue start -j 2`, parallel seeds) both took it and one
    failed with EADDRINUSE (seen on the H200). Launched processes and a user's MASTER_PORT are left alone.
    """
    if "MASTER_PORT" in os.environ or world_size() > 1:
        return None
    port = free_port()
    os.environ["MASTER_PORT"] = str(port)
    return port


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; elsewhere a no-op).

    torch's elastic agent (what `accelerate launch` runs) starts each worker in a session of its
    own, so a SIGKILL of the launcher would leave the workers training and writing checkpoints
    under a rerun. Also used (as preexec_fn) for a vLLM server this process starts.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call above
        os.kill(os.getpid(), sig)


def join() -> None:
    """Called first by a stage: under a distributed launch, die with the launcher and join the
    process group (accelerate's, with the same cpu flag the trainers will pass it)."""
    if world_size() == 1:
        return
    die_with_parent()
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:
        # accelerate 1.15 names each CPU process's device `cpu:<index>`; transformers 5.17 passes that to torch.load
        # as map_location when it resumes the optimizer, and torch 2.13 cannot restore to it. accelerate's own
        # setting for the device (read by every PartialState, including the one TrainingArguments makes):
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    PartialState(cpu=cpu)


def main_only(context: contextlib.AbstractContextManager) -> contextlib.AbstractContextManager:
    """`context` (e.g. the stage's MLflow run) entered on the main process; on the others a context
    that yields None and opens nothing."""
    return context if is_main() else contextlib.nullcontext()


def main_decides(decide: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """decide(*args, **kwargs) on the main process, its result on every process.

    An exception on the main process reaches the others as a RuntimeError naming it, so no
    process waits for a decision that will never come."""
    if world_size() == 1:
        return decide(*args, **kwargs)
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    error = None
    if is_main():
        try:
            box = [("ok", decide(*args, **kwargs))]
        except Exception as err:  # shared with the other ranks, then raised here unchanged
            error = err
            box = [("error", f"{type(err).__name__}: {err}")]
    broadcast_object_list(box, from_process=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise RuntimeError(f"the main process (rank 0) failed, so this rank stops too: {value}")
    return value


def same_everywhere(value: str, what: str) -> None:
    """Fail on every rank when `value` differs between ranks (e.g. inputs that differ between machines)."""
    if world_size() == 1:
        return
    from accelerate.utils import gather_object

    values = gather_object([value])
    if len(set(values)) > 1:
        differing = ", ".join(f"rank {rank}: {v}" for rank, v in enumerate(values) if v != values[0])
        raise RuntimeError(f"{what} differs between processes (rank 0: {values[0]}; {differing}): every "
                           "machine must hold the same data, models, code and params")


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def sharded() -> bool:
    """Whether the launch shards the weights (DeepSpeed ZeRO-3 or FSDP): a forward pass then needs
    every rank, so per-rank extras such as the KL monitor cannot run on the main process alone."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
