"""Orbax checkpoints: train state (sharded arrays) plus the input pipeline's iterator state.

Saves are asynchronous; a step directory only counts once Orbax has committed it (finalised
atomically), so a run killed mid-save resumes from the previous complete step. Restoring takes
the *target* shardings, so a checkpoint written on one mesh restores onto any other mesh or
device count.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from lmtrain.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "iter"))

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mgr.all_steps())

    def save(self, step: int, state, iter_state: dict | None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        args["iter"] = ocp.args.JsonSave(iter_state or {})
        return self.mgr.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state, shardings):
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        try:
            out = self.mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), iter=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001 - orbax raises many types; wrap with context
            raise CheckpointError(
                f"could not restore step {step} from {self.directory}: {type(e).__name__}: {e}"
            ) from e
        return out["state"], dict(out["iter"] or {})

    def restore_params(self, step: int, abstract_params, shardings):
        """Params only (fine-tuning from a pre-trained run): reads the ``params`` subtree."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings
        )
        try:
            out = self.mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item={"params": target},
                        restore_args=jax.tree.map(
                            lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), {"params": target}
                        ),
                        partial_restore=True,
                    )
                ),
            )
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"could not restore params of step {step} from {self.directory}: {e}. "
                "Check that config.model matches the checkpoint's model."
            ) from e
        return out["state"]["params"]

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()
