"""The python sandbox (grpo_cli/tools/python.py): ordinary code, then hostile code. Each hostile call
must end as an error within its limits, and leave no process behind (checked after every test)."""

import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from grpo_cli.errors import UserError
from grpo_cli.tools import python as sandbox
from grpo_cli.tools.python import confinement, run_python

MARKER = "1000.4242"  # the argument of every `sleep` the tests start: found by scanning command lines
PROJECT_FILE = str(Path(sandbox.__file__).resolve().parents[1] / "__init__.py")
CONFINED = confinement()
LANDLOCK = CONFINED["landlock"] > 0


@pytest.fixture(autouse=True)
def nothing_left_running(monkeypatch):
    """Every sandbox directory a test used; afterwards no live process names one (forked children keep
    the launcher's command line) nor the sleep marker, and the directories are gone."""
    dirs = []
    original = sandbox.tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        dirs.append(original(*args, **kwargs))
        return dirs[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    yield
    deadline = time.monotonic() + 2.0
    while _leftovers(dirs) and time.monotonic() < deadline:
        time.sleep(0.05)  # a killed process may take a moment to be reaped
    assert not _leftovers(dirs)
    assert not any(os.path.exists(d) for d in dirs)


def _leftovers(dirs):
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and (MARKER in line or any(d in line for d in dirs)):
            found.append((proc.pid, line[:80]))
    return found


def _timed(code, timeout_s=2.0, **limits):
    start = time.monotonic()
    output, error = run_python(code, timeout_s, **limits)
    return output, error, time.monotonic() - start


# Ordinary code


def test_prints_and_the_math_stdlib():
    assert run_python("import math\nprint(math.factorial(10))\nprint('ok')", 5.0) == ("3628800\nok\n", None)


def test_an_exception_is_its_last_line_and_a_traceback_of_the_code_only():
    output, error = run_python("x = 1\ny = x / 0", 5.0)
    assert error == "ZeroDivisionError: division by zero"
    assert "line 2" in output and "main.py" in output
    assert "runpy" not in output and "_sandbox_child" not in output


def test_syntax_error_and_exit_codes():
    assert run_python("print(", 5.0)[1].startswith("SyntaxError")
    assert run_python("import sys\nprint(1)\nsys.exit(0)", 5.0) == ("1\n", None)
    assert run_python("import sys\nsys.exit(3)", 5.0)[1] == "SystemExit: 3"


def test_output_is_deterministic():
    code = "print({'apple', 'pear', 'fig', 'plum'})\nprint(hash('x'))"
    assert run_python(code, 5.0) == run_python(code, 5.0)


def test_a_fresh_directory_and_environment_per_call(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "hunter2")
    code = "import os\nopen('f.txt', 'w').write('hi')\nprint(sorted(os.environ), sorted(os.listdir('.')))"
    output, error = run_python(code, 5.0)
    assert error is None and "GRPO_TEST_SECRET" not in output and "PYTHONPATH" not in output
    assert "['f.txt', 'main.py']" in output  # nothing left by another call
    assert run_python("import grpo_cli", 5.0)[1] == "ModuleNotFoundError: No module named 'grpo_cli'"
    assert run_python("import numpy", 5.0)[1] == "ModuleNotFoundError: No module named 'numpy'"


def test_limits_must_be_positive():
    with pytest.raises(UserError):
        run_python("print(1)", 0)
    with pytest.raises(UserError):
        run_python("print(1)", 1.0, memory_mb=0)


# Hostile code


def test_an_infinite_loop_is_killed_at_the_wall_time():
    output, error, took = _timed("while True:\n    pass", timeout_s=1.0)
    assert error == "TimeoutError: ran past 1.0 s" and took < 2.5


def test_a_sleeping_call_is_killed_at_the_wall_time():
    _, error, took = _timed("import time\nprint('a')\ntime.sleep(60)", timeout_s=1.0)
    assert error == "TimeoutError: ran past 1.0 s" and took < 2.5


def test_a_fork_bomb_hits_the_process_limit():
    code = "import os\nwhile True:\n    os.fork()"
    _, error, took = _timed(code, timeout_s=2.0, memory_mb=256, max_processes=8)
    assert error is not None and took < 4.0
    if CONFINED["namespaces"] != "none":  # RLIMIT_NPROC of its own namespace: fork fails at once
        assert error.startswith("BlockingIOError")


def test_a_10_gb_allocation_is_a_memory_error():
    _, error, took = _timed("x = bytearray(10 * 1024**3)", memory_mb=256)
    assert error == "MemoryError (memory limit 256 MB)" and took < 3.0


def test_a_huge_print_is_a_memory_error_or_cut():
    output, error, took = _timed("print('x' * 10**9)", memory_mb=256)
    assert error.startswith("MemoryError") and len(output) <= sandbox.MAX_OUTPUT_CHARS and took < 3.0
    output, error, took = _timed("print('x' * 10**8)", memory_mb=1024, max_output_chars=1000)
    assert error == "killed: output over 1000 characters" and output == "x" * 1000 and took < 3.0


def test_a_print_loop_is_killed_at_the_output_limit():
    output, error, took = _timed("while True:\n    print('spam ' * 20)", max_output_chars=5000)
    assert error == "killed: output over 5000 characters" and len(output) == 5000 and took < 3.0


def test_a_segfault_is_reported_as_a_signal():
    _, error, took = _timed("import ctypes\nctypes.string_at(0)")
    assert error == "killed by signal SIGSEGV" and took < 3.0


def test_no_file_over_the_size_limit():
    _, error = run_python("open('big', 'wb').write(b'0' * 4 * 1024**2)", 5.0, max_file_mb=1)
    assert error == "OSError: [Errno 27] File too large"


def test_background_processes_do_not_outlive_the_call():
    code = f"import subprocess\nsubprocess.Popen(['sleep', '{MARKER}'], start_new_session=True)\nprint('started')"
    assert run_python(code, 5.0) == ("started\n", None)
    # the fixture checks that no `sleep 1000.4242` is left


def test_a_double_fork_does_not_outlive_the_call():
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(100)\n    os._exit(0)\n"
        "print('parent done')"
    )
    assert run_python(code, 5.0) == ("parent done\n", None)
    # the fixture checks that the grandchild (it keeps the launcher's command line) is gone


