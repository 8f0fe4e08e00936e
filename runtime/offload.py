"""Activation offloading: the tensors autograd saves in forward go to (pinned) host memory, and come back for backward.

    offload = OffloadActivations()            # CUDA: pinned host memory, one side stream; CPU: see below
    with offload:
        loss = model(**batch).loss            # saved tensors ≥ min_bytes are copied to the host as they are saved
    loss.backward()                           # ... and brought back, the next one prefetched while this one is used
    offload.stats                             # what moved, and how much device memory the offloader held

With gradient checkpointing (non-reentrant, as the runtime sets it) almost everything a layer saves is dropped and
recomputed; what autograd still saves under this context is each checkpointed layer's input (B·T·H in the compute
dtype, once per layer) plus the few tensors outside the layers (final norm, embedding indices). Those are what
move. Inside checkpointed layers the checkpoint's own hooks take precedence, so nothing is offloaded twice.

Forward: a tensor to offload is copied to a host buffer on a side stream (non-blocking, after the compute stream
has produced it). The device tensor is kept alive until its copy finishes, but at most `max_in_flight` of them:
packing one more makes the compute stream wait for the oldest copy and drops it. Backward: when autograd asks
for tensor k it is either still held from forward, already prefetched, or fetched now; then the next tensor
(the one saved just before k) is prefetched on the side stream while k is being used — double buffering.
Parameters (and views of them), tensor subclasses, tensors on other devices and anything under `min_bytes` stay
where they are. A tensor saved by several ops (e.g. a norm's input) is copied once. Under FSDP2 an unsharded
weight is a view of the all-gather buffer (a plain tensor): a matmul outside the checkpointed layers that saves it
would offload it too; with the chunked loss (runtime/loss.py) nothing that large is saved outside the layers.

What the planner should assume (L layers, checkpointed input X = B·T·H·p bytes each):
- device: the L·X bytes of checkpointed inputs are no longer resident; at most `max_in_flight` (forward) and
  `max_in_flight + prefetch` (backward) tensors are, plus the one layer being recomputed — so with the
  defaults the activation term drops from L·X to about 3·X, independent of L.
- host: L·X (plus the final norm's saved tensors) of pinned memory; torch's caching host allocator rounds each
  block up to a power of two, so budget up to 2× that, kept for reuse across steps.
- time: forward moves L·X device→host and backward L·X host→device. On the side stream they overlap the
  compute of the next (forward) / current (backward) layer; a layer whose compute is shorter than X / PCIe
  bandwidth waits for the copy. Expect no slowdown when per-layer compute ≥ X / bandwidth, else
  ≈ 2·L·X / bandwidth per step (PCIe 4.0 x16 ≈ 25 GB/s, PCIe 5.0 ≈ 50 GB/s effective with pinned memory).

On the CPU there is no device to free: `OffloadActivations(device="cpu")` runs the same bookkeeping with plain
CPU copies as the "host" and no streams (each copy completes at once), so tests can check which tensors move,
that gradients are unchanged, and the statistics. transformers' own `activation_checkpointing_enable(offload=True)`
(torch's `save_on_cpu`) does the copies on the compute stream, without overlap.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

MIN_OFFLOAD_BYTES = 1 << 20  # smaller tensors are not worth a transfer (a layer input is B·T·H·2 ≈ 16 MiB at 2k × 4k)


@dataclass
class OffloadStats:
    """Counts since the context was last entered (one forward and its backward)."""

    packed: int = 0  # distinct tensors copied to the host
    offloaded_bytes: int = 0  # their bytes
    kept: int = 0  # saved tensors left in place (small, parameters, other devices, subclasses)
    shared: int = 0  # saves of a tensor already offloaded (copied once)
    host_bytes: int = 0  # host copies alive now
    host_peak_bytes: int = 0
    in_flight_bytes: int = 0  # device bytes of offloaded tensors that the offloader holds now
    in_flight_peak_forward_bytes: int = 0
    in_flight_peak_backward_bytes: int = 0
    from_stash: int = 0  # unpacked while still held from forward (no transfer back)
    prefetched: int = 0  # unpacked after a prefetch
    fetched_on_demand: int = 0  # unpacked with a transfer the backward waited for
    records: list = field(default_factory=list)  # (shape, dtype, data_ptr) of each packed tensor, when record=True


@dataclass
class _Entry:
    host: torch.Tensor
    nbytes: int
    refs: int = 1  # saves still to be unpacked
    device_copy: torch.Tensor | None = None  # prefetched (or fetched and shared) device tensor
    event: object = None  # the side-stream event its prefetch recorded


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, device=None, *, min_bytes: int = MIN_OFFLOAD_BYTES, max_in_flight: int = 2, prefetch: int = 1,
                 pin_memory: bool | None = None, record: bool = False):
        if max_in_flight < 1 or prefetch < 0:
            raise ValueError("max_in_flight must be ≥ 1 and prefetch ≥ 0")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"  # CUDA: side stream, events, pinned host memory
        self.min_bytes, self.max_in_flight, self.prefetch = min_bytes, max_in_flight, prefetch
        self.pin_memory = self.cuda if pin_memory is None else pin_memory
        self.record = record
        self._side = None
        self._reset()
        super().__init__(self._pack, self._unpack)

    def _reset(self) -> None:
        self.stats = OffloadStats()
        self._entries: dict[int, _Entry] = {}
        self._stash: OrderedDict[int, tuple] = OrderedDict()  # id -> (device tensor, copy event), forward only
        self._shared: dict[tuple, tuple] = {}  # storage key -> (weakref to the storage, id)
        self._next_id = 0
        self._in_backward = False

    def __enter__(self):
        self._reset()  # a new step; host copies of an abandoned one are released
        super().__enter__()
        return self

    # ------------------------------------------------------------------------------------------- accounting

    def _hold(self, nbytes: int) -> None:
        s = self.stats
        s.in_flight_bytes += nbytes
        if self._in_backward:
            s.in_flight_peak_backward_bytes = max(s.in_flight_peak_backward_bytes, s.in_flight_bytes)
        else:
            s.in_flight_peak_forward_bytes = max(s.in_flight_peak_forward_bytes, s.in_flight_bytes)

    def _eligible(self, t: torch.Tensor) -> bool:
        if type(t) is not torch.Tensor or t.device.type != self.device.type:
            return False  # nn.Parameter (incl. bitsandbytes' Params4bit), DTensor, FakeTensor, other devices
        if t._base is not None and type(t._base) is not torch.Tensor:
            return False  # a view of a parameter (e.g. the transposed weight a matmul saves)
        if t.is_leaf and t.requires_grad:
            return False
        return t.numel() * t.element_size() >= self.min_bytes

    # ------------------------------------------------------------------------------------------- streams

    def _side_stream(self):
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _to_host(self, t: torch.Tensor):
        host = torch.empty_like(t, device="cpu", pin_memory=self.pin_memory)
        if not self.cuda:
            host.copy_(t)
            return host, None
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream(self.device))  # the copy reads t once it has been produced
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
            return host, side.record_event()

    def _to_device(self, host: torch.Tensor, *, ahead: bool):
        if not self.cuda:
            return host.clone(), None
        if not ahead:
            return host.to(self.device, non_blocking=True), None  # on the compute stream: ordered, no event
        with torch.cuda.stream(self._side_stream()):  # allocated and filled on the side stream
            dev = host.to(self.device, non_blocking=True)
            return dev, self._side.record_event()

    def _wait(self, event, dev: torch.Tensor | None = None) -> None:
        if not self.cuda or event is None or event is _DONE:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        if dev is not None:  # a side-stream allocation now used by the compute stream: free it after that use
            dev.record_stream(current)

    # ------------------------------------------------------------------------------------------- forward

    def _pack(self, t: torch.Tensor):
        if not self._eligible(t):
            self.stats.kept += 1
            return ("kept", t)
        st = t.untyped_storage()
        key = (st._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version)
        hit = self._shared.get(key)
        if hit is not None and hit[0]() is not None and hit[1] in self._entries:
            self._entries[hit[1]].refs += 1
            self.stats.shared += 1
            return hit[1]
        while len(self._stash) >= self.max_in_flight:  # double buffering: wait for the oldest copy, drop it
            _, (old, event) = self._stash.popitem(last=False)
            self._wait(event)
            self.stats.in_flight_bytes -= old.numel() * old.element_size()
        ident, self._next_id = self._next_id, self._next_id + 1
        nbytes = t.numel() * t.element_size()
        host, event = self._to_host(t)
        self._entries[ident] = _Entry(host, nbytes)
        self._stash[ident] = (t, event)
        self._shared[key] = (weakref.ref(st), ident)
        s = self.stats
        s.packed += 1
        s.offloaded_bytes += nbytes
        s.host_bytes += nbytes
        s.host_peak_bytes = max(s.host_peak_bytes, s.host_bytes)
        self._hold(nbytes)
        if self.record:
            s.records.append((tuple(t.shape), t.dtype, t.data_ptr()))
        return ident

    # ------------------------------------------------------------------------------------------- backward

    def _unpack(self, packed):
        if isinstance(packed, tuple):
            return packed[1]
        if not self._in_backward:
            self._in_backward = True
            try:  # clean up once this backward pass ends
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            except RuntimeError:  # unpacked outside a backward pass (e.g. saved_tensors read in forward)
                self._in_backward = False
        entry = self._entries.get(packed)
        if entry is None:
            raise RuntimeError("offloaded activation already released: backward through the same graph twice "
                               "(retain_graph) is not supported with activation offloading")
        if packed in self._stash:  # never left the device
            dev, event = self._stash.pop(packed)
            self._wait(event)  # its host copy must finish before autograd may free it
            self.stats.from_stash += 1
        elif entry.device_copy is not None:  # prefetched (or fetched for an earlier save of the same tensor)
            dev = entry.device_copy
            self._wait(entry.event, dev)
            self.stats.prefetched += entry.event is not None
            entry.event = None
        else:
            dev, _ = self._to_device(entry.host, ahead=False)
            self.stats.fetched_on_demand += 1
            self._hold(entry.nbytes)
        entry.refs -= 1
        if entry.refs > 0:
            entry.device_copy = dev  # another save of the same tensor is still to be unpacked: keep it
        else:
            self.stats.in_flight_bytes -= entry.nbytes  # handed to autograd
            self._release(packed)
        self._prefetch_before(packed)
        return dev

    def _release(self, ident: int) -> None:
        entry = self._entries.pop(ident)
        self.stats.host_bytes -= entry.nbytes

    def _prefetch_before(self, ident: int) -> None:
        """Start bringing back the tensors saved just before `ident` (backward meets them next)."""
        waiting = sum(1 for e in self._entries.values() if e.event is not None)
        for other in sorted((i for i in self._entries if i < ident), reverse=True):
            if waiting >= self.prefetch:
                return
            entry = self._entries[other]
            if other in self._stash or entry.device_copy is not None:
                continue
            entry.device_copy, entry.event = self._to_device(entry.host, ahead=True)
            if entry.event is None:  # CPU: the copy is done; mark it as prefetched for the bookkeeping
                entry.event = _DONE
            self._hold(entry.nbytes)
            waiting += 1

    def _end_backward(self) -> None:
        for ident in list(self._entries):  # saved but never needed (or a partial backward): release
            self._release(ident)
        self._stash.clear()
        self._shared.clear()
        self.stats.in_flight_bytes = 0
        self._in_backward = False


class _Done:
    """The event of a copy that has already completed (CPU)."""


_DONE = _Done()
