"""checkpoints: finding checkpoint-N folders."""

import argparse

import pytest
import torch

from pu_diffusion.checkpoints import checkpoint_step, list_checkpoints, named_checkpoint, register_model_hooks
from pu_diffusion.errors import InputError


def test_checkpoint_names_resolve_in_one_place(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-x", "my-ckpt"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    args = argparse.Namespace(output_dir=str(tmp_path), resume_from_checkpoint="checkpoint-10")
    assert named_checkpoint(args) == tmp_path / "checkpoint-10"
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-2")
    assert checkpoint_step(named_checkpoint(args)) == 2
    for bad in ("checkpoint-7", "my-ckpt"):
        args.resume_from_checkpoint = bad
        with pytest.raises(InputError, match=f"--resume_from_checkpoint {bad}"):
            named_checkpoint(args)


@pytest.mark.parametrize("distributed_type", ["FSDP", "DEEPSPEED"])
def test_checkpoint_unet_is_saved_from_the_gathered_weights_when_sharded(distributed_type, tmp_path):
    """Under ZeRO-3 or FSDP the unwrapped UNet holds shards: checkpoint-N/unet must come from
    accelerator.get_state_dict, and only then."""
    from accelerate.utils import DistributedType
    from diffusers import UNet2DModel

    from tests.helpers import tiny_unet_kwargs
    from tests.sharded import ShardedAccelerator, zeroed_copy

    torch.manual_seed(0)
    trained = UNet2DModel(**tiny_unet_kwargs())
    accelerator = ShardedAccelerator(trained.state_dict(), DistributedType[distributed_type])
    register_model_hooks(accelerator, UNet2DModel)
    accelerator.save_hook([zeroed_copy(trained)], [], str(tmp_path / "sharded"))
    saved = UNet2DModel.from_pretrained(tmp_path / "sharded", subfolder="unet").state_dict()
    assert accelerator.gather_calls == 1
    assert all(torch.equal(saved[key], value) for key, value in trained.state_dict().items())

    accelerator.distributed_type = DistributedType.MULTI_GPU  # DDP: every process holds the whole model
    accelerator.save_hook([trained], [], str(tmp_path / "ddp"))
    assert accelerator.gather_calls == 1
    saved = UNet2DModel.from_pretrained(tmp_path / "ddp", subfolder="unet").state_dict()
    assert all(torch.equal(saved[key], value) for key, value in trained.state_dict().items())


def test_the_model_to_save_under_sharding_is_a_copy_with_the_ema_weights():
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    from pu_diffusion.loop import model_to_save
    from tests.helpers import tiny_unet_kwargs
    from tests.sharded import ShardedAccelerator, zeroed_copy

    torch.manual_seed(0)
    trained = UNet2DModel(**tiny_unet_kwargs())
    ema = EMAModel([parameter.detach() * 2 for parameter in trained.parameters()])
    accelerator = ShardedAccelerator(trained.state_dict())
    placeholder = zeroed_copy(trained)
    run = argparse.Namespace(model=placeholder, ema_model=None)
    with model_to_save(accelerator, run, accelerator.get_state_dict(placeholder)) as model:
        assert model is not placeholder
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters(), strict=True))
    run.ema_model = ema
    with model_to_save(accelerator, run, accelerator.get_state_dict(placeholder)) as model:
        assert all(torch.equal(a, 2 * b) for a, b in zip(model.parameters(), trained.parameters(), strict=True))
    assert all(not parameter.detach().any() for parameter in placeholder.parameters())
