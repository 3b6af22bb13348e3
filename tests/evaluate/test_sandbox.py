"""The sandbox contains what model-written code can do wrong: an infinite loop, a fork bomb, a 10 GB
allocation, a write outside its directory, ``os.kill`` of its parent (this very test process), the
network, an output flood, an early ``sys.exit(0)`` — each a failure, all in one batch that carries on,
and a correct program still passes."""

from __future__ import annotations

import socket
import time

import pytest

from moelab.evaluate.sandbox import Limits, run_program, run_programs


def test_everything_bad_is_contained_and_the_harness_carries_on(tmp_path):
    outside = tmp_path / "outside.txt"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        programs = {
            "passes": ("def f(x):\n    return x + 1\nassert f(1) == 2\nopen('mine.txt', 'w').write('ok')\n"
                       "assert open('mine.txt').read() == 'ok'\n"),
            "assertion": "assert 1 == 2, 'wrong answer'\n",
            "infinite loop": "while True:\n    pass\n",
            "fork bomb": "import os\nwhile True:\n    os.fork()\n",
            "fork bomb (posix)": "import posix\nwhile True:\n    posix.fork()\n",
            "fork bomb (multiprocessing)": ("import multiprocessing\nwhile True:\n"
                                            "    multiprocessing.Process(target=print).start()\n"),
            "10 GB": "x = bytearray(10 * 1024 ** 3)\n",
            "write outside": f"open({str(outside)!r}, 'w').write('damage')\n",
            "os.open outside": f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)\n",
            "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
            "kill through ctypes": "import ctypes, os\nctypes.CDLL(None).kill(os.getppid(), 9)\n",
            "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
            "output flood": "while True:\n    print('x' * 10000)\n",
            "sys.exit(0)": "import sys\nsys.exit(0)\n",
            "remove files": "import shutil\nshutil.rmtree('/tmp')\n",
        }
        t0 = time.monotonic()
        results = run_programs(list(programs.values()), Limits(wall_s=3, cpu_s=3, output_bytes=100_000), workers=2)
        elapsed = time.monotonic() - t0
        server.settimeout(0.1)
        with pytest.raises(TimeoutError):
            server.accept()                                # nobody connected
    got = {name: r for name, r in zip(programs, results, strict=True)}
    assert got["passes"].passed and got["passes"].status == "passed"
    for name, r in got.items():
        if name != "passes":
            assert not r.passed, (name, r)
    assert got["infinite loop"].status == "timeout"
    assert got["10 GB"].status == "memory"
    assert got["output flood"].status == "output"
    assert "before its end" in got["sys.exit(0)"].detail
    assert not outside.exists()
    assert elapsed < 20                                    # the loop ends at the wall limit; the rest at once


def test_limits_are_configurable():
    r = run_program("import time\ntime.sleep(5)\n", Limits(wall_s=0.5))
    assert r.status == "timeout" and r.seconds < 3
    assert run_program("x = bytearray(50 * 1024 ** 2)\n", Limits(memory_bytes=2 << 30)).passed
