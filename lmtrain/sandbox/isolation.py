"""Start one untrusted Python process in isolation, and kill its whole tree afterwards.

Two isolation levels:

``namespace`` (used when the host allows it: running as root with util-linux ``unshare`` and
``setpriv``). The program runs in fresh network, PID, mount, IPC and UTS namespaces:

- no network: the new network namespace has only a loopback interface, and it is down, so no
  connection can leave (not even to the host's ``localhost``) and nothing it binds is reachable;
- it runs as a throw-away uid (one per concurrent sandbox, no groups, no capabilities,
  ``no_new_privs``): it cannot signal, trace or read ``/proc`` of the evaluator or of other
  sandboxes, and ``RLIMIT_NPROC`` caps its process count (root is exempt from that limit);
- files: every world-writable directory (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``)
  is replaced by a private size-limited tmpfs that vanishes with the namespace, and every
  top-level directory that is not part of the operating system (``/root``, ``/home``, the
  project and data folders, ...) is hidden under an empty tmpfs; only the interpreter's own
  prefix is bound back, read-only. Its working directory is its private ``/tmp``;
- process tree: its parent inside the namespace is a shell acting as PID 1; when that shell
  ends or is killed, the kernel kills every process left in the namespace, including children
  that called ``setsid()``. A final sweep kills any process still owned by the sandbox's uid.

``process`` (the documented fallback when namespaces are unavailable, e.g. not root, or no
util-linux): a new session, a clean environment, a fresh temporary working directory, rlimits,
and a sweep at the end that kills every process carrying the sandbox's token in its
environment. When the evaluator is root it still drops the program to a throw-away uid (so
it cannot signal or read the evaluator, ``RLIMIT_NPROC`` applies, and the sweep goes by uid).
This level does NOT isolate the network or the file system, and without root the program can
signal and read ``/proc`` of every process of the same user (a determined program could then
interfere with the judge, so the verdict is only as safe as that user's other processes).
Frame walking, nonces, result files, fake output and early exits still cannot forge a pass
(see ``code_exec``). Run untrusted code at scale in a container or VM as well.
"""

from __future__ import annotations

import functools
import os
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from lmtrain.errors import ConfigError

__all__ = ["Sandbox", "available_isolation", "resolve_isolation", "spawn"]

ISOLATION_ENV = "LMTRAIN_CODE_EXEC_ISOLATION"
# Top-level directories that make up the operating system; everything else under / is hidden.
_SYSTEM_DIRS = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc",
                "sys", "run", "var", "tmp"}  # fmt: skip
_PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# Throw-away uids for sandboxes; one per concurrent run so sandboxes cannot reach each other.
_UID_BASE, _UID_COUNT = 61000, 256
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


