"""Measure memory the way `torch.cuda.max_memory_allocated()` would, on any device.

`LiveTensorBytes` is a TorchDispatchMode that records every tensor storage an op creates and
watches it with a weak reference, so `peak` is the largest total of live storage bytes seen
while the mode was active, on top of a `baseline` of storages that existed before (the model).
Storages resized in place (FSDP2 frees and re-allocates gathered parameters with
`untyped_storage().resize_`, which is not an op the mode sees) are followed by wrapping
`UntypedStorage.resize_` while the mode is active.
On CUDA, the allocator's own counters are used instead (`cuda_peak`).
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Peak live tensor bytes, counting each storage once (keyed by the storage itself, so fake tensors
    from FakeTensorMode, which all have data_ptr 0, are counted too)."""

    def __init__(self, baseline_tensors=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0
        for t in baseline_tensors:
            self._track(t)
        self.baseline = self.current
        self.peak = self.current

    def _free(self, key: int, _ref=None):
        nbytes = self.live.pop(key, 0)
        self._refs.pop(key, None)
        self.current -= nbytes

    def _track(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass (FSDP2's DTensor shards): count what it holds
            for name in t.__tensor_flatten__()[0]:
                self._track(getattr(t, name))
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without storage
            return
        self._track_storage(st)

    def _track_storage(self, st) -> None:
        ptr, nbytes = st._cdata, st.nbytes()
        if nbytes == 0 or ptr in self.live:
            return
        self.live[ptr] = nbytes
        self._refs[ptr] = weakref.ref(st, lambda r, k=ptr: self._free(k))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current

    def reset_peak(self):
        self.peak = self.current

    def _resized(self, st) -> None:
        key = st._cdata
        if key not in self.live:  # e.g. a buffer freed to 0 bytes before the mode began
            self._track_storage(st)
            return
        self.current += st.nbytes() - self.live[key]
        self.live[key] = st.nbytes()
        if self.current > self.peak:
            self.peak = self.current

    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_

        def tracked_resize(st, *args, **kwargs):
            out = resize(st, *args, **kwargs)
            self._resized(st)
            return out

        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def model_tensors(model) -> list[torch.Tensor]:
    """Every tensor the model holds: parameters, buffers and bitsandbytes quantization state."""
    out: list[torch.Tensor] = []
    for p in model.parameters():
        out.append(p.data)
    for b in model.buffers():
        out.append(b)
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        while qs is not None:
            for name in ("absmax", "code", "offset"):
                t = getattr(qs, name, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
            qs = getattr(qs, "state2", None)
    return out


def rss_high_water_reset() -> None:
    """Reset the process's peak RSS (VmHWM) on Linux."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_bytes(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


def rss_high_water_bytes() -> int | None:
    """Peak resident set size since the last rss_high_water_reset() (Linux)."""
    return _status_bytes("VmHWM")


def rss_bytes() -> int | None:
    return _status_bytes("VmRSS")
