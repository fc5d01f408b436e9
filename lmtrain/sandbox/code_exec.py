"""Run model-generated Python against its tests; pass@k. The verdict cannot be forged.

Two processes per program (see ``run``):

- the *program* runs in a sandbox (``lmtrain.sandbox.isolation``: namespaces, a throw-away uid,
  no network, a private tmpfs, rlimits, whole-tree kill), and only answers calls to its
  top-level functions with plain data over a pipe;
- the *tests* run in a separate judge process that calls those functions through proxies and
  alone writes the verdict to a pipe that only the evaluator reads.

So a program that walks stack frames, reads nonces from ``/proc``, writes result files,
prints fake verdicts or exits early can at best send wrong data or stop: it is never
"passed" unless the tests' own assertions hold on the values it returned. Running any
generated code needs an explicit opt-in (``--allow-code-execution`` or
``$LMTRAIN_ALLOW_CODE_EXECUTION=1``), as bigcode-evaluation-harness does.
"""

from __future__ import annotations

import json
import math
import os
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

from lmtrain.errors import ConfigError, DataError
from lmtrain.sandbox.isolation import ProcLimits, launcher, resolve_isolation, spawn

__all__ = [
    "CodeProblem",
    "ExecLimits",
    "ExecResult",
    "code_execution_allowed",
    "evaluate_pass_at_k",
    "run",
    "run_tests",
]

Status = Literal["passed", "failed", "timed_out", "error"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021).

    Computes ``1 - C(n-c, k) / C(n, k)`` as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never
    forms the huge binomials and so stays exact enough for n in the thousands.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise DataError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


@dataclass(frozen=True)
class ExecLimits:
    """Per-program limits. ``cpu_s`` defaults to the wall timeout rounded up, plus one second."""

    timeout_s: float = 5.0
    memory_bytes: int = 1 << 30
    cpu_s: int | None = None
    max_output_bytes: int = 16 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_processes: int = 32  # per sandbox uid (namespace isolation; root ignores RLIMIT_NPROC)
    tmp_bytes: int = 64 * 1024 * 1024  # size of the private /tmp (namespace isolation)


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
    """A task: ``prompt + sample`` is the program; ``test`` runs in the judge, followed by
    ``check(entry_point)`` when ``entry_point`` is set (HumanEval layout)."""

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
        return f"{self.prompt}{sample}\n"

    def judge(self, sample: str, limits: ExecLimits | None = None, **kw: Any) -> ExecResult:
        """Run ``sample`` against this problem's tests (see ``run``)."""
        return run(
            self.program(sample),
            self.test,
            limits,
            prelude=self.prompt,
            entry_point=self.entry_point,
            **kw,
        )


# Value codec shared by both sides: only plain data crosses between the program and the tests,
# so nothing the program sends back can run code or fake an equality in the tests' process.
_CODEC = r"""
def enc(v, depth=0):
    if depth > 100:
        raise ValueError("value nested too deeply")
    t = type(v)
    if v is None or t is bool or t is str or t is int:
        return v
    if t is float:
        return v if v == v and v not in (float("inf"), float("-inf")) else {"$float": repr(v)}
    d = depth + 1
    if t is list:
        return [enc(x, d) for x in v]
    if t is tuple:
        return {"$tuple": [enc(x, d) for x in v]}
    if t is dict:
        return {"$dict": [[enc(k, d), enc(x, d)] for k, x in v.items()]}
    if t is set or t is frozenset:
        return {"$" + t.__name__: [enc(x, d) for x in v]}
    if t is bytes:
        return {"$bytes": v.hex()}
    if t is complex:
        return {"$complex": [v.real, v.imag]}
    raise TypeError(f"a {t.__name__} cannot be passed between the program and its tests")

def dec(v):
    if v is None or type(v) in (bool, str, int, float):
        return v
    if type(v) is list:
        return [dec(x) for x in v]
    (tag, x), = v.items()
    if tag == "$float":
        return float(x)
    if tag == "$tuple":
        return tuple(dec(y) for y in x)
    if tag == "$dict":
        return {dec(k): dec(y) for k, y in x}
    if tag == "$set":
        return {dec(y) for y in x}
    if tag == "$frozenset":
        return frozenset(dec(y) for y in x)
    if tag == "$bytes":
        return bytes.fromhex(x)
    if tag == "$complex":
        return complex(float(x[0]), float(x[1]))
    raise ValueError("bad value tag")

def describe(e):
    if isinstance(e, AssertionError):
        import traceback
        tb = traceback.extract_tb(e.__traceback__)
        where = f" (line {tb[-1].lineno})" if tb else ""
        return f"AssertionError{where}: {e}".rstrip(": ")
    if isinstance(e, MemoryError):
        return "MemoryError: memory limit exceeded"
    if isinstance(e, SystemExit):
        return f"program called exit({e.code!r}) before finishing its tests"
    return f"{type(e).__name__}: {e}"
"""

