"""Child processes that do not outlive their parent (torch-free: `serve` imports it)."""
import signal


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no child outlives its role."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the process group still carries Ctrl-C
