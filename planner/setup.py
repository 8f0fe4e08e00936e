"""From a validated `Spec` to the `Setup` the estimator needs, checking what only the model can tell.

Keys the user left out get defaults here, and every default is reported as a note so that
`peftplan estimate` never silently assumes. The checks that need the model's shape (rank versus
module widths, target module names, sequence length) live here too, as `Problem`s naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..schemas import Problem, Spec
from . import rules
from .catalog import Device
from .hyper import adapter_defaults
from .resolve import ResolvedModel
from .terms import AdapterSettings, Geometry, Setup

DEFAULT_SEQ_LEN = 2048
DEFAULTS = {
    "training.micro_batch_size": 1,
    "training.gradient_accumulation_steps": 1,
    "training.gradient_checkpointing": True,
    "training.optimizer": "adamw_torch",
    "method.target_modules": "all-linear",
}


@dataclass(frozen=True)
class Resolved:
    setup: Setup
    notes: tuple[str, ...]
    warnings: tuple[Problem, ...]
    precision: str  # bf16 | fp16 | fp32


def compute_dtype(spec: Spec, device: Device) -> tuple[str, str | None]:
    """The training dtype, and a note when it was chosen rather than given."""
    if spec.model.dtype != "auto":
        return spec.model.dtype, None
    if device.is_cpu:
        return "float32", "model.dtype auto: float32 on the CPU"
    if device.bf16:
        return "bfloat16", f"model.dtype auto: bfloat16 ({device.id} supports it)"
    return "float16", (f"model.dtype auto: float16 ({device.id} has no bf16; training uses fp16 autocast with loss "
                       "scaling)")


def _pick(value, key: str, notes: list[str], why: str = "default"):
    if value is not None:
        return value
    chosen = DEFAULTS[key]
    notes.append(f"{key} not set: {chosen!r} ({why})")
    return chosen


def _attention(value: str | None, model: ResolvedModel, notes: list[str]) -> str:
    if value is not None:
        return value
    chosen, why = rules.default_attention(model.shape)
    notes.append(f"training.attention not set: {chosen!r} ({why})")
    return chosen


def method_adapter(spec: Spec, method: str, parameters: int, base: AdapterSettings) -> AdapterSettings:
    """The adapter a method is estimated with: the spec's keys, the method's recipe for the rest (planner/hyper.py)."""
    m = spec.method
    rank, alpha, dropout = adapter_defaults(method, parameters, rules.scarce(spec.data.num_examples), m.rank)
    return replace(base, rank=m.rank or rank, alpha=m.alpha if m.alpha is not None else alpha,
                   dropout=m.dropout if m.dropout is not None else dropout)


def _recipe_note(spec: Spec, parameters: int) -> str:
    parts = []
    for methods in (("lora", "qlora"), ("dora", "qdora")):
        a = method_adapter(spec, methods[0], parameters, AdapterSettings())
        parts.append(f"{'/'.join(methods)}: r={a.rank}, α={a.alpha:g}, dropout {a.dropout:g}")
    return "; ".join(parts) + " (planner/hyper.py)"


def check_against_model(spec: Spec, model: ResolvedModel, setup: Setup) -> list[Problem]:
    """Problems only the model's shape reveals. Errors unless marked as warnings."""
    sh, problems = model.shape, []
    targets = spec.method.target_modules
    if isinstance(targets, list):
        known = set(sh.module_names)
        unknown = [t for t in targets if t not in known]
        if unknown:
            problems.append(Problem("method.target_modules", (
                f"{', '.join(repr(u) for u in unknown)} not in {model.name} ({sh.model_type}); "
                f"its linear modules are: {', '.join(sh.module_names)}")))
        fused = [t for t in targets if t in known and t not in {lin.name for lin in sh.linears if lin.is_linear}]
        if fused:
            problems.append(Problem("method.target_modules", (
                f"{', '.join(fused)} are fused MoE expert parameters, not linear modules: LoRA cannot target them"
                " by name here")))
    if spec.method.rank is not None and setup.targeted():
        narrowest = min(setup.targeted(), key=lambda lin: min(lin.in_features, lin.out_features))
        width = min(narrowest.in_features, narrowest.out_features)
        if spec.method.rank > width:
            problems.append(Problem("method.rank", (
                f"{spec.method.rank} is larger than the smallest targeted dimension ({narrowest.name}: "
                f"{narrowest.in_features}→{narrowest.out_features}); use a rank ≤ {width}")))
    seq = setup.geometry.seq_len
    if sh.max_positions and seq > sh.max_positions:
        problems.append(Problem("data.seq_len", (
            f"{seq} exceeds {model.name}'s max_position_embeddings ({sh.max_positions}); quality may degrade "
            "beyond the trained context (memory is estimated as asked)"), severity="warning"))
    attention = spec.training.attention
    if attention == "sdpa" and not sh.supports_sdpa:
        problems.append(Problem("training.attention", (
            f"{model.name} ({sh.model_type}) has no sdpa path in transformers, which refuses to load it with sdpa; "
            "use \"eager\" (or \"flash_attention_2\" where the flash-attn package is installed), or leave the key "
            "out")))
    return problems


