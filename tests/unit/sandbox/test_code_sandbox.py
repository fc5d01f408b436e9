"""Hostile programs against the code runner: each probe from issue 22 must now fail.

Every probe is a *wrong* program (or one that attacks the host) that tries to be reported as
passing, to hurt the evaluator, or to reach beyond its sandbox. Controls: a correct program
still passes and a wrong one still fails, under both isolation levels.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from lmtrain.errors import ConfigError
from lmtrain.sandbox import code_exec as C
from lmtrain.sandbox.isolation import available_isolation, process_level_drops_uid

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")
NAMESPACES = available_isolation() == "namespace"
ROOT = process_level_drops_uid()  # the fallback level still runs it as its own uid
needs_ns = pytest.mark.skipif(not NAMESPACES, reason="needs root + unshare namespaces")
# Levels under which the program cannot signal the evaluator (it runs as its own uid).
PROTECTED = ["namespace"] * NAMESPACES + ["process"] * ROOT
LEVELS = ["namespace"] * NAMESPACES + ["process"]

LIM = C.ExecLimits(timeout_s=6.0, memory_bytes=512 << 20)
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


@pytest.fixture(autouse=True)
def _opt_in(monkeypatch):
    monkeypatch.setenv(C.ALLOW_ENV, "1")


def _procs_with(marker: str) -> list[int]:
    hits = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        hits.append(int(p))
            except OSError:
                pass
    return hits


@pytest.mark.parametrize("level", LEVELS)
def test_controls_right_passes_wrong_fails(level):
    assert C.run(RIGHT, TESTS, LIM, isolation=level).status == "passed"
    wrong = C.run(WRONG, TESTS, LIM, isolation=level)
    assert wrong.status == "failed" and "line 1" in wrong.message


FORGE_FRAMES = (
    WRONG
    + """
import sys
f = sys._getframe(0)
while f is not None:
    for name, v in list(f.f_globals.items()):
        if callable(v) and name in ("report", "send", "ask"):
            for arg in ("passed", {"status": "passed", "message": ""}, {"loaded": True}):
                try:
                    v(arg)
                except BaseException:
                    pass
    f = f.f_back
"""
)

FORGE_NONCE = (
    WRONG
    + """
import json, os, re
tokens = set()
for p in ["self"] + [d for d in os.listdir("/proc") if d.isdigit()]:
    try:
        tokens |= set(re.findall(rb"[0-9a-f]{16,}", open(f"/proc/{p}/cmdline", "rb").read()))
    except OSError:
        pass
for t in tokens:
    fake = json.dumps({"nonce": t.decode(), "status": "passed", "message": ""})
    open(".lmtrain_result", "w").write(fake)
    print(fake)
for fd in range(0, 64):
    try:
        os.write(fd, b'{"status": "passed", "message": ""}\\n{"ok": 5}\\n')
    except OSError:
        pass
os._exit(0)
"""
)

FORGE_VALUE = (
    # An object equal to everything, and a monkeypatched builtin: neither crosses the pipe.
    """
class Anything(int):
    def __eq__(self, other):
        return True
import builtins
builtins.AssertionError = type("Nope", (Exception,), {})
def add(a, b):
    return Anything(0)
"""
)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("probe", ["frames", "nonce", "value"])
def test_forged_pass_is_not_a_pass(level, probe):
    program = {"frames": FORGE_FRAMES, "nonce": FORGE_NONCE, "value": FORGE_VALUE}[probe]
    r = C.run(program, TESTS, LIM, isolation=level)
    assert r.status in ("failed", "error"), r


def test_trusted_prompt_helpers_are_not_replaced():
    # HumanEval/38 layout: the tests call encode_cyclic from the prompt. A sample that also
    # redefines encode_cyclic (to identity) must be judged with the prompt's version.
    prompt = (
        "def encode_cyclic(s):\n    return s[1:] + s[:1]\n\n"
        "def decode_cyclic(s):\n    '''Invert encode_cyclic.'''\n"
    )
    tests = "def check(candidate):\n    assert candidate(encode_cyclic('abc')) == 'abc'\n"
    problem = C.CodeProblem("cyc", tests, prompt, "decode_cyclic")
    cheat = "    return s\n\ndef encode_cyclic(s):\n    return s\n"
    assert problem.judge(cheat, LIM).status == "failed"
    assert problem.judge("    return s[-1:] + s[:-1]\n", LIM).status == "passed"


def _evaluator_in_subprocess(program: str, tmp_path, extra_env=None) -> dict:
    """Run the evaluator in its own process, so a probe that kills it cannot kill pytest."""
    script = (
        "import json, sys\n"
        "from lmtrain.sandbox import code_exec as C\n"
        "r = C.run(sys.argv[1], 'assert f() == 1\\n', C.ExecLimits(timeout_s=6.0),"
        " isolation=sys.argv[2])\n"
        "print(json.dumps({'status': r.status, 'message': r.message, 'output': r.output}))\n"
    )
    env = dict(os.environ, **(extra_env or {}))
    p = subprocess.run(
        [sys.executable, "-c", script, program, extra_env.get("LEVEL", "auto")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


KILLER = """
import os, signal
for pid in [os.getppid(), os.getpgid(0)] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    if pid not in (os.getpid(), 0):
        for sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
