"""The sandbox that runs model-written Python: one fresh, confined process per call.

:func:`run_python` starts ``python -s -P -S`` (no site-packages, no project, no inherited environment) in
a fresh temporary directory. The trusted launcher (``_sandbox_child.py``) confines itself before the
model's code runs: new user, network and pid namespaces where the kernel allows them, Landlock (reads
only beneath the standard library and system directories, writes only in its directory), and rlimits
(CPU time, address space, file size, processes, no core dumps). This side enforces the wall time and
the output size, and kills the whole process group (with a pid namespace: everything the code
started). docs/reliability.md, "Running model-written code", says what is a hard boundary and what is
best effort.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

from grpo_cli.errors import UserError

MEMORY_MB = 512
"""Address-space limit of the code's process (RLIMIT_AS)."""
MAX_OUTPUT_CHARS = 8192
"""Captured stdout+stderr; more kills the process (the observation cuts further, see base.py)."""
MAX_PROCESSES = 8
"""Processes and threads the code may run, itself included (RLIMIT_NPROC in its own user namespace)."""
MAX_FILE_MB = 16
"""Largest file the code may write (RLIMIT_FSIZE)."""
NOBODY = 65534
"""The uid and gid the code runs as when the caller is root (root ignores RLIMIT_NPROC)."""

_LAUNCHER = Path(__file__).with_name("_sandbox_child.py")
_NO_CWD = ("-P",) if sys.version_info >= (3, 11) else ()  # 3.10 puts the code's own directory on sys.path
_SIGNALS = {signal.SIGXCPU: "killed: CPU time limit (SIGXCPU)", signal.SIGXFSZ: "killed: file size limit (SIGXFSZ)"}


def run_python(
    code: str,
    timeout_s: float,
    *,
    memory_mb: int = MEMORY_MB,
    max_output_chars: int = MAX_OUTPUT_CHARS,
    max_processes: int = MAX_PROCESSES,
    max_file_mb: int = MAX_FILE_MB,
) -> Tuple[str, Optional[str]]:
    """Run ``code`` in a sandbox: its stdout+stderr (at most ``max_output_chars``) and a one-line error
    (``ZeroDivisionError: division by zero``, ``TimeoutError: ran past 2.0 s``, ``killed by signal
    SIGSEGV``, ...) or None. ``timeout_s`` bounds the wall time and, rounded up, the CPU time."""
    if os.name != "posix":
        raise UserError("run_python: the sandbox needs Linux (or, with fewer guarantees, macOS)")
    if timeout_s <= 0 or memory_mb <= 0 or max_output_chars <= 0 or max_processes <= 0 or max_file_mb <= 0:
        raise UserError("run_python: timeout_s, memory_mb, max_output_chars, max_processes and max_file_mb must be > 0")
    text, error, _ = _run(code, timeout_s, memory_mb, max_output_chars, max_processes, max_file_mb)
    return text, error


def confinement() -> dict:
    """What this machine enforces, from one trivial call: ``namespaces`` ("user,net,pid", "user,net"
    or "none"), ``landlock`` (the ABI, 0: none) and ``uid`` (set when root ran the code as nobody).
    Log it once; docs/reliability.md says what each missing piece leaves open."""
    _, _, report = _run("pass", 5.0, MEMORY_MB, MAX_OUTPUT_CHARS, MAX_PROCESSES, MAX_FILE_MB)
    landlock = int(report.get("landlock", 0))
    return {"namespaces": report.get("ns", "none"), "landlock": landlock, "uid": report.get("uid")}


def _run(code, timeout_s, memory_mb, max_output_chars, max_processes, max_file_mb):
    workdir = tempfile.mkdtemp(prefix="grpo_sandbox_")
    try:
        return _run_in(workdir, code, timeout_s, memory_mb, max_output_chars, max_processes, max_file_mb)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_in(workdir, code, timeout_s, memory_mb, max_output_chars, max_processes, max_file_mb):
    code_path = os.path.join(workdir, "main.py")
    Path(code_path).write_text(code, encoding="utf-8")
    config = dict(
        dir=workdir, code=code_path, cpu_s=timeout_s, memory_mb=memory_mb, processes=max_processes,
        file_mb=max_file_mb, read=_readable_paths(),
    )  # fmt: skip
    report_r, report_w = os.pipe()
    os.set_blocking(report_r, False)
    try:
        try:
            proc = _spawn(workdir, config, report_w)
        finally:
            os.close(report_w)
        try:
            output, over = _read_output(proc, timeout_s, max_output_chars)
        finally:
            _kill(proc)  # also when interrupted (KeyboardInterrupt): nothing outlives the call
        report = _read_report(report_r)
    finally:
        os.close(report_r)
    text = output.decode("utf-8", errors="replace")[:max_output_chars]
    return text, _error(proc.returncode, report, over, timeout_s, memory_mb, max_output_chars), report