# The untrusted side: runs the program, then answers calls to its functions with plain data.
# Whatever it does (patch this code, forge messages, exit) it can only send data or stop.
_CANDIDATE = (
    "import json, os, sys\n"
    + _CODEC
    + r"""
rf = os.fdopen(int(sys.argv[1]), "r", encoding="utf-8")
wf = os.fdopen(int(sys.argv[2]), "w", encoding="utf-8")
del sys.argv[1:]
def send(obj):
    wf.write(json.dumps(obj) + "\n")
    wf.flush()
source = json.loads(rf.readline())["program"]
g = {"__name__": "__main__"}
try:
    exec(compile(source, "program.py", "exec"), g)
except BaseException as e:
    send({"loaded": False, "type": type(e).__name__, "message": describe(e)[-500:]})
    os._exit(0)
names = {}
for k, v in list(g.items()):
    if k.startswith("__") or type(v).__name__ == "module":
        continue
    if callable(v):
        names[k] = {"kind": "callable"}
    else:
        try:
            names[k] = {"kind": "value", "value": enc(v)}
        except Exception:
            pass
send({"loaded": True, "names": names})
for line in rf:
    req = json.loads(line)
    try:
        out = {"ok": enc(g[req["name"]](*dec(req["args"]), **dec(req["kwargs"])))}
    except BaseException as e:
        out = {"raise": type(e).__name__, "message": describe(e)[-500:]}
    send(out)
"""
)

# The trusted side: runs the benchmark's tests against proxies of the program's functions and
# alone decides the verdict, which it writes to a pipe only the evaluator reads. The program
# never shares this process (and, under namespace isolation, cannot see or signal it).
_JUDGE = (
    "import builtins, json, os, sys\n"
    # First: not dumpable, so even a same-user program (process isolation) cannot open this
    # process's /proc fds, memory or environment to forge or read the verdict.
    + "try:\n    import ctypes; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)\nexcept Exception:\n    pass\n"
    + _CODEC
    + r"""
to_prog = os.fdopen(int(sys.argv[1]), "w", encoding="utf-8")
from_prog = os.fdopen(int(sys.argv[2]), "r", encoding="utf-8")
verdict = os.fdopen(int(sys.argv[3]), "w", encoding="utf-8")
del sys.argv[1:]
spec = json.loads(sys.stdin.read())
sys.stdin = open(os.devnull)

def report(status, message=""):
    verdict.write(json.dumps({"status": status, "message": message[-500:]}))
    verdict.flush()
    os._exit(0)

class ProgramGone(BaseException):
    # BaseException: a test's `except Exception` must not swallow a dead program.
    pass

def ask(obj):
    try:
        to_prog.write(json.dumps(obj) + "\n")
        to_prog.flush()
    except (BrokenPipeError, OSError):
        raise ProgramGone()
    line = from_prog.readline()
    if not line:
        raise ProgramGone()
    return json.loads(line)

def proxy(name):
    def call(*args, **kwargs):
        msg = ask({"name": name, "args": enc(list(args)), "kwargs": enc(kwargs)})
        if "ok" in msg:
            return dec(msg["ok"])
        exc = getattr(builtins, str(msg.get("raise")), None)
        if not (isinstance(exc, type) and issubclass(exc, Exception)):
            exc = RuntimeError
        raise exc(str(msg.get("message", "")))
    call.__name__ = name
    return call

try:
    hello = ask({"program": spec["program"]})
except ProgramGone:
    report("error", "program exited before finishing its tests")
if not hello.get("loaded"):
    status = "failed" if hello.get("type") == "AssertionError" else "error"
    report(status, str(hello.get("message", "")))
g = {"__name__": "__main__"}
if spec["prelude"]:
    try:  # the benchmark's prompt: trusted helpers the tests may call (HumanEval/38, /50)
        exec(compile(spec["prelude"], "prompt.py", "exec"), g)
    except BaseException:
        g = {"__name__": "__main__"}
entry = spec["entry_point"]
names = hello.get("names", {})
if entry and entry not in names:
    report("error", f"program does not define {entry}")
for name, info in names.items():
    if name == entry or name not in g:
        g[name] = proxy(name) if info.get("kind") == "callable" else dec(info.get("value"))
try:
    exec(compile(spec["tests"], "tests.py", "exec"), g)
    if entry:
        g["check"](g[entry])
except ProgramGone:
    report("error", "program exited before finishing its tests")
except AssertionError as e:
    report("failed", describe(e))
except BaseException as e:
    report("error", describe(e))
report("passed")
"""
)

