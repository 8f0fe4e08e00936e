"""FSDP on CPUs (gloo) through accelerate's own FSDP path.

accelerate 1.15 reads the FSDP launch settings (ACCELERATE_USE_FSDP and the FSDP_* variables) into a
FullyShardedDataParallelPlugin on every backend, but `AcceleratorState.__init__` switches to
`DistributedType.FSDP` only inside its branch for accelerator backends (MULTI_GPU/NPU/XPU/…); on CPUs the
state stays MULTI_CPU and the job silently runs as plain DDP. torch's FSDP2 (`fully_shard`) itself runs
over gloo on CPUs, so this finishes that switch exactly as accelerate does for GPUs (distributed type,
mixed precision on the plugin, the plugin on the state, the type on the process state) and leaves everything
else — wrapping, sharding, gathering the state dict, saving — to accelerate and torch. It is a no-op with CUDA or
without FSDP.
"""

from __future__ import annotations

import functools
import os


def allow_fsdp_on_cpu() -> bool:
    """Patch accelerate's state so an FSDP launch on CPUs is FSDP. Returns whether the patch is active."""
    import torch

    if torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, "_peftplan_cpu_fsdp", False):
        return True

    @functools.wraps(init)
    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate's own end

    patched._peftplan_cpu_fsdp = True
    AcceleratorState.__init__ = patched
    return True
