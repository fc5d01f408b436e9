"""Orbax checkpoints: train state (sharded arrays) plus the input pipeline's iterator state.

Saves are asynchronous. Orbax 0.12 writes a step into ``<step>.orbax-checkpoint-tmp*`` and
commits it with one atomic rename, so a run killed mid-save leaves only a temporary directory
(removed on the next start) and resumes from the previous step. On top of that every step gets a
file listing (``lmtrain_files.json``: each file's size and SHA-256) written *inside* the temporary
directory just before the rename, so it is part of the atomic commit. ``latest_step()`` checks the
newest steps against their listings; a step with a truncated, missing or altered file is reported,
moved to ``<dir>.corrupt/`` and the previous step is used. The listing also records the stable
fields of Orbax's top-level ``_CHECKPOINT_METADATA`` (all but the commit time, which Orbax fills in
at the rename). A step *without* a listing (written by another tool, or its listing deleted)
cannot be checked, so it is refused unless unlisted steps are accepted
(``config.fault.accept_unlisted_checkpoints``; then only its metadata is checked). Restoring
takes the *target* shardings, so a checkpoint written on one mesh restores onto any other mesh or
device count.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp

from lmtrain.errors import CheckpointError

LISTING_FILE = "lmtrain_files.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
METADATA_FILE = "_CHECKPOINT_METADATA"
# Written or rewritten by Orbax at the commit rename, after our listing: not recorded.
_COMMIT_TIME_FIELDS = ("commit_timestamp_nsecs", "performance_metrics")
UNLISTED = "it has no file listing"
ACCEPT_UNLISTED_HINT = (
    "if you trust it, rerun with --config.fault.accept_unlisted_checkpoints=True; otherwise "
    "move it aside to resume from an earlier step"
)


def _sha256(path: str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def list_files(step_dir: str, hashes: bool = True) -> dict[str, dict]:
    """{relative path: {size, sha256}} for every file of the items (``state/``, ``iter/``).

    Top-level files are left out: Orbax rewrites ``_CHECKPOINT_METADATA`` (commit time) and
    adds ``commit_success.txt`` after our listing is written.
    """
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, step_dir)
            if os.sep not in rel:
                continue
            entry = {"size": os.path.getsize(full)}
            if hashes:
                entry["sha256"] = _sha256(full)
            out[rel] = entry
    return dict(sorted(out.items()))


def _stable_metadata(step_dir: str) -> dict | None:
    try:
        with open(os.path.join(step_dir, METADATA_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    return {k: v for k, v in meta.items() if k not in _COMMIT_TIME_FIELDS}


def write_listing(step_dir: str, hashes: bool = True) -> None:
    """Writes the listing atomically (temp file, fsync, rename) so it is never half written."""
    listing = {"format": "lmtrain-checkpoint-files-v1", "files": list_files(step_dir, hashes)}
    meta = _stable_metadata(step_dir)
    if meta is not None:
        listing["metadata"] = meta
    tmp = os.path.join(step_dir, LISTING_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(listing, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, LISTING_FILE))


def _verify_metadata(step_dir: str, want: dict | None) -> str | None:
    """Orbax's top-level metadata: present and parseable, with the fields the listing recorded."""
    path = os.path.join(step_dir, METADATA_FILE)
    if not os.path.exists(path):
        return f"{METADATA_FILE} is missing" if want is not None else None
    try:
        with open(path) as f:
            meta = json.load(f)
        assert isinstance(meta, dict)
    except (OSError, ValueError, AssertionError) as e:
        return f"{METADATA_FILE} is unreadable ({type(e).__name__}) (corrupted)"
    stamp = meta.get("commit_timestamp_nsecs")
    if stamp is not None and not isinstance(stamp, int):
        return f"{METADATA_FILE} has a malformed commit time {stamp!r} (corrupted)"
    for key, value in (want or {}).items():
        if meta.get(key) != value:
            return f"{METADATA_FILE} field {key!r} differs from {LISTING_FILE} (altered)"
    return None