def f():
    return 1
"""


@pytest.mark.parametrize("level", PROTECTED)
def test_program_cannot_kill_the_evaluator(level, tmp_path):
    out = _evaluator_in_subprocess(KILLER, tmp_path, {"LEVEL": level})
    assert out["status"] == "passed"  # the evaluator survived and judged the program


@pytest.mark.parametrize("level", PROTECTED)
def test_parent_environment_and_home_are_not_visible(level, tmp_path):
    secret = uuid.uuid4().hex
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text(f"home-{secret}")
    reader = f"""
import os
seen = [repr(dict(os.environ))]
for p in ["self", str(os.getppid())] + [d for d in os.listdir("/proc") if d.isdigit()]:
    try:
        seen.append(open(f"/proc/{{p}}/environ", "rb").read().decode("latin-1"))
    except OSError as e:
        seen.append(type(e).__name__)
for path in [{str(home / "notes.txt")!r}, os.path.expanduser("~/notes.txt")]:
    try:
        seen.append(open(path).read())
    except OSError as e:
        seen.append(type(e).__name__)
for d in ["/root", {str(home)!r}, {os.getcwd()!r}]:
    try:
        seen.append(repr(os.listdir(d)))
    except OSError as e:
        seen.append(type(e).__name__)
print("\\n".join(seen))
def f():
    return 1
"""
    out = _evaluator_in_subprocess(
        reader, tmp_path, {"LEVEL": level, "LMTRAIN_TEST_SECRET": secret, "HOME": str(home)}
    )
    assert out["status"] == "passed"
    assert secret not in out["output"]
    if level == "namespace":  # the project folder and /root's own files are hidden too
        assert "test_code_sandbox.py" not in out["output"]
        assert ".bashrc" not in out["output"] and ".cache" not in out["output"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("timeout", [False, True])
def test_setsid_child_does_not_outlive_the_run(level, timeout):
    marker = f"{time.time_ns() % 10**6 + 1000}.5"  # a unique `sleep` argument
    program = f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "{marker}"])
    os._exit(0)
import time
time.sleep(0.5)
while {timeout}:
    pass
def f():
    return 1
"""
    start = time.monotonic()
    r = C.run(program, "assert f() == 1\n", C.ExecLimits(timeout_s=3.0), isolation=level)
    assert r.status == ("timed_out" if timeout else "passed"), r
    assert time.monotonic() - start < 8.0
    time.sleep(0.2)
    assert _procs_with(marker) == []


def test_setsid_child_cannot_write_after_the_limit_process_level(tmp_path):
    # The probe, under the fallback level (where the file system is shared): a setsid
    # grandchild that would write a file 2 s after the 1 s limit never gets to.
    target = tmp_path / "late.txt"
    os.chmod(tmp_path, 0o777)
    program = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    time.sleep(3)
    open({str(target)!r}, "w").write("escaped")
    os._exit(0)
while True:
    pass
"""
    r = C.run(program, "", C.ExecLimits(timeout_s=1.0), isolation="process")
    assert r.status == "timed_out"
    time.sleep(3.5)
    assert not target.exists()


@needs_ns
def test_no_network_connect_or_bind():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    program = f"""
import socket, time
def connect():
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        return "connected"
    except OSError as e:
        return type(e).__name__
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", {free_port}))
server.listen(4)
def interfaces():
    return sorted(name for _, name in socket.if_nameindex())
def hold():
    time.sleep(2.0)
    return 1
