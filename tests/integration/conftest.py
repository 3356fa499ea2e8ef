import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def serve_cache(tmp_path_factory, tiny_dirs) -> Path:
    """An XDG_CACHE_HOME that already holds the tiny checkpoint `qwenvl-pd serve` builds when given
    no --model (make_tiny's defaults, as tiny_dirs' is): serve runs given it skip the build. One
    run keeps an empty cache, so that the build itself stays tested."""
    from qwenvl_pd.serve import TINY_ARCH
    cache = tmp_path_factory.mktemp("xdg")
    root = cache / "qwenvl-pd" / f"tiny-{TINY_ARCH}"
    shutil.copytree(tiny_dirs[TINY_ARCH], root)
    (root / ".complete").touch()
    return cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_dirs) -> str:
    """tiny_dirs' qwen2_5_vl checkpoint in a directory named "tiny", the model name the proxy's
    clients send; a copy, shared by the modules whose clusters serve it."""
    path = tmp_path_factory.mktemp("named") / "tiny"
    shutil.copytree(tiny_dirs["qwen2_5_vl"], path)
    return str(path)
