"""Shared fixtures: the real MedMNIST folder and small helpers around it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = "/work/shared/data/medmnist"


def _data_root() -> Path:
    """``$MEDCL_DATA_ROOT`` (relative paths are taken from the repository root) or the default."""
    path = Path(os.environ.get("MEDCL_DATA_ROOT") or DEFAULT_DATA_ROOT).expanduser()
    return path if path.is_absolute() else (REPO / path).resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding the real MedMNIST ``.npz`` files; skips the test when there is none."""
    path = _data_root()
    if not path.is_dir() or not any(path.glob("*.npz")):
        pytest.skip(
            f"no MedMNIST .npz files in {path}; set MEDCL_DATA_ROOT to the folder holding them "
            "(CI: ../shared/data/medmnist relative to the repository root)"
        )
    return path


@pytest.fixture(scope="session")
def medmnist_file(data_root: Path) -> Callable[[str], Path]:
    """``medmnist_file("breastmnist_64.npz")`` -> its path, or skip when that file is absent."""

    def need(name: str) -> Path:
        path = data_root / name
        if not path.is_file():
            pytest.skip(f"{name} is not in {data_root}")
        return path

    return need


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on 2 shared cores: one torch thread for a module's tests (restored after);
    a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch  # here, not at the top: some tests check what importing medcl pulls in

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