ALLOW_ENV = "LMTRAIN_ALLOW_CODE_EXECUTION"


def code_execution_allowed(allow: bool | None = None) -> bool:
    """True when the caller opted in (``allow=True``) or ``$LMTRAIN_ALLOW_CODE_EXECUTION`` is
    1/true/yes. An explicit ``allow=False`` wins over the environment."""
    if allow is not None:
        return bool(allow)
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def require_opt_in(allow: bool | None = None) -> None:
    if not code_execution_allowed(allow):
        raise ConfigError(
            "refusing to run model-generated code without an explicit opt-in: pass "
            f"--allow-code-execution (lmtrain eval) or set {ALLOW_ENV}=1 after reading "
            "lmtrain/sandbox/isolation.py on what the sandbox does and does not isolate"
        )


def _drain(stream, cap: int, sink: bytearray) -> None:
    """Keep the first ``cap`` bytes and discard the rest, so a print loop cannot fill memory."""
    while chunk := stream.read(65536):
        if len(sink) < cap:
            sink.extend(chunk[: cap - len(sink)])


def run(
    program: str,
    tests: str,
    limits: ExecLimits | None = None,
    *,
    prelude: str = "",
    entry_point: str | None = None,
    allow: bool | None = None,
    isolation: str | None = None,
) -> ExecResult:
    """Run untrusted ``program`` in a sandbox and judge it by ``tests`` in a separate process.

    ``tests`` is Python that asserts on the program's top-level names (``assert f(1) == 2``),
    or defines ``check(candidate)`` that is called with ``entry_point``. ``prelude`` is
    trusted code (e.g. the benchmark prompt) run in the tests' process first. Values cross as
    plain data (None, bool, int, float, str, bytes, complex, list, tuple, dict, set); a
    function that returns anything else raises ``TypeError`` in the tests, and in-place
    mutation of arguments is not seen by the tests. Requires the opt-in (see
    ``require_opt_in``). The same call serves pass@k and reward functions.
    """
    require_opt_in(allow)
    limits = limits or ExecLimits()
    level = resolve_isolation(isolation)
    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    lim = ProcLimits(
        cpu_s=cpu,
        memory_bytes=limits.memory_bytes,
        max_file_bytes=limits.max_file_bytes,
        max_processes=limits.max_processes,
        max_open_files=64,
        tmp_bytes=limits.tmp_bytes,
    )
    to_prog_r, to_prog_w = os.pipe()
    from_prog_r, from_prog_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    start = time.monotonic()
    box = judge = None
    out, err, verdict = bytearray(), bytearray(), bytearray()
    try:
        box = spawn(
            _CANDIDATE,
            [str(to_prog_r), str(from_prog_w)],
            lim,
            isolation=level,
            pass_fds=(to_prog_r, from_prog_w),
        )
        os.close(to_prog_r)
        os.close(from_prog_w)
        to_prog_r = from_prog_w = -1
        judge = _start_judge(cpu, limits, (to_prog_w, from_prog_r, verdict_w))
        for fd in (to_prog_w, from_prog_r, verdict_w):
            os.close(fd)
        to_prog_w = from_prog_r = verdict_w = -1
        spec = json.dumps(
            {"program": program, "tests": tests, "prelude": prelude, "entry_point": entry_point}
        ).encode()
        with os.fdopen(verdict_r, "rb") as vf:
            verdict_r = -1
            deadline = start + limits.timeout_s
            timed_out = _converse(box, judge, vf, spec, limits, deadline, (out, err, verdict))
    finally:
        for fd in (to_prog_r, to_prog_w, from_prog_r, from_prog_w, verdict_r, verdict_w):
            if fd >= 0:
                os.close(fd)
        if judge is not None and judge.poll() is None:
            _kill_tree(judge)
        if box is not None:
            box.kill()
            box.proc.stdout.close()
    elapsed = time.monotonic() - start
    return _result(timed_out, box.exit_signal(), elapsed, out, err, verdict)