def _spawn(workdir: str, config: dict, report_w: int) -> subprocess.Popen:
    """The launcher in a new session (its own process group), with a minimal environment. As root, the
    launcher becomes nobody before the code runs (root ignores RLIMIT_NPROC); it starts as root since
    the interpreter may sit where nobody cannot read (/root/.pyenv)."""
    drop = None
    if os.geteuid() == 0:
        drop = NOBODY
        os.chown(workdir, NOBODY, NOBODY)
        os.chown(config["code"], NOBODY, NOBODY)
    os.chmod(workdir, 0o700)
    config = dict(config, report_fd=report_w, drop_to=drop)
    # The whole environment: nothing inherited. -s -P -S is -I without -E, so that PYTHONHASHSEED (ours)
    # makes the output deterministic (set order).
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    env.update(PYTHONUTF8="1", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [_python(), "-s", *_NO_CWD, "-S", "-c", _launcher(), json.dumps(config)],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, pass_fds=(report_w,),
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _launcher() -> str:
    return _LAUNCHER.read_text()


def _python() -> str:
    """The interpreter itself, not a virtual environment's link to it (the sandbox cannot read a venv)."""
    return os.path.realpath(sys.executable)


def _readable_paths() -> list:
    """What the code may read and execute: the standard library, the interpreter, system binaries and
    libraries. Not /etc, /home, /root, /proc or the project."""
    paths = {sysconfig.get_paths()["stdlib"], sys.base_prefix}  # not platstdlib: in a venv, the venv
    paths |= {"/usr", "/bin", "/lib", "/lib64"}
    return sorted(os.path.realpath(p) for p in paths if os.path.exists(p))


def _read_output(proc: subprocess.Popen, timeout_s: float, max_bytes: int) -> Tuple[bytes, str]:
    """Read at most ``max_bytes`` of output until the launcher exits; returns the bytes and why it was
    stopped early ("timeout", "output") or ""."""
    deadline = time.monotonic() + timeout_s
    fd = proc.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        ready = poller.poll(min(left, 0.05) * 1000)  # poll, not select: a trainer's fds may be past 1024
        data = os.read(fd, 65536) if ready else b""
        chunks.append(data)
        size += len(data)
        if size > max_bytes:
            return b"".join(chunks)[:max_bytes], "output"
        if (ready and not data) or (not ready and _exited(proc)):
            return b"".join(chunks), ""  # end of output, or the launcher is gone and a leftover holds the pipe


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the launcher has exited, without reaping it: its pid, hence its process group id, stays
    ours until :func:`_kill` has killed the group."""
    if not hasattr(os, "waitid"):  # macOS: reaping is the only way to ask
        return proc.poll() is not None
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill(proc: subprocess.Popen) -> None:
    """Kill the launcher's process group (with a pid namespace its init dies too, and the kernel kills
    every process left in the namespace), then reap the launcher."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdout.close()


def _read_report(fd: int) -> dict:
    """The launcher's report lines, as {kind: text} (the last of each kind)."""
    data = b""
    while len(data) < 65536:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    report = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        kind, _, text = line.partition(" ")
        report[kind] = text
    return report


def _error(returncode, report, over, timeout_s, memory_mb, max_chars) -> Optional[str]:
    """The one-line error of a call, or None: the limits this side enforced first, then how the code
    ended."""
    if over == "timeout":
        return f"TimeoutError: ran past {timeout_s} s"
    if over == "output":
        return f"killed: output over {max_chars} characters"
    if "signal" in report:
        number = int(report["signal"])
        if number in _SIGNALS:
            return _SIGNALS[number]
        return f"killed by signal {signal.Signals(number).name}"
    if "error" in report:
        line = report["error"]
        return f"{line} (memory limit {memory_mb} MB)" if line.startswith("MemoryError") else line
    if "exit" not in report or returncode != 0:
        return f"killed: the sandbox exited with code {returncode}"
    return None
