"""Run model-generated Python against its tests in a resource-limited subprocess; pass@k.

Generated code is never executed in the evaluator's process: an infinite loop, a memory bomb or
``os._exit`` would take the whole run down. Each program runs in a fresh ``python -I``
subprocess, in its own session (so the whole process group can be killed), in a fresh temporary
directory, with stdin closed, a wall-clock timeout, CPU-time / address-space / file-size limits
set by ``resource.setrlimit`` in ``preexec_fn``, and captured output capped in size.

This is a *robustness* boundary, not a security sandbox: the network and the file system are
not isolated (we assume the machine has no network). Run untrusted code at scale inside a
container or VM as well.

Note: ``preexec_fn`` runs in the forked child before ``exec``; CPython warns it can deadlock if
the parent has other threads holding locks. Ours only calls ``setrlimit`` with precomputed
values (no imports, no allocation-heavy work), which keeps that window tiny.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from lmtrain.errors import DataError
from lmtrain.eval.metrics import pass_at_k

__all__ = ["CodeProblem", "ExecLimits", "ExecResult", "evaluate_pass_at_k", "run_code"]

Status = Literal["passed", "failed", "timed_out", "error"]


@dataclass(frozen=True)
class ExecLimits:
    """Per-program limits. ``cpu_s`` defaults to the wall timeout rounded up, plus one second."""

    timeout_s: float = 5.0
    memory_bytes: int = 1 << 30
    cpu_s: int | None = None
    max_output_bytes: int = 16 * 1024
    max_file_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``failed`` = a test assertion failed; ``error`` = anything else."""

    status: Status
    message: str = ""
    elapsed_s: float = 0.0
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class CodeProblem:
    """A task: ``prompt + sample`` is the solution, then ``test`` runs; ``check(entry_point)``
    is appended when ``entry_point`` is set (HumanEval layout)."""

    task_id: str
    test: str
    prompt: str = ""
    entry_point: str | None = None

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> CodeProblem:
        missing = [k for k in ("task_id", "test") if k not in d]
        if missing:
            raise DataError(f"code problem {dict(d).get('task_id', '?')!r} lacks keys {missing}")
        return cls(str(d["task_id"]), d["test"], d.get("prompt", ""), d.get("entry_point"))

    def program(self, sample: str) -> str:
        check = f"\n\ncheck({self.entry_point})\n" if self.entry_point else "\n"
        return f"{self.prompt}{sample}\n\n{self.test}{check}"


# Runs inside the child. The nonce proves the harness itself reached the end: a program that
# calls sys.exit(0) / os._exit(0) before its tests run must not count as passing.
_HARNESS = r"""
import json, sys, traceback
nonce, path = sys.argv[1], sys.argv[2]
def report(status, message=""):
    with open(".lmtrain_result", "w") as f:
        json.dump({"nonce": nonce, "status": status, "message": message[-500:]}, f)
try:
    with open(path) as f:
        source = f.read()
    del sys.argv[1:]
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
except AssertionError as e:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (line {tb[-1].lineno})" if tb else ""
    report("failed", f"AssertionError{where}: {e}".rstrip(": "))
except MemoryError:
    report("error", "MemoryError: memory limit exceeded")
except SystemExit as e:
    report("error", f"program called exit({e.code!r}) before finishing its tests")
except BaseException as e:
    report("error", f"{type(e).__name__}: {e}")
else:
    report("passed")
"""


def _make_preexec(limits: ExecLimits):
    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    settings = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes)),
        (resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]

    def preexec() -> None:
        for which, value in settings:
            try:
                resource.setrlimit(which, value)
            except (ValueError, OSError):
                pass  # e.g. RLIMIT_AS is unsupported on macOS; other limits still apply.

    return preexec