def _converse(box, judge, vf, spec: bytes, limits: ExecLimits, deadline: float,
              sinks: tuple[bytearray, bytearray, bytearray]) -> bool:  # fmt: skip
    """Feed the tests their spec and collect the program's output, the tests' stderr and the
    verdict until the tests finish or ``deadline``; both processes are killed after. Returns
    whether it timed out."""
    out, err, verdict = sinks
    threads = [
        threading.Thread(target=_drain, args=(box.proc.stdout, limits.max_output_bytes, out)),
        threading.Thread(target=_drain, args=(judge.stderr, 4096, err)),
        threading.Thread(target=_drain, args=(vf, 65536, verdict)),
        threading.Thread(target=_feed, args=(judge.stdin, spec)),
    ]
    for t in threads:
        t.start()
    timed_out = False
    try:
        judge.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_tree(judge)
    box.kill()
    for t in threads:
        t.join(timeout=5)
    return timed_out


def _start_judge(cpu: int, limits: ExecLimits, fds: tuple[int, int, int]) -> subprocess.Popen:
    """The tests' process (trusted code, its own limits), talking to the candidate over
    ``fds``: (to the program, from the program, the verdict)."""
    judge_prefix, judge_preexec = launcher(
        ProcLimits(cpu, max(limits.memory_bytes, 1 << 30), limits.max_file_bytes, 0, 256, 0),
        with_nproc=False,
    )
    return subprocess.Popen(
        judge_prefix
        + [os.path.realpath(sys.executable), "-I", "-c", _JUDGE, *(str(fd) for fd in fds)],
        cwd=tempfile.gettempdir(),
        env={"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=fds,
        preexec_fn=judge_preexec,
        start_new_session=True,
    )


def _result(timed_out: bool, sig, elapsed: float, out: bytearray, err: bytearray,
            verdict: bytearray) -> ExecResult:  # fmt: skip
    """The verdict the tests' process wrote, or why there is none (a timeout, a signal)."""
    output = out.decode("utf-8", "replace")
    if timed_out or sig == signal.SIGXCPU:
        return ExecResult("timed_out", f"stopped after {elapsed:.1f}s", elapsed, output)
    try:
        v = json.loads(verdict.decode())
        status, message = v["status"], str(v["message"])
        assert status in ("passed", "failed", "error")
    except (ValueError, KeyError, TypeError, AssertionError):
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no verdict"]
        return ExecResult("error", f"test harness failed: {tail[0]}", elapsed, output)
    if status == "error" and "before finishing its tests" in message and sig is not None:
        name = signal.Signals(sig).name
        why = " (file size limit exceeded)" if name == "SIGXFSZ" else ""
        message = f"killed by {name}{why} before finishing its tests"
    return ExecResult(status, message, elapsed, output)


run_tests = run  # the name exported by lmtrain.eval


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError):
        pass


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def evaluate_pass_at_k(
    problems: Sequence[CodeProblem | Mapping[str, Any]],
    samples_per_problem: Mapping[str, Sequence[str]],
    ks: Sequence[int] = (1,),
    *,
    limits: ExecLimits | None = None,
    workers: int | None = None,
    allow: bool | None = None,
    isolation: str | None = None,
) -> dict[str, Any]:
    """Run every sample of every problem and return mean pass@k plus per-problem detail.

    ``samples_per_problem`` maps ``task_id`` to that problem's samples. A k larger than some
    problem's sample count is left out of the summary (and listed under ``skipped_ks``), as the
    unbiased estimator is undefined there. Programs run on a small thread pool; each thread
    just waits on its subprocess, so threads (not processes) are enough.
    """
    require_opt_in(allow)
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
        results = list(
            pool.map(
                lambda job: job[0].judge(job[1], limits, allow=allow, isolation=isolation), jobs
            )
        )

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
