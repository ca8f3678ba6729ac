"""The workspace the flows drive: stage order from dvc.yaml, params.yaml edits, the run lock, dvc.lock reads.

No Prefect and no ML libraries here: plain functions of a repository root, so the tests can
point them at a temporary DVC repository.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from stages.common.params import Params, apply_overrides, read_yaml, validate
from stages.common.paths import declared_paths, dvc_spec, load_yaml

LOCK_NAME = ".pipeline.lock"
OVERRIDES_NOTE = "flows.pipeline applied overrides:"


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace lock."""


# ------------------------------------------------------------------ stage order
def stage_order(root: Path, targets: list[str] | None = None) -> list[str]:
    """dvc.yaml's stages in dependency order (ties keep declaration order).

    With targets: only those stages and everything upstream of them, as `dvc repro <target>` would.
    """
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    declared = list(dvc_spec(root).get("stages", {}))

    def address(stage: Any) -> str:
        """What `dvc repro` run in root takes: the name for root's dvc.yaml, else path:name."""
        dvcfile = Path(stage.dvcfile.path).resolve()
        return stage.name if dvcfile == (root / "dvc.yaml").resolve() else f"{dvcfile.relative_to(root.resolve())}:{stage.name}"

    def position(stage: Any) -> tuple[int, str]:
        if not isinstance(stage, PipelineStage):  # a .dvc file: data, not a stage to run
            return (len(declared), str(stage))
        base = address(stage).split("@")[0]  # foreach/matrix stages: name@key
        return (declared.index(base) if base in declared else len(declared), address(stage))

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = {address(s): s for s in graph.nodes if isinstance(s, PipelineStage)}
        wanted = set(stages)
        if targets:
            unknown = sorted(set(targets) - set(stages))
            if unknown:
                raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml declares {sorted(stages)}")
            wanted = set()
            for name in targets:
                wanted |= {name} | {address(s) for s in nx.descendants(graph, stages[name]) if isinstance(s, PipelineStage)}
        ordered = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=position)
        return [address(s) for s in ordered if isinstance(s, PipelineStage) and address(s) in wanted]


# ------------------------------------------------------------------ params
def resolve_params(root: Path, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """The params a run would use: root's params.yaml (or a preset) plus overrides, validated by the project loader."""
    if preset:
        from stages.preset import resolve

        raw, origin = resolve(preset).model_dump(), f"preset {preset}"
    else:
        raw, origin = read_yaml(root / "params.yaml"), str(root / "params.yaml")
    if overrides:
        origin += " + overrides " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return validate(apply_overrides(raw, overrides), origin=origin)


def write_params(root: Path, preset: str | None, overrides: dict[str, Any] | None) -> Params:
    """Make params.yaml what the run uses, as `python -m stages.preset` and `dvc exp run -S` would.

    The file is rewritten in full (every key with its help comment) so DVC sees the change and
    dvc.lock records it; the header keeps its origin and notes the overrides.
    """
    from stages.preset import render, write

    target = root / "params.yaml"
    if preset:
        write(preset, target)
    if overrides:
        params = resolve_params(root, None, overrides)
        header = _header(target.read_text()) + [f"{OVERRIDES_NOTE} {json.dumps(overrides)}"]
        target.write_text(render(params, "\n".join(header)))
    return resolve_params(root)


def _header(text: str) -> list[str]:
    """The file's header comment (render() puts it right above the first section's help line), minus an old overrides note."""
    first_help = f"# {next(iter(Params.model_fields.values())).description}"
    header = []
    for line in text.splitlines():
        if not line.startswith("#") or line == first_help:
            break
        if not line.startswith(f"# {OVERRIDES_NOTE}"):
            header.append(line[2:])
    return header


# ------------------------------------------------------------------ lock
@contextlib.contextmanager
def workspace_lock(root: Path, timeout: float, log: Callable[[str], Any] = print) -> Iterator[Path]:
    """Hold <root>/.pipeline.lock for the whole run: two runs never interleave stages or dvc.lock writes.

    A second run waits up to `timeout` seconds, then raises WorkspaceBusy (timeout 0: at once).
    """
    path = root / LOCK_NAME
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if timeout <= 0:
            raise WorkspaceBusy(f"another pipeline run holds {path}; try again when it has finished") from None
        log(f"another pipeline run holds {path}; waiting up to {timeout:g} s")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise WorkspaceBusy(f"another pipeline run still holds {path} after {timeout:g} s; "
                                "wait for it to finish or raise the lock timeout") from None
    try:
        yield path
    finally:
        lock.release()


# ------------------------------------------------------------------ dvc.lock
def locked_outs_digest(root: Path, stage: str) -> str | None:
    """The md5s dvc.lock records for a stage's outputs (joined); None if the stage never ran."""
    lock_file = root / "dvc.lock"
    if not lock_file.exists():
        return None
    entry = (load_yaml(lock_file.read_text()) or {}).get("stages", {}).get(stage)
    if not entry:
        return None
    outs = sorted((o["path"], o.get("md5", "")) for o in entry.get("outs", []))
    return ",".join(f"{p}:{md5}" for p, md5 in outs) or None


def declared_path(root: Path, key: str) -> Path:
    """An output path from root's dvc.yaml `vars: - paths:` block (the one place paths are declared)."""
    paths = declared_paths(root)
    if key not in paths:
        raise KeyError(f"no path {key!r} in {root / 'dvc.yaml'} vars")
    return root / paths[key]
