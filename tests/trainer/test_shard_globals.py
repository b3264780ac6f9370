"""DeepSpeed's checkpoint files are checked before DeepSpeed unpickles them, and loaded
with torch's weights-only loader: a payload on the volume is named and never runs.
The trainer's resume path through them: test_resume.py (a crafted shard) and every
test that resumes a real checkpoint."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from tests.trainer.test_rng import OpensAFile, save_legacy
from trainer import rng, shard_globals


def assert_deepspeed_files_load_with_weights_only(folder) -> None:
    """For a real checkpoint's folder: DEEPSPEED_GLOBALS covers what its configuration saves."""
    files = shard_globals.deepspeed_files(folder)
    assert files, f"no DeepSpeed file in {folder}"
    shard_globals.check(folder)
    with shard_globals.weights_only_loads():
        for path in files:
            torch.load(path, map_location="cpu", weights_only=False)


def deepspeed_like_state() -> dict:
    """What a ZeRO optimizer shard holds, each DEEPSPEED_GLOBALS class among it."""
    return {"optimizer_state_dict": {
        "loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0**16, 1000, min_scale=1, delayed_shift=2,
                                                                       consecutive_hysteresis=False),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [OrderedDict(w=fragment_address(numel=6, start=0))],
        "partition": [torch.arange(6.0)], "shapes": torch.Size([2, 3])}, "ds_version": "0.19.8"}


def test_deepspeed_s_own_objects_pass_the_check_and_load_with_weights_only_as_they_were(tmp_path):
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(deepspeed_like_state(), path)
    shard_globals.check(tmp_path)
    with shard_globals.weights_only_loads():
        loaded = torch.load(path, weights_only=False)["optimizer_state_dict"]  # as DeepSpeed calls it
    expected = deepspeed_like_state()["optimizer_state_dict"]
    assert vars(loaded["loss_scaler"]) == vars(expected["loss_scaler"])
    assert vars(loaded["dynamic"]) == vars(expected["dynamic"])
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"] == expected["param_slice_mappings"]
    assert torch.equal(loaded["partition"][0], expected["partition"][0])


def test_a_payload_in_a_shard_is_named_and_a_load_of_it_fails_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    shard = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({**deepspeed_like_state(), "payload": OpensAFile(marker)}, shard)
    with pytest.raises(shard_globals.UnexpectedGlobals, match=f"^{shard} names io.open, which DeepSpeed's own "):
        shard_globals.check(tmp_path)
    # A file swapped in after the check: DeepSpeed's weights_only=False is overridden,
    # even where the environment asked torch for full unpickling.
    monkeypatch.setenv(shard_globals.FORCE_NO_WEIGHTS_ONLY, "1")
    with pytest.raises(pickle.UnpicklingError, match="io.open"), shard_globals.weights_only_loads():
        torch.load(shard, weights_only=False)
    assert not marker.exists()
    assert os.environ[shard_globals.FORCE_NO_WEIGHTS_ONLY] == "1" and shard_globals.FORCE_WEIGHTS_ONLY not in os.environ


@pytest.mark.parametrize("how", ["legacy format", "pickle protocol 4", "zeros"])
def test_a_file_whose_pickle_cannot_be_read_as_opcodes_is_refused_unread(tmp_path, how):
    """The legacy (non-zip) format and protocol 4's STACK_GLOBAL could name globals the
    opcode reader does not see: such a file is refused, not trusted."""
    marker = tmp_path / "payload-ran"
    shard = tmp_path / "zero" / "unet.conv_in.weight" / "fp32.pt"  # a universal conversion's per-parameter file
    shard.parent.mkdir(parents=True)
    if how == "zeros":
        shard.write_bytes(b"\0" * 4096)
    else:
        options = {"legacy format": {"_use_new_zipfile_serialization": False},
                   "pickle protocol 4": {"pickle_protocol": 4}}
        torch.save({"payload": OpensAFile(marker)}, shard, **options[how])
    with pytest.raises(shard_globals.UnexpectedGlobals, match=f"^{shard} is not a checkpoint file as DeepSpeed writes"):
        shard_globals.check(tmp_path)
    assert not marker.exists()


def test_the_trainer_s_own_generator_files_are_left_to_rng_read(tmp_path):
    """A format-1 file names NumPy's globals, which rng.read allows for it alone; DeepSpeed never opens it."""
    save_legacy(tmp_path / rng.file_name(0))
    torch.save(deepspeed_like_state(), tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert shard_globals.deepspeed_files(tmp_path) == [tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    shard_globals.check(tmp_path)
