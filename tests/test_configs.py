"""configs/: the example `accelerate launch --config_file` files parse as Accelerate reads them."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from tests.helpers import REPO_ROOT


@pytest.mark.parametrize(
    ("name", "distributed_type"),
    [
        ("multi_gpu", DistributedType.MULTI_GPU),
        ("deepspeed_zero2", DistributedType.DEEPSPEED),
        ("fsdp", DistributedType.FSDP),
    ],
)
def test_example_configs_are_what_their_names_say(name, distributed_type):
    config = load_config_from_file(str(REPO_ROOT / "configs" / f"{name}.yaml"))
    assert config.distributed_type == distributed_type
    assert config.num_processes == 8 and config.num_machines == 1 and not config.use_cpu
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
        # The scripts decide when gradients sync; DeepSpeed's own count must agree with the default flag.
        assert config.deepspeed_config["gradient_accumulation_steps"] == 1
    if name == "fsdp":
        # The Diffusers folders are written from a gathered state dict.
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "BasicTransformerBlock"
