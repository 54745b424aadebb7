"""A stand-in for Accelerate under DeepSpeed ZeRO-3 or FSDP, for the save paths these CPU machines cannot launch."""

import torch
from accelerate.utils import DistributedType


class ShardedAccelerator:
    """The prepared model's own tensors are placeholders (zeros here, shards for real); ``get_state_dict``
    returns the gathered weights, and counts how often it was asked."""

    def __init__(self, gathered: dict, distributed_type=DistributedType.FSDP):
        self.gathered = gathered
        self.distributed_type = distributed_type
        self.is_main_process = True
        self.gather_calls = 0
        self.save_hook = None

    def unwrap_model(self, model):
        return model

    def get_state_dict(self, model):
        self.gather_calls += 1
        return self.gathered

    def register_save_state_pre_hook(self, hook):
        self.save_hook = hook

    def register_load_state_pre_hook(self, hook):
        pass


def zeroed_copy(model):
    """``model``'s architecture with every weight zero: what the unwrapped model holds of a sharded one here."""
    placeholder = type(model).from_config(model.config)
    with torch.no_grad():
        for parameter in placeholder.parameters():
            parameter.zero_()
    return placeholder
