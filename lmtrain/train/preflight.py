"""Preflight: the checks that must pass before anything is compiled or a step is spent.

A misconfigured run should fail in seconds with every problem named and its fix, not after an
hour of compiling or on its first checkpoint. ``run_preflight`` checks that the config resolves,
the mesh fits the devices, the global batch divides over the data shards, the workdir is writable
with free disk for two checkpoints (estimated from the abstract params + optimizer state), the
data is present and matches its manifest hashes, and the tokenizer's vocab fits the model's.
All problems are collected and raised together as one ``PreflightError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable

import jax

from lmtrain.data.fetch import missing_hint
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.errors import ConfigError, LmtrainError
from lmtrain.model.config import ModelConfig
from lmtrain.model.sharding import resolve_mesh_shape
from lmtrain.model.transformer import Transformer
from lmtrain.train.config_check import validate
from lmtrain.train.optim import make_optimizer
from lmtrain.train.state import init_fn

HASH_CACHE_FILE = "preflight_hashes.json"


@dataclasses.dataclass
class Problem:
    check: str  # config | mesh | batch | workdir | disk | data | tokenizer
    message: str  # what is wrong and how to fix it


class PreflightError(LmtrainError):
    """One or more preflight checks failed; ``problems`` lists each with its fix."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  [{p.check}] {p.message}" for p in problems)
        super().__init__(f"preflight found {len(problems)} problem(s):\n{lines}")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# -- config, mesh, batch -------------------------------------------------------------------------
def check_config(cfg, num_devices: int) -> list[Problem]:
    n = cfg.mesh.num_devices or num_devices
    if cfg.mesh.num_devices > num_devices:
        return [
            Problem(
                "mesh",
                f"config.mesh.num_devices={cfg.mesh.num_devices} but only {num_devices} devices "
                f"are visible; set it to at most {num_devices} (0 = all)",
            )
        ]
    try:
        shape = resolve_mesh_shape(cfg.mesh.shape, n)
    except ConfigError as e:
        return [Problem("mesh", str(e))]
    shards, mb, gbs = shape[0] * shape[1], cfg.train.microbatches, cfg.train.global_batch_size
    if mb > 0 and gbs % (shards * mb):
        good = max(shards * mb, gbs // (shards * mb) * shards * mb)
        return [
            Problem(
                "batch",
                f"config.train.global_batch_size={gbs} does not divide over the {shards} data "
                f"shards (mesh data x fsdp) x {mb} microbatches; use a multiple of "
                f"{shards * mb}, e.g. {good}",
            )
        ]
    try:
        validate(cfg, num_devices)
    except ConfigError as e:
        return [Problem("config", str(e))]
    return []


# -- workdir and disk ----------------------------------------------------------------------------
def check_workdir(workdir: str) -> list[Problem]:
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".preflight-", delete=True) as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        return [
            Problem(
                "workdir",
                f"workdir {workdir!r} is not writable ({e.strerror or e}); pass a --workdir you "
                "can write to or fix its permissions",
            )
        ]
    return []


def checkpoint_bytes(cfg, vocab_size: int) -> int:
    """Bytes of one checkpoint: the abstract params + optimizer state (nothing is allocated)."""
    model_cfg = ModelConfig.from_config(cfg.model)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=cfg.model.vocab_size or vocab_size)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    abstract = jax.eval_shape(
        init_fn(Transformer(model_cfg), tx, cfg.data.seq_len, cfg.seed, False)
    )
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def check_disk(workdir: str, need_bytes: int, copies: int = 2) -> list[Problem]:
    free = shutil.disk_usage(workdir).free
    if free < copies * need_bytes:
        return [
            Problem(
                "disk",
                f"workdir {workdir!r} has {_gb(free)} free but {copies} checkpoints of this model "
                f"(params + optimizer state, {_gb(need_bytes)} each) need {_gb(copies * need_bytes)};"
                " free some space or pass a --workdir on a bigger disk",
            )
        ]
    return []


