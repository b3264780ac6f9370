"""Each rank's generator state in a checkpoint: restored exactly, and read without ever
running what a file on the shared volume might carry."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import rng


def draws() -> tuple:
    """A few numbers from every generator rng.py saves; NumPy's Gaussian cache included."""
    return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()


def seed_and_advance(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    np.random.standard_normal()  # an odd number of Gaussians leaves one cached in NumPy's state
    draws()


class OpensAFile:
    """Unpickled in full, this opens (creates) `marker`: what a crafted file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def save_legacy(path: Path) -> None:
    """What the trainer wrote before format 2: NumPy's state as np.random.get_state() gives it."""
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, path)


def as_numpy_1_wrote_it(path: Path) -> Path:
    """The same file with NumPy 1.x's module path for the ndarray's reconstructor."""
    renamed = path.with_name("numpy1-" + path.name)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(renamed, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("/data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(name, data)
    return renamed


def test_the_saved_state_restores_every_generator_exactly_and_is_plain_data(tmp_path):
    seed_and_advance(7)
    rng.save(tmp_path / rng.file_name(0))
    expected = draws()
    seed_and_advance(8)
    assert draws() != expected
    rng.restore(rng.read(tmp_path / rng.file_name(0)))
    assert draws() == expected
    # Nothing in it needs an allowlist: torch's own safe loader reads it as it is.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / rng.file_name(0)) == []


@pytest.mark.parametrize("numpy_version", ["2", "1"])
def test_a_file_of_format_1_restores_through_the_numpy_allowlist_alone(tmp_path, numpy_version):
    seed_and_advance(3)
    path = tmp_path / rng.file_name(0)
    save_legacy(path)
    if numpy_version == "1":
        path = as_numpy_1_wrote_it(path)
    expected = draws()
    seed_and_advance(4)
    rng.restore(rng.read(path, legacy=True))
    assert draws() == expected
    # Only a format-1 manifest lets the NumPy globals in.
    with pytest.raises(rng.UnsafeRngFile, match=r"it names numpy\.(_)?core\.multiarray\._reconstruct"):
        rng.read(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["format-2", "format-1"])
def test_a_crafted_pickle_is_refused_unread(tmp_path, legacy):
    marker = tmp_path / "payload-ran"
    crafted = tmp_path / rng.file_name(0)
    torch.save({"python": OpensAFile(marker)}, crafted)
    with pytest.raises(rng.UnsafeRngFile) as refused:
        rng.read(crafted, legacy=legacy)
    assert not marker.exists()
    assert str(refused.value) == (
        f"{crafted} is not generator state as this trainer writes it (it names io.open); "
        "it was not unpickled, since that could run code someone put on the volume")
    # The payload is live: the full unpickler the trainer used before runs it.
    torch.load(crafted, weights_only=False)
    assert marker.exists()