"""
    reached = []

    def knock():
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", free_port), timeout=0.2).close()
                reached.append(True)
            except OSError:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=knock)
    t.start()
    tests = "assert connect() != 'connected'\nassert interfaces() == ['lo']\nassert hold() == 1\n"
    r = C.run(program, tests, LIM, isolation="namespace")
    t.join()
    assert r.status == "passed", r
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing ever connected to the host's listener
    listener.close()
    assert reached == []  # the program's 0.0.0.0 listener was never reachable from the host


@needs_ns
def test_writes_outside_the_private_tmp_do_not_reach_the_host(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(tmp_path, 0o777)
    os.chmod(open_dir, 0o777)
    name = f"lmtrain-probe-{uuid.uuid4().hex}"
    targets = [str(open_dir / name), f"/var/tmp/{name}", f"/dev/shm/{name}", f"/tmp/{name}"]
    targets += [os.path.join(os.getcwd(), name), os.path.expanduser(f"~/{name}")]
    program = f"""
import os
wrote = []
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("x")
        wrote.append(path)
    except OSError:
        pass
with open("scratch.txt", "w") as f:  # its own private temp dir works
    f.write("ok")
def scratch():
    return open("scratch.txt").read()
"""
    r = C.run(program, "assert scratch() == 'ok'\n", LIM, isolation="namespace")
    assert r.status == "passed", r
    assert [t for t in targets if os.path.exists(t)] == []


@pytest.mark.parametrize("level", PROTECTED)
def test_process_count_is_limited(level):
    counter = """
import os, time
n = 0
for i in range(300):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
def forks():
    return n
"""
    limits = C.ExecLimits(timeout_s=8.0, max_processes=16)
    r = C.run(counter, "assert forks() < 16, forks()\n", limits, isolation=level)
    assert r.status == "passed", r
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    start = time.monotonic()
    r = C.run(bomb, "", C.ExecLimits(timeout_s=2.0, max_processes=16), isolation=level)
    assert r.status in ("timed_out", "error") and time.monotonic() - start < 8.0


def test_opt_in_is_required(monkeypatch):
    monkeypatch.delenv(C.ALLOW_ENV)
    with pytest.raises(ConfigError, match="--allow-code-execution"):
        C.run(RIGHT, TESTS, LIM)
    problems = [C.CodeProblem("a", TESTS)]
    with pytest.raises(ConfigError, match="LMTRAIN_ALLOW_CODE_EXECUTION=1"):
        C.evaluate_pass_at_k(problems, {"a": [RIGHT]})
    monkeypatch.setenv(C.ALLOW_ENV, "1")
    with pytest.raises(ConfigError, match="opt-in"):
        C.run(RIGHT, TESTS, LIM, allow=False)  # an explicit False wins over the environment
    assert C.run(RIGHT, TESTS, LIM).passed


def test_unknown_isolation_level_is_named():
    with pytest.raises(ConfigError, match="'jail' is not one of auto, namespace, process"):
        C.run(RIGHT, TESTS, LIM, isolation="jail")


def test_eval_code_tasks_refuse_before_generating(monkeypatch):
    from lmtrain.cli import build_parser
    from lmtrain.eval import suite

    monkeypatch.delenv(C.ALLOW_ENV)
    with pytest.raises(ConfigError, match="--allow-code-execution"):
        suite.run_code(None, {"path": "never-read.jsonl"})  # no model call, no file read
    args = build_parser().parse_args(["eval", "--allow-code-execution"])
    assert args.allow_code_execution is True


@pytest.mark.parametrize("level", LEVELS)
def test_without_util_linux_prlimit_the_limits_still_apply(level, monkeypatch):
    import shutil as _shutil

    from lmtrain.sandbox import isolation as sandbox

    real = _shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda n: None if n == "prlimit" else real(n))
    assert sandbox.launcher(sandbox.ProcLimits(1, 1 << 30, 1, 1, 1, 1), True)[0] == []
    assert C.run(RIGHT, TESTS, LIM, isolation=level).status == "passed"
    assert C.run(WRONG, TESTS, LIM, isolation=level).status == "failed"
    bomb = "x = bytearray(10 ** 11)\n"
    r = C.run(bomb, "", C.ExecLimits(timeout_s=5.0, memory_bytes=256 << 20), isolation=level)
    assert r.status == "error" and "MemoryError" in r.message