def verify_step_dir(step_dir: str, accept_unlisted: bool = False) -> str | None:
    """None if every listed file is present with its size and hash and the top-level metadata
    matches; else what is wrong. A step without a listing is a problem unless
    ``accept_unlisted`` (then only its metadata is checked)."""
    path = os.path.join(step_dir, LISTING_FILE)
    if not os.path.isdir(step_dir):
        return f"{step_dir} does not exist"
    if not os.path.exists(path):
        if accept_unlisted:
            return _verify_metadata(step_dir, None)
        return f"{UNLISTED} ({LISTING_FILE}), so its files cannot be checked"
    try:
        with open(path) as f:
            listing = json.load(f)
        files = listing["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        return f"its file listing {path} is unreadable ({type(e).__name__}: {e})"
    for rel, want in files.items():
        full = os.path.join(step_dir, rel)
        if not os.path.exists(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != want["size"]:
            return (
                f"{rel} has {size} bytes, the listing says {want['size']} (truncated or rewritten)"
            )
        if "sha256" in want and _sha256(full) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in {LISTING_FILE} (corrupted)"
    return _verify_metadata(step_dir, listing.get("metadata"))


def _state_save_handler() -> ocp.PyTreeCheckpointHandler | None:
    """On CPU, a handler that writes the state without Orbax's replica-parallel save.

    Replica-parallel (Orbax's default everywhere but GPU) splits each replicated array across the
    devices holding it so they write in parallel, slicing with one jitted ``slice`` per shape and
    device: on CPU, where one host writes anyway, that only adds compile time to each new tree's
    first save (docs/performance.md).

    The handler gets a private type-handler registry (Orbax's defaults with this one ``jax.Array``
    handler swapped in). Registering it in Orbax's global registry instead, as before, replaced
    the handler for every Orbax user in the process and made absl log ``Type handler registry
    type ... overriding jax.Array`` on every run. None elsewhere: Orbax's own default applies.
    """
    if jax.default_backend() != "cpu":
        return None
    th = ocp.type_handlers
    default = th.get_type_handler(jax.Array)
    try:
        single = th.ArrayHandler(
            use_replica_parallel=False,
            array_metadata_store=getattr(default, "_array_metadata_store", None),
        )
    except TypeError:  # pragma: no cover - an Orbax without these options: keep its default
        return None
    pairs = [
        (t, single if t is jax.Array else th.get_type_handler(t)) for t in th.supported_types()
    ]
    return ocp.PyTreeCheckpointHandler(
        type_handler_registry=th.create_type_handler_registry(*pairs)
    )


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Items ``state`` (the train state) and ``iter`` (the data iterator's JSON state)."""
    reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
    save = _state_save_handler()
    if save is None:
        reg.add("state", ocp.args.StandardSave)
    else:
        reg.add("state", ocp.args.PyTreeSave, save)
    reg.add("state", ocp.args.StandardRestore)
    reg.add("state", ocp.args.PyTreeRestore)
    reg.add("iter", ocp.args.JsonSave)
    reg.add("iter", ocp.args.JsonRestore)
    return reg


class Checkpointer:
    def __init__(
        self,
        directory: str,
        *,
        keep: int = 2,
        async_save: bool = True,
        hash_files: bool = True,
        report: Callable[[str], None] = print,
        owner: bool = False,
        accept_unlisted: bool = False,
    ):
        """``owner=True`` for the one training run writing ``directory``: it removes incomplete
        writes left by a killed run and moves corrupt steps aside. Readers (eval, generate,
        init_from) only skip them, so they never disturb a run that is still saving."""
        self.directory = os.path.abspath(directory)
        self.owner = owner
        self.accept_unlisted = accept_unlisted
        self.async_save = async_save
        self.hash_files = hash_files
        self.report = report
        self._verified: set[int] = set()
        self._pending: set[int] = set()  # saved by this process, listing not yet written
        self._lock = threading.Lock()
        self._is_primary = jax.process_index() == 0
        self._reported: set[int] = set()
        leftovers = sorted(glob.glob(os.path.join(self.directory, f"*{TMP_MARKER}*")))
        if leftovers and self._is_primary and owner:
            names = ", ".join(os.path.basename(p) for p in leftovers)
            report(f"checkpoint: discarding incomplete write(s) from an earlier run: {names}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # Always async underneath: the listing is written by Orbax's post-finalization
            # callback, which only the async checkpointer runs. Sync saves wait right after.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._list_uncommitted),
            cleanup_tmp_directories=owner,
        )
        self._registry = _handler_registry()
        self._save_args = (
            ocp.args.PyTreeSave
            if self._registry.has("state", ocp.args.PyTreeSave)
            else ocp.args.StandardSave
        )
        self.mgr = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=self._registry
        )

    # -- integrity -----------------------------------------------------------------------------
    def _list_uncommitted(self) -> None:
        """Runs after Orbax finalised the items and before its commit rename: list the tmp dir."""
        if not self._is_primary:
            return
        with self._lock:
            for step in sorted(self._pending):
                for tmp in glob.glob(os.path.join(self.directory, f"{step}{TMP_MARKER}*")):
                    write_listing(tmp, self.hash_files)
                    self._pending.discard(step)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def verify(self, step: int) -> str | None:
        """None if step's files match its listing (cached per step for this process)."""
        if step in self._verified:
            return None
        problem = verify_step_dir(self.step_dir(step), self.accept_unlisted)
        if problem is None:
            self._verified.add(step)
        return problem

    def quarantine(self, step: int, problem: str) -> str:
        """Moves a bad step out of Orbax's directory (kept for inspection) and reports it."""
        src = self.step_dir(step)
        dest_root = self.directory.rstrip("/") + ".corrupt"
        dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if self._is_primary:
            os.makedirs(dest_root, exist_ok=True)
            shutil.move(src, dest)
            self.report(
                f"checkpoint: step {step} in {self.directory} is corrupt: {problem}; "
                f"moved it to {dest} and falling back to the previous checkpoint"
            )
        self._verified.discard(step)
        self.mgr.reload()
        return dest

    # -- public API ----------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest step whose files check out; corrupt newer steps are set aside (owner) or
        skipped (reader), and reported."""
        if self.owner:
            while (step := self.mgr.latest_step()) is not None:
                problem = self.verify(step)
                if problem is None:
                    return step
                if problem.startswith(UNLISTED):  # not known to be corrupt: the user decides
                    raise CheckpointError(
                        f"step {step} in {self.directory}: {problem}; {ACCEPT_UNLISTED_HINT} "
                        f"({self.step_dir(step)})"
                    )
                self.quarantine(step, problem)
            return None
        for step in sorted(self.mgr.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem is None:
                return step
            if step not in self._reported and self._is_primary:
                self._reported.add(step)
                hint = f"; {ACCEPT_UNLISTED_HINT}" if problem.startswith(UNLISTED) else ""
                self.report(
                    f"checkpoint: skipping corrupt step {step} in {self.directory}: {problem}"
                    + hint
                )
        return None

    def all_steps(self) -> list[int]:
        return list(self.mgr.all_steps())

    def save(self, step: int, state, iter_state: dict | None, *, force: bool = False) -> bool:
        args = {"state": self._save_args(state)}
        args["iter"] = ocp.args.JsonSave(iter_state or {})
        with self._lock:
            self._pending.add(step)
        saved = self.mgr.save(step, args=ocp.args.Composite(**args), force=force)
        if saved:
            self._verified.add(step)  # written by us, listed before commit
        if not self.async_save:
            self.mgr.wait_until_finished()
        return saved

    def restore(self, step: int, abstract_state, shardings):
        problem = self.verify(step)
        if problem is not None:
            if problem.startswith(UNLISTED):
                raise CheckpointError(
                    f"step {step} in {self.directory}: {problem}; {ACCEPT_UNLISTED_HINT}"
                )
            raise CheckpointError(
                f"step {step} in {self.directory} is corrupt: {problem}. Move {self.step_dir(step)} "
                "aside (or delete it) to resume from the previous checkpoint"
            )
        target = _restore_target(abstract_state, shardings)
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
        problem = self.verify(step)
        if problem is not None:
            raise CheckpointError(f"step {step} in {self.directory} is corrupt: {problem}")
        target = _restore_target(abstract_params, shardings)
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

    def read_arrays(self, step: int) -> dict:
        """The saved train state as a nested dict of numpy arrays, whatever mesh wrote it.

        For comparing runs (tests, ``tools/soak.py``) without building the model.
        """
        import numpy as np

        problem = self.verify(step)
        if problem is not None:
            raise CheckpointError(f"step {step} in {self.directory} is corrupt: {problem}")
        path = os.path.join(self.step_dir(step), "state")
        reader = ocp.PyTreeCheckpointer()
        meta = reader.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return reader.restore(path, restore_args=restore_args)

    def delete(self, step: int) -> None:
        """Removes a step (a loss-spike rollback drops checkpoints taken after the spike)."""
        self.mgr.wait_until_finished()
        self.mgr.delete(step)
        self._verified.discard(step)

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


def _restore_target(abstract, shardings):
    """The abstract tree's shapes and dtypes with the shardings to restore into."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
