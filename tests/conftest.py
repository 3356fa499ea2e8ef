import pytest

from qwenvl_pd.model.tiny import ARCHS, make_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny checkpoint per architecture, written once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch) for arch in ARCHS}
