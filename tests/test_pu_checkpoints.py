"""pu_checkpoints: finding checkpoint-N folders."""

import argparse

import pytest

import pu_checkpoints
from pu_data import InputError


def test_checkpoint_names_resolve_in_one_place(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-x", "my-ckpt"):
        (tmp_path / name).mkdir()
    assert [p.name for p in pu_checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    args = argparse.Namespace(output_dir=str(tmp_path), resume_from_checkpoint="checkpoint-10")
    assert pu_checkpoints.named_checkpoint(args) == tmp_path / "checkpoint-10"
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-2")
    assert pu_checkpoints.checkpoint_step(pu_checkpoints.named_checkpoint(args)) == 2
    for bad in ("checkpoint-7", "my-ckpt"):
        args.resume_from_checkpoint = bad
        with pytest.raises(InputError, match=f"--resume_from_checkpoint {bad}"):
            pu_checkpoints.named_checkpoint(args)
