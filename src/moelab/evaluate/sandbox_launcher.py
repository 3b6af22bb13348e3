"""The launcher of :mod:`moelab.evaluate.sandbox`: run as ``python -I -S sandbox_launcher.py CONFIG_JSON`` in
a fresh process, it contains itself (limits, network, user, disabled functions), then runs the program.

Exit status: 0 only when the program ran to its end; 1 for an exception or ``sys.exit``; the kernel's
signal when a limit stopped it. Standard library only (no site-packages: ``-S``).
"""

import builtins
import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
NOBODY = 65534


def _unshare(flags: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _others_can_import() -> bool:
    """Whether an unprivileged user can read this interpreter's standard library (not so for a Python
    installed under /root): only then can the launcher drop root and still import."""
    d = os.path.dirname(os.path.realpath(os.__file__))
    if not os.stat(d).st_mode & 0o005 == 0o005:
        return False
    while True:
        if not os.stat(d).st_mode & 0o001:
            return False
        parent = os.path.dirname(d)
        if parent == d:
            return True
        d = parent


def contain(cfg: dict) -> None:
    cpu, mem, out, nproc = cfg["cpu_s"], cfg["memory"], cfg["output"], cfg["processes"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (out, out))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() == 0:
        _unshare(CLONE_NEWNET)                  # no interfaces but a down loopback
        if _others_can_import():
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)                   # the rest of the file system is read-only now
    else:
        _unshare(CLONE_NEWUSER | CLONE_NEWNET) or _unshare(CLONE_NEWNET)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.chdir(cfg["work"])
    _disable(cfg["work"])


def _disable(work: str) -> None:
    """Switch off what a test program never needs (here and in ``posix``, which ``os`` re-exports)."""
    import posix
    import shutil
    import subprocess

    names = ("kill", "killpg", "fork", "forkpty", "system", "execv", "execve", "execl", "execle", "execlp",
             "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
             "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir", "removedirs",
             "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown",
             "fchown", "lchown", "chroot", "setuid", "seteuid", "setsid", "putenv", "link", "symlink", "_exit",
             "popen", "pidfd_open")
    for mod in (os, posix):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, None)
    for name in ("rmtree", "move", "chown", "copytree"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"):
        sys.modules[name] = None                # import fails: no foreign calls, no raw fork_exec
    subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = None
    try:
        import socket

        socket.socket = socket.create_connection = None
    except ImportError:
        pass
    real_open, root = builtins.open, os.path.realpath(work)

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            path = os.path.realpath(os.fsdecode(file))
            if not (path == root or path.startswith(root + os.sep)):
                raise PermissionError(f"the sandbox writes only inside its directory, not {path}")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = guarded_open
    import io

    io.open = guarded_open
    real_os_open = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & writing:
            target = os.path.realpath(os.fsdecode(path))
            if not (target == root or target.startswith(root + os.sep)):
                raise PermissionError(f"the sandbox writes only inside its directory, not {target}")
        return real_os_open(path, flags, *args, **kwargs)

    os.open = posix.open = guarded_os_open


def main() -> int:
    cfg = json.loads(sys.argv[1])
    contain(cfg)
    with open(cfg["program"], encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv = ["program.py"]
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        print(f"SystemExit: the program exited ({e.code!r}) before its end", file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - any failure of the program is a failed sample
        traceback.print_exc(limit=3)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
