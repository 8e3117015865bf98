import pytest

from omx.datasets._her2st import _find_her2st_dir


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when torch sees no CUDA device."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch sees none")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def her2st_dir():
    """The her2st study folder (../shared/data/her2st or $OMX_HER2ST_DIR); real-data tests skip without it."""
    try:
        root = _find_her2st_dir()
    except FileNotFoundError as err:
        pytest.skip(f"her2st data not usable: {err}")
    if root is None:
        pytest.skip("her2st data not found (../shared/data/her2st or $OMX_HER2ST_DIR); real-data tests skipped.")
    return root
