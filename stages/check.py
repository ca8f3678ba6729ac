"""Check params.yaml before DVC runs any stage: `python -m stages.check` (run first by `make repro`,
and in process by the flows, for the stages they are about to run).

`dvc repro` deletes a stage's outputs before it runs the stage, so a stage that then fails on a
bad params value costs the outputs of its last good run. This check finds such values first, in
seconds and without loading a model, and raises the error the stage itself would raise:

- the typed loader: every key, type and cross-field rule (ParamsError);
- the machine: CUDA-only options, a hub id while offline (ParamsError, as the stages check);
- grpo: the stage's own preflight (stages/grpo.py): every reward name known, every custom
  `module.path:function` importable, options valid (RewardConfigError), a vLLM server reachable;
- prepare: the data files read and cleaned as the stage would (DataError for a missing or empty
  file, missing columns, bad rows with on_bad_rows=fail, ...), and the splits it would write
  compared with one batch: GRPO prompts against one generation batch of prompts (the generation
  batch / grpo.num_generations), SFT examples against one SFT step (prepare.on_small_split: warn
  or fail). A hub dataset is not downloaded here: the stage checks it.

    python -m stages.check                     # all stages; exit 1 with the message on a problem
    python -m stages.check --stages grpo       # only what grpo needs
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterable
from pathlib import Path

from stages.common.params import Params, ParamsError, check_runtime, load_params
from stages.common.paths import ROOT, dvc_spec, stage_spec
from stages.common.rewards import RewardConfigError
from stages.common.vllm_server import VLLMServerUnavailable
from stages.prepare import DataError

# What check() raises: the errors the stages themselves raise on the same inputs.
CHECK_ERRORS = (ParamsError, RewardConfigError, DataError, VLLMServerUnavailable)



def check_grpo(params: Params, root: Path) -> None:
    """The grpo stage's own preflight (reward names, custom imports, options, engines, a vLLM server);
    custom reward modules are imported from the workspace root, as under `dvc repro`."""
    from stages.common.engines import preflight

    added = str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        preflight(params)
    finally:
        if added:
            sys.path.remove(str(root))


def split_size_problems(params: Params, rows_grpo: int, rows_sft: int) -> list[str]:
    """Splits smaller than one batch of the training stages that read them."""
    g, s = params.grpo, params.sft
    problems = []
    per_generation = g.effective_generation_batch_size // g.num_generations
    if rows_grpo < per_generation:
        problems.append(f"the GRPO split has {rows_grpo} prompt(s), fewer than one generation batch needs "
                        f"({g.effective_generation_batch_size} completions / grpo.num_generations {g.num_generations} = "
                        f"{per_generation} prompts); add data or lower prepare.sft_examples")
    per_step = s.per_device_train_batch_size * s.gradient_accumulation_steps
    if s.enabled and rows_sft < per_step:
        problems.append(f"the SFT split has {rows_sft} example(s), fewer than one SFT step takes ({per_step}: "
                        "sft.per_device_train_batch_size x gradient_accumulation_steps); raise prepare.sft_examples "
                        "or set sft.enabled: false")
    return problems


def check_data(params: Params, root: Path) -> list[str]:
    """Read and clean the data as `prepare` would; returns warnings about split sizes."""
    from stages.prepare import build_splits

    p = params.prepare
    if p.source == "hub":
        return []
    # prepare.train_file / test_file are relative to the workspace; the stage prints its own notes.
    with contextlib.chdir(root), contextlib.redirect_stdout(io.StringIO()):
        splits, metrics = build_splits(params)
    problems = split_size_problems(params, len(splits["grpo"]), len(splits["sft"]))
    if problems and p.on_small_split == "fail":
        raise DataError("; ".join(problems) + " (prepare.on_small_split=fail)")
    return metrics["warnings"] + problems


def loads_a_model(stage: str, root: Path) -> bool:
    """A stage whose dvc.yaml params include the model section: the machine check applies to it."""
    declared = [p if isinstance(p, str) else next(iter(p)) for p in stage_spec(stage, root).get("params", [])]
    return any(p == "model" or p.startswith("model.") for p in declared)


def check(params: Params, root: Path = ROOT, stages: Iterable[str] | None = None) -> list[str]:
    """Raise what the stages would raise on these params; return warnings. stages: the stages about
    to run (default: all of root's dvc.yaml)."""
    wanted = {name.split(":")[-1] for name in (stages if stages is not None else dvc_spec(root).get("stages", {}))}
    if any(loads_a_model(name, root) for name in wanted):
        check_runtime(params)
    if "grpo" in wanted:
        check_grpo(params, root)
    return check_data(params, root) if "prepare" in wanted else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help="check only what these stages need (default: all)")
    args = parser.parse_args(argv)
    try:
        warnings = check(load_params(), ROOT, args.stages)
    except CHECK_ERRORS as err:
        raise SystemExit(f"check: {type(err).__name__}: {err}\nNothing was run; no output was touched.") from None
    for text in warnings:
        print(f"check: warning: {text}")
    print("check: params are fine")


if __name__ == "__main__":
    main()
