"""Run a training script and record, from outside its loop, how many UNet training forwards each optimizer
step covered.

    python tests/step_counter.py RECORD.json SCRIPT [script flags...]

A global forward hook counts the UNet's forwards in training mode with
gradients on (validation sampling runs under no_grad, so it is not counted); a
global optimizer post-step hook closes a step. RECORD.json gets
``{"forwards_per_step": [...], "forwards_after_last_step": n}``.
"""

import atexit
import contextlib
import json
import os
import runpy
import sys

import torch
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


@contextlib.contextmanager
def counting():
    """Within the block, count the UNet's training forwards per optimizer step into the record it yields."""
    record = {"forwards_per_step": [], "forwards_after_last_step": 0}

    def count_forward(module, inputs, output):
        if type(module).__name__ in UNET_CLASSES and module.training and torch.is_grad_enabled():
            record["forwards_after_last_step"] += 1

    def close_step(optimizer, args, kwargs):
        record["forwards_per_step"].append(record["forwards_after_last_step"])
        record["forwards_after_last_step"] = 0

    hooks = [register_module_forward_hook(count_forward), register_optimizer_step_post_hook(close_step)]
    try:
        yield record
    finally:
        for hook in hooks:
            hook.remove()


def main() -> None:
    record_path, script, *script_args = sys.argv[1:]
    counter = counting()
    record = counter.__enter__()  # for the whole process
    # Under a launcher of several processes each writes its own record: RECORD.json.rank1, and so on.
    rank = int(os.environ.get("RANK", "0"))
    path = record_path if rank == 0 else f"{record_path}.rank{rank}"
    atexit.register(lambda: open(path, "w").write(json.dumps(record)))
    sys.argv = [script, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` would have it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
