"""A training stage with a probe on every process, for tests/test_distributed.py:

    accelerate launch ... -m tests.ddp_probe sft|grpo PROBE_DIR

Runs the stage's own main() unchanged; the probe comes in through the stage's run(callbacks=)
hook. It saves this process's trainable parameters when training begins (the start or the
resumed checkpoint) and after every optimizer step, to PROBE_DIR/rank<R>-step<S>.pt, and the
process layout it trains in (rank, world size, process group size, batches per epoch of its
share of the data) to PROBE_DIR/rank<R>.json.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


class ParameterProbe(TrainerCallback):
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)

    def _save(self, model, step: int) -> None:
        weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(weights, self.out / f"rank{os.environ.get('RANK', '0')}-step{step}.pt")

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        import torch.distributed as dist

        self._save(model, state.global_step)
        layout = {"process_index": args.process_index, "world_size": args.world_size,
                  "group_size": dist.get_world_size() if dist.is_initialized() else 1,
                  "batches_per_epoch": len(train_dataloader)}
        (self.out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(layout))

    def on_step_end(self, args, state, control, model=None, **kw):
        self._save(model, state.global_step)


def main() -> None:
    stage, out = sys.argv[1], Path(sys.argv[2])
    module = importlib.import_module(f"stages.{stage}")
    module.run = functools.partial(module.run, callbacks=[ParameterProbe(out)])
    module.main()


if __name__ == "__main__":
    main()
