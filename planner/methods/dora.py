"""DoRA (Liu et al. 2024): LoRA plus a trainable magnitude per output; the weight norm is recomputed
every forward pass over the merged weight W + s·B·A (peft's DoraLinearLayer)."""

from __future__ import annotations

from .. import assumptions as A
from ..terms import Setup, Term
from .base import Tensors
from .lora import LoRA


class DoRA(LoRA):
    name = "dora"
    dora = True
    plain = "lora"

    def trainable_tensors(self, s: Setup) -> list[Tensors]:
        out = super().trainable_tensors(s)
        for lin in s.targeted():
            out.append(Tensors(f"{lin.name}.magnitude", lin.out_features, lin.layers(s.shape.num_layers), 4))
        return out

    def module_saved_bytes(self, s: Setup, lin, tokens: int) -> int:
        e = s.compute_bytes
        t = int(tokens * lin.active)
        saved = super().module_saved_bytes(s, lin, tokens)
        # (m/||W'|| - 1) * base_result and m/||W'|| * lora_result save both results; the norm and the
        # scale vectors are small (3 fp32 vectors of out).
        saved += 2 * e * t * lin.out_features + 12 * lin.out_features
        if s.adapter.dropout > 0:
            # with dropout, peft recomputes base_result = F.linear(dropout(x), W): that linear saves its
            # own 16-bit copy of the whole weight
            saved += e * lin.in_features * lin.out_features
        return saved

    def layer_transient_terms(self, s: Setup, tokens: int) -> list[Term]:
        return [self.norm_transient(s)]

    def norm_transient(self, s: Setup) -> Term:
        # get_lora_weight: an identity (in x in) in lora_A's dtype (a: fp32; the compute dtype under FSDP2 mixed
        # precision) and its 16-bit copy through lora_A. Then peft casts the lora weight and W to the input's dtype
        # and builds s·BA and W + s·BA. The runtime keeps adapter inputs 16-bit (assumptions.LORA_INPUTS_UNCAST).
        e, a = s.compute_bytes, s.adapter_compute_bytes
        # 16-bit inputs: the lora weight, s·BA and W + s·BA in the compute dtype, and the fp32 copy autocast makes
        # for the norm (linalg.norm runs in fp32): (3e + 4)·in·out; fp32 inputs: four fp32 buffers
        per = 3 * e + 4 if A.LORA_INPUTS_UNCAST and e != 4 else 4 * a
        if s.adapters_in_compute_dtype:  # FSDP2 mixed precision: the two-rank calibration fits no fp32 norm copy
            per = 3 * e

        def peak(lin):
            n_in, n_out = lin.in_features, lin.out_features
            return max((a + e) * n_in * n_in, e * n_in * n_in + per * n_in * n_out)

        lin = max(s.targeted(), key=peak, default=None)
        if lin is None:
            return Term("transient", "DoRA weight norm", 0, "no adapted modules")
        return Term("transient", f"DoRA weight-norm buffers ({lin.name}, largest)", peak(lin),
                    "max((a+e)·in², e·in² + c·in·out)", {"module": lin.name, "in": lin.in_features,
                                                         "out": lin.out_features, "e": e, "a": a, "c": per})


METHOD = DoRA()
