"""Each rank's generator state in a checkpoint: restored exactly, and read without ever
running what a file on the shared volume might carry."""

from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import rng

CPU = torch.device("cpu")


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


def save_legacy(path: Path) -> Path:
    """What the trainer wrote before format 2: NumPy's state as np.random.get_state() gives it."""
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, path)
    return path


def as_written_by(path: Path, module: str) -> Path:
    """The same file with the ndarray's reconstructor under `module`: NumPy 2 writes
    numpy._core.multiarray, NumPy 1.x numpy.core.multiarray, whichever NumPy reads it."""
    renamed = path.with_name("renamed-" + path.name)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(renamed, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("/data.pkl"):
                written = re.search(rb"numpy\.(_)?core\.multiarray", data)
                assert written is not None
                data = data.replace(written.group(0), module.encode())
            target.writestr(name, data)
    return renamed


def test_the_saved_state_restores_every_generator_exactly_and_is_plain_data(tmp_path):
    seed_and_advance(7)
    rng.save(tmp_path / rng.file_name(0), CPU)
    expected = draws()
    seed_and_advance(8)
    assert draws() != expected
    rng.restore(rng.read(tmp_path / rng.file_name(0)), CPU)
    assert draws() == expected
    # Nothing in it needs an allowlist: torch's own safe loader reads it as it is.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / rng.file_name(0)) == []


@pytest.mark.parametrize("module", ["numpy._core.multiarray", "numpy.core.multiarray"], ids=["numpy-2", "numpy-1"])
def test_a_file_of_format_1_restores_through_the_numpy_allowlist_alone(tmp_path, module):
    seed_and_advance(3)
    path = as_written_by(save_legacy(tmp_path / rng.file_name(0)), module)
    expected = draws()
    seed_and_advance(4)
    rng.restore(rng.read(path, legacy=True), CPU)
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


def test_the_cuda_state_restored_is_the_ranks_own_whatever_the_layout(caplog):
    own, first, second = (torch.full((16,), value, dtype=torch.uint8) for value in (7, 1, 2))
    # Format 2: the saving rank's own device alone, restored on whichever device this rank runs.
    assert rng.cuda_state(own, torch.device("cuda", 3)) is own
    # Format 1: one state per device the saving pod saw; the rank's own at its local index.
    assert rng.cuda_state([first, second], torch.device("cuda", 1)) is second
    assert rng.cuda_state([first, second], torch.device("cuda")) is first
    assert caplog.records == []
    # Saved by pods with fewer devices each than this rank's index (4 x 4 resumed as 2 x 8):
    # nothing restored, nothing raised, so the checkpoint still loads.
    assert rng.cuda_state([first, second], torch.device("cuda", 5)) is None
    assert [record.getMessage() for record in caplog.records] == [
        "the checkpoint's CUDA generator states cover 2 device(s), this rank runs on device 5: its CUDA generator "
        "is not restored (the pods had fewer devices each when it was saved)"]
    # A CPU rank (or a file without CUDA state) restores none.
    assert rng.cuda_state(own, CPU) is None and rng.cuda_state(None, torch.device("cuda", 0)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU twin: the selection test above)")
def test_the_cuda_generator_of_the_ranks_device_restores_exactly_in_either_format(tmp_path):
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.manual_seed(11)
    rng.save(tmp_path / rng.file_name(0), device)
    saved = rng.read(tmp_path / rng.file_name(0))
    assert isinstance(saved["cuda"], torch.Tensor)
    expected = torch.rand(4, device=device).tolist()
    for cuda in (saved["cuda"], [saved["cuda"]] * (device.index + 1)):  # format 2, format 1
        torch.cuda.manual_seed(12)
        rng.restore({**saved, "cuda": cuda}, device)
        assert torch.rand(4, device=device).tolist() == expected
