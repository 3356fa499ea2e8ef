import pytest

from qwenvl_pd.model.tiny import ARCHS, make_tiny


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