@pytest.mark.skipif(not LANDLOCK, reason="no Landlock: see test_reads_without_landlock")
def test_no_read_outside_the_stdlib_with_landlock():
    for path in ("/etc/passwd", PROJECT_FILE, os.path.expanduser("~/.bashrc")):
        output, error = run_python(f"print(open({path!r}).read()[:20])", 5.0)
        assert error is not None and error.split(":")[0] in ("PermissionError", "FileNotFoundError"), (path, error)


@pytest.mark.skipif(LANDLOCK, reason="Landlock enforces reads here")
def test_reads_without_landlock():
    # Without Landlock, what the user running the code may read, the code may read: docs say so.
    output, error = run_python("print(open('/etc/passwd').read()[:4])", 5.0)
    assert error is None and output


def test_no_write_outside_its_directory(tmp_path):
    targets = [f"/tmp/grpo_sandbox_probe_{os.getpid()}", str(Path(PROJECT_FILE).parent / "sandbox_probe.txt")]
    for target in targets:
        _, error = run_python(f"open({target!r}, 'w').write('pwned')", 5.0)
        assert error is not None and error.startswith("PermissionError"), (target, error)
        assert not os.path.exists(target)


def test_no_network():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        code = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('in')"
        output, error = run_python(code, 5.0)
        assert error is not None and "in" not in output.splitlines()
        with pytest.raises(socket.timeout):
            server.accept()  # nobody came


def test_the_cpu_limit_signal_is_reported():
    # the code lowers its own CPU limit below the wall time: the kernel's SIGXCPU reads as such
    code = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True:\n    pass"
    _, error, took = _timed(code, timeout_s=8.0)  # 1 s of CPU: generous wall time on a busy machine
    assert error == "killed: CPU time limit (SIGXCPU)" and took < 8.0


@pytest.mark.skipif(CONFINED["namespaces"] == "none", reason="RLIMIT_NPROC counts all the user's processes")
def test_max_processes_counts_the_code_itself():
    code = (
        "import os, time\nn = 1\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    print(n)"
    )
    assert run_python(code, 3.0, max_processes=3) == ("3\n", None)
    assert run_python(code, 3.0, max_processes=1) == ("1\n", None)


def test_calls_in_threads_do_not_mix():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_python(f"print({i} * 2)", 5.0), range(12)))
    assert results == [(f"{i * 2}\n", None) for i in range(12)]


def test_an_interrupted_call_leaves_nothing(monkeypatch):
    def interrupted(proc, timeout_s, max_bytes):
        time.sleep(0.5)  # the code has started its sleep by now
        raise KeyboardInterrupt

    monkeypatch.setattr(sandbox, "_read_output", interrupted)
    code = f"import subprocess\nsubprocess.Popen(['sleep', '{MARKER}'], start_new_session=True).wait()"
    with pytest.raises(KeyboardInterrupt):
        run_python(code, 5.0)
    # the fixture checks that neither the sandbox nor its sleep is left
