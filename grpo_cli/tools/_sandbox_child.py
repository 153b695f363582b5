"""The trusted launcher of the python sandbox: it runs as ``python -s -P -S -c <this file's text> <config>``.

It confines itself (user, network and pid namespaces; Landlock; rlimits), then forks an init that forks
the worker running the model's code. Only the standard library is used: the project is not importable
here. Lines written to the report fd (``report_fd``): ``ns ...``/``landlock ...`` (what was enforced), ``error
<line>`` (the worker's exception), ``exit <code>`` / ``signal <number>`` (how the worker ended).
"""

import ctypes
import json
import os
import resource
import runpy
import signal
import sys
import traceback

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 38, 1, 4
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # the same on x86_64 and arm64
FS_READ = 1 << 0 | 1 << 2 | 1 << 3  # execute, read file, read dir
FS_FILE = 1 << 0 | 1 << 1 | 1 << 2  # what a rule on a single file may allow: execute, write, read
FS_ABI_BITS = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}  # how many access bits each Landlock ABI knows

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
REPORT = json.loads(sys.argv[1])["report_fd"]


def report(line):
    try:
        os.write(REPORT, (line.replace("\n", " ")[:400] + "\n").encode())
    except OSError:
        pass


def write_file(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as error:  # the namespace still holds; the ids show as 65534 (overflow) inside
        report(f"warning {path}: {error}")


def unshare():
    """New user + network (+ pid) namespaces: no network but a down loopback, and a process count of
    its own (RLIMIT_NPROC counts per user namespace since Linux 5.14). Returns what was unshared."""
    if not hasattr(LIBC, "unshare"):  # not Linux
        return ""
    uid, gid = os.getuid(), os.getgid()
    tries = ((CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID, "user,net,pid"), (CLONE_NEWUSER | CLONE_NEWNET, "user,net"))
    for flags, name in tries:
        if LIBC.unshare(flags) == 0:
            write_file("/proc/self/setgroups", "deny")
            write_file("/proc/self/uid_map", f"{uid} {uid} 1")  # the same ids inside: no capability after exec
            write_file("/proc/self/gid_map", f"{gid} {gid} 1")
            return name
    return ""


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(read_paths, write_paths, device_files):
    """Landlock: read and execute only beneath ``read_paths``, write only beneath ``write_paths``; with
    ABI 4+ no TCP bind/connect, with ABI 6+ no signal to a process outside the sandbox. Returns the ABI
    (0: not available)."""
    if not sys.platform.startswith("linux"):
        return 0
    abi = LIBC.syscall(SYS_CREATE_RULESET, None, 0, 1)
    if abi <= 0:
        return 0
    fs = (1 << FS_ABI_BITS.get(abi, 16)) - 1
    attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = LIBC.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return 0
    rules = [(p, FS_READ) for p in read_paths] + [(p, fs) for p in write_paths]
    rules += [(p, FS_FILE & ~1) for p in device_files]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            access &= FS_FILE
        rule = PathBeneath(access, fd)
        LIBC.syscall(SYS_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0)
        os.close(fd)
    LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    ok = LIBC.syscall(SYS_RESTRICT_SELF, ruleset, 0) == 0
    os.close(ruleset)
    return abi if ok else 0


def block_sockets():
    """Without a network namespace: refuse sockets at the Python level (not a boundary: ``_socket`` or
    ctypes get around it)."""
    import socket

    def refused(*args, **kwargs):
        raise PermissionError("network is disabled in the sandbox")

    socket.socket = socket.create_connection = socket.socketpair = refused


def limit(config):
    mb = 1024 * 1024
    cpu = max(1, int(config["cpu_s"] + 0.999))
    for name, value in (
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, config["file_mb"] * mb),
        (resource.RLIMIT_AS, config["memory_mb"] * mb),
        (resource.RLIMIT_NPROC, config["processes"] + 2),  # + this launcher and the init
        (resource.RLIMIT_CPU, cpu),
    ):
        hard = value + 1 if name == resource.RLIMIT_CPU else value  # SIGXCPU at the soft, SIGKILL at the hard
        current = resource.getrlimit(name)[1]
        if current != resource.RLIM_INFINITY:  # never above a hard limit set from outside
            value, hard = min(value, current), min(hard, current)
        resource.setrlimit(name, (value, hard))


def work(code_path):
    """The worker: run the model's code as ``__main__``; an exception prints its traceback (without
    these frames) and reports its last line."""
    try:
        runpy.run_path(code_path, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        if code is None or code == 0:
            os._exit(0)
        report(f"error SystemExit: {code}")
        os._exit(code if isinstance(code, int) else 1)
    except BaseException as error:  # noqa: BLE001 - any failure of the model's code is its result
        lines = traceback.format_exception(error)
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != code_path:
            tb = tb.tb_next  # skip runpy's frames
        text = "".join(traceback.format_exception(type(error), error, tb)) if tb else "".join(lines)
        sys.stdout.flush()
        sys.stderr.write(text)
        sys.stderr.flush()
        report("error " + (text.strip().splitlines() or [type(error).__name__])[-1])
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def init(code_path):
    """The sandbox's pid 1 (with a pid namespace): when it exits, the kernel kills every process left
    in the namespace, so nothing the code started outlives the call."""
    launcher = os.getppid()
    if hasattr(LIBC, "prctl"):
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the launcher killed: so is the sandbox
    if os.getppid() != launcher:
        os._exit(1)
    worker = os.fork()
    if worker == 0:
        work(code_path)
    while True:
        pid, status = os.waitpid(-1, 0)  # reap orphans too
        if pid == worker:
            break
    if os.WIFSIGNALED(status):
        report(f"signal {os.WTERMSIG(status)}")
        os._exit(128 + os.WTERMSIG(status))
    report(f"exit {os.WEXITSTATUS(status)}")
    os._exit(os.WEXITSTATUS(status))


PRELOAD = (
    "math cmath fractions decimal statistics random itertools functools operator collections heapq bisect re "
    "string json datetime numbers copy textwrap subprocess socket pkgutil"
).split()
"""Imported before dropping root: as nobody, the interpreter's own files may be unreadable."""


def drop_root(uid):
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if hasattr(LIBC, "prctl"):
        LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # changing uid made /proc/self root's: the id maps need it
    report(f"uid {uid}")


def main():
    config = json.loads(sys.argv[1])
    if config["drop_to"] is not None:
        drop_root(config["drop_to"])
    namespaces = unshare()
    report(f"ns {namespaces or 'none'}")
    if "net" not in namespaces:
        block_sockets()
    abi = landlock(config["read"], [config["dir"]], ["/dev/null", "/dev/zero", "/dev/urandom"])
    report(f"landlock {abi}")
    limit(config)
    child = os.fork()
    if child == 0:
        init(config["code"])
    _, status = os.waitpid(child, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


main()