@functools.lru_cache(maxsize=1)
def _namespaces_work() -> bool:
    if os.name != "posix" or os.geteuid() != 0:
        return False
    if not (shutil.which("unshare") and shutil.which("setpriv") and os.path.exists("/bin/sh")):
        return False
    try:
        r = subprocess.run(
            [
                "unshare",
                "--net",
                "--pid",
                "--mount",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "/bin/sh",
                "-c",
                "mount -t tmpfs -o size=1m tmpfs /tmp",
            ],  # fmt: skip
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def available_isolation() -> str:
    """The strongest isolation this host allows: ``namespace`` or ``process``."""
    return "namespace" if _namespaces_work() else "process"


_warned_fallback = False


def resolve_isolation(requested: str | None) -> str:
    """``auto`` (default, or ``$LMTRAIN_CODE_EXEC_ISOLATION``) picks the strongest level and
    warns once when only the ``process`` fallback is available."""
    global _warned_fallback
    level = requested or os.environ.get(ISOLATION_ENV) or "auto"
    if level not in ("auto", "namespace", "process"):
        raise ConfigError(
            f"code execution isolation {level!r} is not one of auto, namespace, process "
            f"(set by the isolation argument or ${ISOLATION_ENV})"
        )
    if level == "auto":
        level = available_isolation()
        if level == "process" and not _warned_fallback:
            _warned_fallback = True
            warnings.warn(
                "code execution: namespaces are unavailable here (needs root and util-linux "
                "unshare/setpriv); falling back to process isolation, which does not block the "
                "network or file access. Run untrusted code inside a container or VM.",
                RuntimeWarning,
                stacklevel=3,
            )
    elif level == "namespace" and not _namespaces_work():
        raise ConfigError(
            "code execution isolation 'namespace' needs root and util-linux unshare/setpriv "
            "with namespace support; use isolation='process' (weaker) or run in a container"
        )
    return level


@dataclass(frozen=True)
class ProcLimits:
    cpu_s: int
    memory_bytes: int
    max_file_bytes: int
    max_processes: int
    max_open_files: int
    tmp_bytes: int


def _rlimits(lim: ProcLimits, with_nproc: bool, drop_to: int | None = None):
    settings = [
        (resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1)),
        (resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes)),
        (resource.RLIMIT_FSIZE, (lim.max_file_bytes, lim.max_file_bytes)),
        (resource.RLIMIT_NOFILE, (lim.max_open_files, lim.max_open_files)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if with_nproc:
        settings.append((resource.RLIMIT_NPROC, (lim.max_processes, lim.max_processes)))

    # preexec_fn runs in the forked child before exec: only setrlimit with precomputed values,
    # so the window in which another thread's lock could deadlock it stays tiny.
    def preexec() -> None:
        for which, value in settings:
            try:
                resource.setrlimit(which, value)
            except (ValueError, OSError):
                pass  # e.g. RLIMIT_AS is unsupported on macOS; the other limits still apply.
        if drop_to is not None:
            os.setgroups([])
            os.setgid(drop_to)
            os.setuid(drop_to)

    return preexec


def launcher(lim: ProcLimits, with_nproc: bool, drop_to: int | None = None):
    """(argv prefix, preexec_fn) that apply ``lim`` (and a uid drop) to the command after it.

    util-linux ``prlimit``/``setpriv`` when present: then no ``preexec_fn`` is needed, so the
    evaluator (often a multithreaded JAX process) starts children without running Python code
    between fork and exec. Otherwise a ``preexec_fn`` that only calls setrlimit/setuid.
    """
    if shutil.which("prlimit") and (drop_to is None or shutil.which("setpriv")):
        prefix = [
            "prlimit",
            f"--cpu={lim.cpu_s}:{lim.cpu_s + 1}",
            f"--as={lim.memory_bytes}",
            f"--fsize={lim.max_file_bytes}",
            f"--nofile={lim.max_open_files}",
            "--core=0",
        ]
        if with_nproc:
            prefix.append(f"--nproc={lim.max_processes}")
        prefix.append("--")
        if drop_to is not None:
            prefix += [
                "setpriv", f"--reuid={drop_to}", f"--regid={drop_to}", "--clear-groups",
                "--no-new-privs", "--",
            ]  # fmt: skip
        return prefix, None
    return [], _rlimits(lim, with_nproc, drop_to)


def _hidden_dirs() -> list[str]:
    out = []
    for name in sorted(os.listdir("/")):
        path = "/" + name
        if name in _SYSTEM_DIRS or os.path.islink(path):
            continue
        if os.path.isdir(path) or os.path.isfile(path):
            out.append(path)
    return out


def _namespace_script(argv: Sequence[str], uid: int, lim: ProcLimits) -> str:
    """Shell run as PID 1 of the new namespaces (still root there): private tmpfs mounts, hide
    non-system directories, then run the program as ``uid`` and exit with its status."""
    q = shlex.quote
    lines = ["set -e"]
    for d in _PRIVATE_TMPFS:
        if os.path.isdir(d) and not os.path.islink(d):
            lines.append(f"mount -t tmpfs -o size={lim.tmp_bytes},mode=1777,nosuid,nodev tmpfs {d}")
    hidden = _hidden_dirs()
    # The interpreter (its prefix, and its binary's folder if it is a venv copy) stays visible,
    # read-only, even when it lives under a hidden folder such as /root or a project folder.
    keep = sorted(
        {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(sys.executable))}
    )
    keep = [k for k in keep if any(k == h or k.startswith(h + "/") for h in hidden)]
    keep = [k for k in keep if not any(k != o and k.startswith(o + "/") for o in keep)]
    for i, k in enumerate(keep):
        lines.append(f"mkdir /tmp/.keep{i} && mount --rbind {q(k)} /tmp/.keep{i}")
    for h in hidden:
        if os.path.isdir(h):
            lines.append(f"mount -t tmpfs -o size=1m,mode=0755,nosuid,nodev tmpfs {q(h)}")
        else:  # a top-level file (e.g. a container's info file): show it empty
            lines.append(f"mount --bind /dev/null {q(h)}")
    for i, k in enumerate(keep):
        lines += [
            f"mkdir -p {q(k)} && mount --rbind /tmp/.keep{i} {q(k)}",
            f"mount -o remount,bind,ro {q(k)}",
            f"umount -l /tmp/.keep{i} && rmdir /tmp/.keep{i}",
        ]
    cmd = " ".join(q(a) for a in argv)
    lines += [
        "cd /tmp",
        "set +e",
        # Not exec: this shell stays PID 1, so the program is an ordinary process the kernel
        # signals normally (RLIMIT_CPU's SIGXCPU included), and when the shell exits the whole
        # namespace is torn down.
        f"setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs "
        f"--bounding-set=-all --inh-caps=-all -- {cmd}",
        "exit $?",
    ]
    return "\n".join(lines)


