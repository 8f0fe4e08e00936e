"""Paged optimizer state: what fits, what must live in host memory, and what moving it costs.

bitsandbytes' paged optimizers keep their state in CUDA unified memory (cudaMallocManaged). When the
device runs short, the driver evicts pages to host memory and migrates them back when touched. The
optimizer reads and writes all of its state once per optimizer step, so whatever part of it does not fit
beside the weights and activations crosses the host link twice every step: in for the update, out again
when the next forward and backward need the room. Paging a spike away is free; paging that is required
to fit costs that traffic on every step, and the plan says so and counts it.

Host link, per direction, PCIe x16: Gen3 16, Gen4 32, Gen5 64 GB/s (the catalog's `pcie_gen`; its
`interconnect_gbps` for PCIe cards is the bidirectional figure, twice these). Migration under
oversubscription reaches a fraction of the link that varies "up to 100x depending on the platform,
oversubscription factor, and memory hints" (NVIDIA, "Improving GPU Memory Oversubscription Performance",
2021); bitsandbytes prefetches each state tensor before its update (streaming access, the favourable
case). Assumed: the full link at best, half of it in the middle, a quarter at worst.

On the CPU nothing is paged: the optimizer state is in the same memory as everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import assumptions as A
from .catalog import Device
from .memory import MemoryEstimate

# GB/s per direction of an x16 link (PCI-SIG: each generation doubles the rate; Gen6 is 64 GT/s per lane, 128 GB/s)
PCIE_X16_GBPS = {3: 16.0, 4: 32.0, 5: 64.0, 6: 128.0}
DEFAULT_PCIE_GEN = 4  # devices not in the catalog
LINK_EFFICIENCY = (1.0, 0.5, 0.25)  # best, middle, worst share of the link that page migration reaches


def host_link_gbps(device: Device) -> tuple[float, str]:
    """Bandwidth between the device and host memory, per direction, and where it comes from."""
    gen = device.pcie_gen
    if gen is None:
        return PCIE_X16_GBPS[DEFAULT_PCIE_GEN], f"PCIe Gen{DEFAULT_PCIE_GEN} x16 assumed"
    return PCIE_X16_GBPS[gen], f"PCIe Gen{gen} x16"


def usable_bytes(memory_bytes: int) -> int:
    """What a plan may use of a device's memory: all of it but the fit headroom (assumptions.FIT_HEADROOM_FRACTION)."""
    return int(memory_bytes * (1 - A.FIT_HEADROOM_FRACTION))


def evictable_bytes(est: MemoryEstimate, device: Device) -> int:
    """Bytes the device may hand to host memory: paged optimizer state, on a GPU only."""
    return 0 if device.is_cpu else est.evictable_bytes


def needed_bytes(est: MemoryEstimate, device: Device) -> int:
    """What must stay on the device: everything but the state that can be paged out."""
    return est.device_total_bytes - evictable_bytes(est, device)


def overflow_bytes(est: MemoryEstimate, device: Device, usable: int) -> int:
    """Paged state that cannot stay resident: it moves to host memory and back every optimizer step."""
    over = est.device_total_bytes - usable
    return max(0, min(over, evictable_bytes(est, device)))


@dataclass(frozen=True)
class PagingCost:
    bytes: int  # paged state that does not fit
    seconds_per_step: tuple[float, float, float]  # best, middle, worst
    link: str

    def total(self, steps: float) -> tuple[float, float, float]:
        return tuple(steps * s for s in self.seconds_per_step)


def paging_cost(est: MemoryEstimate, device: Device, usable: int) -> PagingCost | None:
    """What paging costs per optimizer step, or None when everything fits on the device."""
    over = overflow_bytes(est, device, usable)
    if over <= 0:
        return None
    gbps, link = host_link_gbps(device)
    per_step = tuple(2 * over / (gbps * 1e9 * eff) for eff in LINK_EFFICIENCY)
    return PagingCost(over, per_step, link)