def _drain(stream, cap: int, sink: bytearray) -> None:
    """Keep the first ``cap`` bytes and discard the rest, so a print loop cannot fill memory."""
    while chunk := stream.read(65536):
        if len(sink) < cap:
            sink.extend(chunk[: cap - len(sink)])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_code(program: str, limits: ExecLimits | None = None) -> ExecResult:
    """Execute ``program`` (solution plus tests) in a limited subprocess and classify it."""
    limits = limits or ExecLimits()
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="lmtrain-exec-", ignore_cleanup_errors=True) as work:
        with open(os.path.join(work, "program.py"), "w") as f:
            f.write(program)
        env = {
            "PATH": os.defpath,
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _HARNESS, nonce, "program.py"],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_make_preexec(limits),
            start_new_session=True,
        )
        out = bytearray()
        reader = threading.Thread(target=_drain, args=(proc.stdout, limits.max_output_bytes, out))
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)  # also kills any children the program left running
        proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()
        elapsed = time.monotonic() - start
        output = out.decode("utf-8", "replace")
        result = _read_result(os.path.join(work, ".lmtrain_result"), nonce)
    if timed_out or (result is None and proc.returncode == -signal.SIGXCPU):
        return ExecResult("timed_out", f"stopped after {elapsed:.1f}s", elapsed, output)
    if result is not None:
        return ExecResult(result["status"], result["message"], elapsed, output)
    if proc.returncode is not None and proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        why = " (file size limit exceeded)" if name == "SIGXFSZ" else ""
        return ExecResult("error", f"killed by {name}{why}", elapsed, output)
    return ExecResult(
        "error", f"exited with code {proc.returncode} before finishing its tests", elapsed, output
    )


def _read_result(path: str, nonce: str) -> dict[str, str] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("nonce") == nonce
    ok = ok and data.get("status") in ("passed", "failed", "error")
    return {"status": data["status"], "message": str(data.get("message", ""))} if ok else None


def evaluate_pass_at_k(
    problems: Sequence[CodeProblem | Mapping[str, Any]],
    samples_per_problem: Mapping[str, Sequence[str]],
    ks: Sequence[int] = (1,),
    *,
    limits: ExecLimits | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run every sample of every problem and return mean pass@k plus per-problem detail.

    ``samples_per_problem`` maps ``task_id`` to that problem's samples. A k larger than some
    problem's sample count is left out of the summary (and listed under ``skipped_ks``), as the
    unbiased estimator is undefined there. Programs run on a small thread pool; each thread
    just waits on its subprocess, so threads (not processes) are enough.
    """
    probs = [p if isinstance(p, CodeProblem) else CodeProblem.from_mapping(p) for p in problems]
    if not probs:
        raise DataError("evaluate_pass_at_k: no problems given")
    ids = [p.task_id for p in probs]
    if len(set(ids)) != len(ids):
        raise DataError("evaluate_pass_at_k: duplicate task_id values; make them unique")
    missing = [p.task_id for p in probs if not samples_per_problem.get(p.task_id)]
    if missing:
        raise DataError(f"evaluate_pass_at_k: no samples for tasks {missing[:5]}")
    jobs = [(p, s) for p in probs for s in samples_per_problem[p.task_id]]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: run_code(job[0].program(job[1]), limits), jobs))

    per_problem: dict[str, dict[str, Any]] = {
        p.task_id: {"n": 0, "c": 0, "statuses": []} for p in probs
    }
    for (p, _), r in zip(jobs, results):
        entry = per_problem[p.task_id]
        entry["n"] += 1
        entry["c"] += r.passed
        entry["statuses"].append(r.status)
    min_n = min(e["n"] for e in per_problem.values())
    usable = sorted({k for k in ks if k <= min_n})
    summary: dict[str, Any] = {}
    for k in usable:
        scores = [pass_at_k(e["n"], e["c"], k) for e in per_problem.values()]
        summary[f"pass@{k}"] = sum(scores) / len(scores)
    return {
        "metrics": summary,
        "n": len(probs),
        "per_problem": per_problem,
        "skipped_ks": sorted({k for k in ks if k > min_n}),
    }
