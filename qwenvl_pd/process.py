"""Child processes that do not outlive their parent, and ports for them (torch-free: `serve`
imports it)."""
import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no child outlives its role."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the process group still carries Ctrl-C


def terminate(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM (a role drains and exits), SIGKILL if it is still there after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
