import pytest
import torch

from qwenvl_pd.model.tiny import ARCHS, make_tiny

# torch's own count (the cores), for the tests of the kernels' multi-threaded paths
DEFAULT_THREADS = torch.get_num_threads()


def pytest_configure(config):
    # one torch thread in the test process: the checkpoints are tiny, and on a 2-core runner that
    # also runs the nodes a test starts, a second OpenMP thread waits for its core at every op
    # (test_parity_transformers.py on a loaded machine: 343 s at 2 threads, 38 s at 1)
    torch.set_num_threads(1)


@pytest.fixture
def default_threads():
    """torch's default thread count for this test (the kernels split their work across threads)."""
    torch.set_num_threads(DEFAULT_THREADS)
    yield DEFAULT_THREADS
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny checkpoint per architecture, written once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch) for arch in ARCHS}


def _mp4(frames: int = 8, w: int = 64, h: int = 48) -> bytes:
    import io

    import av
    import numpy as np
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 20, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="session")
def mp4():
    """mp4(frames=8, w=64, h=48) -> the bytes of a small MPEG-4 video, frame i all gray i * 20."""
    return _mp4