def precision_problems(spec: Spec, device: Device) -> list[Problem]:
    """A dtype the device runs, but worse than the one it should (fp16 where bf16 is native)."""
    if spec.model.dtype == "float16" and device.bf16 and not device.is_cpu:
        return [Problem("model.dtype", (
            f"float16 on {device.id}, which supports bfloat16: fp16's 5-bit exponent overflows and underflows where "
            "bf16 (fp32's 8-bit exponent) does not, so training needs loss scaling and can still diverge; bfloat16 "
            "costs the same memory and time here (leave model.dtype = \"auto\")"), severity="warning")]
    return []


def build_setup(spec: Spec, model: ResolvedModel, device: Device) -> Resolved:
    notes: list[str] = list(model.notes)  # what resolving the model found (mirrors, variants, described shapes)
    t, m, d = spec.training, spec.method, spec.data
    dtype, dtype_note = compute_dtype(spec, device)
    if dtype_note:
        notes.append(dtype_note)
    seq = d.seq_len
    if seq is None:
        cap = model.shape.max_positions or DEFAULT_SEQ_LEN
        seq = min(DEFAULT_SEQ_LEN, cap)
        notes.append(f"data.seq_len not set: {seq} (2048, capped at the model's maximum)")
    packing = bool(d.packing)
    geometry = Geometry(
        micro_batch_size=_pick(t.micro_batch_size, "training.micro_batch_size", notes),
        seq_len=seq,
        gradient_checkpointing=_pick(t.gradient_checkpointing, "training.gradient_checkpointing", notes),
        gradient_accumulation_steps=_pick(t.gradient_accumulation_steps, "training.gradient_accumulation_steps", notes),
        attention=_attention(t.attention, model, notes),
        padded=not packing,
    )
    targets = m.target_modules if m.target_modules is not None else None
    adapter = method_adapter(spec, "lora", model.shape.parameters, AdapterSettings(
        target_modules=tuple(targets) if isinstance(targets, list) else _pick(targets, "method.target_modules", notes)))
    unset = [k for k in ("rank", "alpha", "dropout") if getattr(m, k) is None]
    if unset:
        notes.append(f"method.{'/'.join(unset)} not set: each method's recipe — "
                     f"{_recipe_note(spec, model.shape.parameters)}")
    if t.loss is None:
        notes.append("training.loss not set: 'chunked' (the head and the loss run a chunk of tokens at a time: never "
                     "tokens × vocabulary logits; 'full' is transformers' own loss)")
    setup = Setup(
        shape=model.shape,
        geometry=geometry,
        adapter=adapter,
        optimizer=_pick(t.optimizer, "training.optimizer", notes),
        dtype=dtype,
        device_kind=device.kind,
        loss=t.loss or "chunked",
        offload=bool(t.activation_offloading) and device.kind == "cuda",
    )
    precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    problems = check_against_model(spec, model, setup) + precision_problems(spec, device)
    if packing and geometry.attention == "flash_attention_2" and (t.micro_batch_size or 1) > 1:
        problems.append(Problem("training.micro_batch_size", f"{t.micro_batch_size} with data.packing = true under "
                                "training.attention = \"flash_attention_2\": transformers runs plain causal attention "
                                "over a batch of packed rows there (examples would attend to each other); set "
                                "micro_batch_size = 1, or attention = \"sdpa\" (a block-diagonal mask)"))
    if not model.shape.calibrated and not model.described:  # a described shape's note says it already
        problems.append(Problem("model.name", f"model_type {model.shape.model_type!r}: the activation formulas were "
                                "not checked against measured training steps of this architecture "
                                "(benchmarks/calibrate*.py); `peftplan estimate --exact` traces a step instead",
                                severity="warning"))
    if t.activation_offloading and device.kind != "cuda":
        problems.append(Problem("training.activation_offloading", "moves activations to host memory over PCIe: on "
                                "the CPU they are host memory already, so it is off here", severity="warning"))
    return Resolved(setup, tuple(notes), tuple(problems), precision)