def _clean_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


class Sandbox:
    """One running untrusted process. ``kill()`` ends it and everything it started."""

    def __init__(
        self,
        code: str,
        args: Sequence[str],
        lim: ProcLimits,
        *,
        isolation: str,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.isolation = isolation
        self.uid: int | None = None
        self._tmp: str | None = None
        self.token = secrets.token_hex(16)
        self._killed = False
        python = os.path.realpath(sys.executable)
        argv = [python, "-I", "-c", code, *args]
        if isolation == "namespace":
            self.uid = _take_uid()
            script = _namespace_script(argv, self.uid, lim)
            cmd = ["unshare", "--net", "--pid", "--mount", "--ipc", "--uts", "--fork",
                   "--kill-child", "--mount-proc", "--", "/bin/sh", "-c", script]  # fmt: skip
            env, cwd = _clean_env("/tmp"), "/"
            prefix, preexec = launcher(lim, with_nproc=True)
        else:
            self._tmp = tempfile.mkdtemp(prefix="lmtrain-exec-")
            cmd = argv
            env = _clean_env(self._tmp)
            env["LMTRAIN_SANDBOX_TOKEN"] = self.token  # lets the final sweep find escapees
            cwd = self._tmp
            if process_level_drops_uid():
                # Root without namespaces: still drop to a throw-away uid, so the program
                # cannot signal or read /proc of the evaluator, and RLIMIT_NPROC applies.
                self.uid = _take_uid()
                os.chown(self._tmp, self.uid, self.uid)
            prefix, preexec = launcher(lim, with_nproc=self.uid is not None, drop_to=self.uid)
        try:
            self.proc = subprocess.Popen(
                prefix + cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        except BaseException:
            self._release()
            raise

    def exit_signal(self) -> int | None:
        """The signal that ended the program, if it was killed by one (after ``wait``)."""
        rc = self.proc.returncode
        if rc is None:
            return None
        if rc < 0:
            return -rc
        if self.isolation == "namespace" and rc > 128:  # the PID-1 shell reports 128 + signal
            return rc - 128
        return None

    def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._sweep()
        self._release()

    def _sweep(self) -> None:
        """Kill whatever escaped the session: by its uid when it has its own, else by env token."""
        for _ in range(3):
            found = False
            for pid in _pids():
                if pid == os.getpid():
                    continue
                if self.uid is not None:
                    hit = _proc_uid(pid) == self.uid
                else:
                    hit = _proc_has_token(pid, self.token)
                if hit:
                    found = True
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            if not found:
                break

    def _release(self) -> None:
        if self.uid is not None:
            with _uid_lock:
                _uids_in_use.discard(self.uid)
            self.uid = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


@functools.lru_cache(maxsize=1)
def process_level_drops_uid() -> bool:
    """Whether the ``process`` level can run the program as a throw-away uid: the evaluator is
    root and every directory down to the interpreter is open to other users."""
    if os.name != "posix" or os.geteuid() != 0:
        return False
    path = os.path.realpath(sys.executable)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        st = os.stat("/".join(parts[:i]) or "/")
        if not st.st_mode & 0o001:
            return False
    return True


def spawn(code: str, args: Sequence[str], lim: ProcLimits, *, isolation: str, pass_fds=()):
    return Sandbox(code, args, lim, isolation=isolation, pass_fds=pass_fds)


def _take_uid() -> int:
    with _uid_lock:
        for uid in range(_UID_BASE, _UID_BASE + _UID_COUNT):
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise ConfigError(f"more than {_UID_COUNT} concurrent code sandboxes; lower the worker count")


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _proc_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _proc_has_token(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"LMTRAIN_SANDBOX_TOKEN={token}".encode() in f.read()
    except OSError:
        return False
