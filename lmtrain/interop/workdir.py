"""Writing lmtrain workdirs outside the training loop (``lmtrain import hf``); reading them is
``lmtrain.train.run_loader``'s job."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from lmtrain.train.checkpoint import write_listing


def save_params(workdir: str, params: dict, step: int = 0) -> str:
    """Writes ``{'params': params}`` as an lmtrain checkpoint that ``run_loader`` reads."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    mgr = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=True), item_names=("state", "iter")
    )
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}), iter=ocp.args.JsonSave({})
        ),
        force=True,
    )
    mgr.wait_until_finished()
    mgr.close()
    step_dir = os.path.join(directory, str(step))
    # The file listing training checkpoints carry, so readers can verify this step too
    # (a step without one is refused). Written after the commit: no run is reading it yet.
    write_listing(step_dir)
    return step_dir