# -- data and tokenizer --------------------------------------------------------------------------
class HashCache:
    """SHA-256 of data files, cached by (size, mtime) in the workdir so resumes do not rehash."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, HASH_CACHE_FILE)
        try:
            with open(self.path) as f:
                self.entries = json.load(f)
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, path: str) -> str:
        st = os.stat(path)
        key = os.path.abspath(path)
        hit = self.entries.get(key)
        if isinstance(hit, list) and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self.entries[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        return h.hexdigest()

    def save(self) -> None:
        try:
            with open(self.path, "w") as f:
                json.dump(self.entries, f)
        except OSError:
            pass  # a cache only


def _read_json(path: str, problems: list[Problem], what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        problems.append(
            Problem("data", f"{what} {path} is unreadable ({e}); re-run `lmtrain data prepare`")
        )
        return None


def _manifest_shards(manifest: dict, split: str) -> list | None:
    """Shard entries for ``split`` in a data-prepare or text-file manifest, if it lists any."""
    entry = (manifest.get("splits") or {}).get(split)
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("index"), dict):
        entry = entry["index"]
    shards = entry.get("shards")
    return shards if isinstance(shards, list) else None


def check_data_dir(
    data_dir: str, splits: tuple[str, ...], cache: HashCache | None
) -> list[Problem]:
    """Splits, shards and tokenizer present; shard hashes match index.json and manifest.json."""
    problems: list[Problem] = []
    redo = "re-run `lmtrain data prepare` or point config.data.dir at a complete prepared directory"
    if not os.path.isdir(data_dir):
        return [Problem("data", f"config.data.dir={data_dir!r} does not exist; {redo}")]
    manifest_path = os.path.join(data_dir, "manifest.json")
    manifest = (
        _read_json(manifest_path, problems, "manifest") if os.path.exists(manifest_path) else None
    )
    for split in splits:
        index_path = os.path.join(data_dir, split, "index.json")
        if not os.path.exists(index_path):
            problems.append(
                Problem("data", f"split {split!r} is missing ({index_path} not found); {redo}")
            )
            continue
        index = _read_json(index_path, problems, "index")
        if not isinstance(index, dict):
            continue
        listed = {
            s.get("file"): s.get("sha256") for s in index.get("shards", []) if isinstance(s, dict)
        }
        m_shards = _manifest_shards(manifest, split) if isinstance(manifest, dict) else None
        if m_shards is not None:
            m_listed = {s.get("file"): s.get("sha256") for s in m_shards if isinstance(s, dict)}
            if m_listed != listed:
                problems.append(Problem(
                    "data", f"{index_path} and {manifest_path} disagree on the shards of split "
                    f"{split!r} (data rewritten after the manifest?); {redo}"))  # fmt: skip
        for name, digest in listed.items():
            path = os.path.join(data_dir, split, str(name))
            if not os.path.isfile(path):
                problems.append(
                    Problem("data", f"shard {path} listed in {index_path} is missing; {redo}")
                )
            elif cache is not None and digest and cache.sha256(path) != digest:
                problems.append(Problem(
                    "data", f"shard {path} does not match its SHA-256 in the manifest "
                    f"(corrupted or changed after preparing); {redo}"))  # fmt: skip
    if not os.path.exists(os.path.join(data_dir, "tokenizer")):
        problems.append(Problem("tokenizer", f"no tokenizer at {data_dir}/tokenizer; {redo}"))
    return problems


def check_vocab(cfg, data_dir: str) -> tuple[list[Problem], int]:
    """Tokenizer vocab vs model vocab and vs the vocab the data was tokenized with."""
    tok_dir = os.path.join(data_dir, "tokenizer")
    try:
        tok = load_tokenizer(tok_dir)
    except (LmtrainError, OSError, ValueError, KeyError) as e:
        return [Problem("tokenizer", f"cannot load the tokenizer at {tok_dir}: {e}")], 0
    problems = []
    v = cfg.model.vocab_size
    if v and v < tok.vocab_size:
        problems.append(Problem(
            "tokenizer", f"config.model.vocab_size={v} is smaller than the tokenizer's "
            f"{tok.vocab_size} ({tok_dir}); set it to 0 to follow the tokenizer or to >= "
            f"{tok.vocab_size}"))  # fmt: skip
    manifest_path = os.path.join(data_dir, "manifest.json")
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = {}  # reported by check_data_dir
        mv = manifest.get("vocab_size") if isinstance(manifest, dict) else None
        if isinstance(mv, int) and mv != tok.vocab_size:
            problems.append(Problem(
                "tokenizer", f"the data in {data_dir} was tokenized with a vocab of {mv} "
                f"(manifest.json) but {tok_dir} has {tok.vocab_size}; re-run `lmtrain data "
                "prepare` so data and tokenizer match"))  # fmt: skip
    return problems, tok.vocab_size


def check_data_path(cfg) -> list[Problem]:
    path = cfg.data.path
    if not os.path.isfile(path):
        return [
            Problem(
                "data",
                f"config.data.path={path!r} does not exist or is not a file; fix the path"
                + missing_hint(path),
            )
        ]
    if os.path.getsize(path) == 0:
        return [
            Problem(
                "data", f"config.data.path={path!r} is empty; point it at a text file with data"
            )
        ]
    if not os.access(path, os.R_OK):
        return [Problem("data", f"config.data.path={path!r} is not readable; fix its permissions")]
    tok = cfg.data.tokenizer
    if tok != "char" and not os.path.exists(tok):
        return [Problem("tokenizer", f"config.data.tokenizer={tok!r} not found; use 'char' or a tokenizer directory / .model file")]  # fmt: skip
    return []


# -- all together --------------------------------------------------------------------------------
def run_preflight(
    cfg,
    workdir: str,
    *,
    num_devices: int | None = None,
    print_fn: Callable[[str], None] | None = None,
) -> dict:
    """Runs every check; raises ``PreflightError`` naming each failure and its fix."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    problems = check_config(cfg, num_devices)
    config_ok = not problems
    problems += check_workdir(workdir)
    workdir_ok = not any(p.check == "workdir" for p in problems)
    vocab = 0
    if cfg.data.dir and not cfg.data.path:
        cache = HashCache(workdir) if cfg.fault.verify_data_hashes and workdir_ok else None
        splits = (cfg.data.train_split, cfg.data.eval_split)
        problems += check_data_dir(cfg.data.dir, splits, cache)
        if cache is not None:
            cache.save()
        if os.path.isdir(os.path.join(cfg.data.dir, "tokenizer")):
            vocab_problems, vocab = check_vocab(cfg, cfg.data.dir)
            problems += vocab_problems
    elif cfg.data.path:
        problems += check_data_path(cfg)
        prepared = os.path.join(workdir, "data")
        if os.path.isdir(os.path.join(prepared, "tokenizer")):
            vocab_problems, vocab = check_vocab(cfg, prepared)
            problems += vocab_problems
    need = 0
    if config_ok and workdir_ok:
        need = checkpoint_bytes(cfg, vocab or 256)  # vocab unknown before data.path is prepared
        problems += check_disk(workdir, need)
    if problems:
        raise PreflightError(problems)
    if print_fn is not None:
        msg = f"preflight ok ({num_devices} devices"
        msg += f", checkpoint ~{_gb(need)})" if need else ")"
        print_fn(msg)
    return {"checkpoint_bytes": need, "vocab_size": vocab}
