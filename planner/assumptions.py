"""What the bundled runtime does, written down once: every memory formula relies on these.

Each constant names the runtime behaviour it describes (see `runtime/model.py`) and how it was
established: by reading transformers 5.x / peft 0.21 / bitsandbytes 0.50 source and by counting
the tensors autograd saves in a real training step (`runtime/memprobe.py`). A change to how the
runtime loads or trains a model changes this file and the calibration data in the same commit.
"""

from __future__ import annotations

# --- Storage -------------------------------------------------------------------------------------
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Adapter weights (LoRA A/B, DoRA magnitude) are fp32 whatever the base dtype: peft's
# get_peft_model(autocast_adapter_dtype=True) upcasts bf16/fp16 adapters. Their gradients are fp32.
ADAPTER_BYTES = 4

# Training runs under autocast to the compute dtype (Trainer bf16=/fp16=True). Linear layers of the
# adapters therefore compute in 16-bit. peft would cast each adapted module's input to the adapter dtype
# (fp32) and autocast would cast it straight back, so that every adapted module saved its own 16-bit copy;
# the runtime turns that no-op round trip off in training (runtime/train.py keep_adapter_inputs_16bit): lora_A
# saves the 16-bit input itself, shared by the modules that read it (q/k/v, gate/up), and the backward makes
# no fp32 copies of the input gradients.
LORA_INPUTS_UNCAST = True

# Full fine-tuning keeps weights, gradients and optimizer state in the training dtype ("pure bf16",
# as torchtune's full-finetune recipes do). On fp16-only devices pure fp16 training is unstable and
# GradScaler refuses fp16 parameters, so there weights stay fp32 (master weights) under fp16 autocast.
FULL_FT_MASTER_FP32_WITH_FP16 = True

# FSDP2 through accelerate (fsdp2_prepare_model): with mixed precision on and no 4-bit weights, trainable
# parameters in 16-bit are upcast to fp32 before sharding, so full fine-tuning under FSDP keeps fp32
# sharded weights, gradients and AdamW state (16 bytes/param / N), and all-gathers in the compute dtype.
# Measured on CPU (benchmarks/calibrate_parallel.py): the static bytes are exactly twice the bf16 ones.
FSDP_UPCASTS_TRAINABLE = True

# 4-bit NF4 storage (bitsandbytes Params4bit): two weights per byte, one absmax per block of 64.
# Double quantization stores each absmax as uint8 plus one fp32 absmax per 256 absmax values,
# and every quantized tensor carries a 16-entry fp32 NF4 code, a 256-entry fp32 code for the
# nested absmax, and an fp32 offset. bitsandbytes.functional.quantize_4bit(blocksize=64).
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_PER_TENSOR_BYTES = 16 * 4 + 256 * 4 + 4

# transformers' 4-bit loading converts nn.Linear modules of the decoder only: the embeddings, the
# output head (modules_to_not_convert = the tied/output embeddings) and norms stay in the compute
# dtype. The runtime does not call peft's prepare_model_for_kbit_training, which would upcast all of
# them to fp32 (+2 bytes per embedding parameter).

# MoE under qlora/qdora (runtime/moe.py). transformers 5 stores routed experts as fused 3-D parameters
# (Mixtral, Qwen3-MoE, OLMoE, GraniteMoE: gate_up_proj [E, 2I, H], down_proj [E, H, I]; gpt-oss and
# Llama 4 transposed), which 4-bit loading leaves alone. The runtime quantizes them itself: each expert's
# matrix separately with bitsandbytes.functional.quantize_4bit (NF4, blocks of 64, double quantization),
# so per expert matrix n/2 packed bytes, n/64 uint8 absmax, 4 bytes per 256 absmax and an fp32 offset,
# plus one 16-entry and one 256-entry fp32 code per experts module. Routers and expert biases stay in
# the compute dtype; shared experts and dense MLPs are nn.Linear and so NF4 already. Each forward runs
# bitsandbytes.matmul_4bit per expert that receives tokens: the transient is one expert's de-quantized
# matrix (its backward de-quantizes it again; nothing 16-bit is saved), and each expert sees top_k / E
# of the tokens. lora/dora/full keep the experts in the compute dtype.
QUANTIZE_FUSED_EXPERTS = True
NF4_EXPERT_OFFSET_BYTES = 4  # fp32 offset of the double-quantized absmax, per expert matrix
NF4_EXPERTS_MODULE_BYTES = 16 * 4 + 256 * 4  # NF4 code and nested code, once per experts module
# Adapters: "all-linear" means the nn.Linear / Linear4bit modules (attention, shared experts, dense MLPs),
# never the fused experts or the router. peft >= 0.18 under transformers 5 would otherwise turn it into
# target_parameters on Mixtral / Qwen-MoE / OLMoE experts and routers (its v4-compatibility mapping),
# which NF4 experts do not have and which fail with lora_dropout > 0 (runtime/moe.py adapter_targets).
ALL_LINEAR_SKIPS_FUSED_EXPERTS = True

# --- Optimizer state (bytes per trainable parameter, in state dtype) ------------------------------
# torch.optim.AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype; bitsandbytes 8-bit AdamW
# keeps two uint8 states plus one fp32 absmax per block of 256 per state (blockwise quantization,
# Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"). Paged variants keep the same
# bytes in CUDA unified memory that can be evicted to the host under pressure: counted in full here.
OPTIMIZER_STATES = {
    "adamw_torch": ("param", 2),  # two states in the parameter dtype
    "paged_adamw_32bit": ("fp32", 2),
    "adamw_8bit": ("int8", 2),
    "paged_adamw_8bit": ("int8", 2),
    "sgd": ("param", 0),  # no momentum
}
BNB_8BIT_BLOCK = 256
# bitsandbytes keeps parameters with fewer than 4096 elements in 32-bit state (min_8bit_size).
BNB_MIN_8BIT_SIZE = 4096

# --- Activations ----------------------------------------------------------------------------------
# Gradient checkpointing: transformers' gradient_checkpointing_enable(use_reentrant=False) wraps each
# decoder layer; the layer's input (b x s x h, compute dtype) is kept and one layer is recomputed.
# Without a padding mask transformers' sdpa path passes GQA natively (use_gqa_in_sdpa): k and v are
# saved at num_kv_heads; with a mask (padded batches) repeat_kv materializes them at num_heads.
# The runtime packs or pads to seq_len; the estimator assumes a padding mask is present unless
# packing is on (worst case).
# Fused attention (sdpa flash/efficient kernels, flash_attention_2) saves q, k, v, the output and an
# fp32 log-sum-exp of b x heads x s; eager attention also saves the fp32 softmax (b x heads x s x s)
# and its 16-bit copy used by the value matmul.
# Dropout saves its mask: a bool (1 byte) on CUDA; on the CPU the mask has the input's dtype.
DROPOUT_MASK_BYTES = {"cuda": 1, "cpu": None}  # None: same as the dropped tensor

# Loss: transformers' ForCausalLMLoss upcasts logits to fp32 and calls cross_entropy
# (log_softmax + nll_loss). At the start of backward, the saved fp32 log-softmax output, the fp32
# gradient arriving from nll_loss and the fp32 gradient log_softmax_backward produces are alive
# together: 3 x 4 bytes per logit. The 16-bit logits are freed with the model outputs before backward.
LOGIT_FP32_COPIES_AT_PEAK = 3

# ... that is the `loss = "full"` path. By default (`loss = "chunked"`, runtime/loss.py) the head and the loss run
# together, LOSS_CHUNK tokens at a time: a chunk's logits in the compute dtype and in fp32, and the gradients
# (softmax - one-hot) computed in the same pass, so only the hidden states' gradient (tokens x hidden, in the hidden
# states' dtype) and, for a trainable head, an fp32 gradient accumulator (vocab x hidden) outlive the loss. The
# chunk is the largest power of two C with C x V x (4 + compute bytes) <= LOSS_CHUNK_BUDGET_BYTES, within
# [LOSS_CHUNK_MIN, LOSS_CHUNK_MAX] (runtime/loss.py's chunk_tokens; the same three numbers). Measured op by op on
# CPU (tests/runtime/test_loss.py); the standard path measured 12.07 x T x V (fp32) and 12.17 (bf16 autocast).
# On CUDA with liger-kernel installed (the [cuda] extra) Liger's fused kernel runs instead, with a smaller chunk of
# its own: the estimate keeps the PyTorch path's terms, an upper bound for it.
LOSS_CHUNK_BUDGET_BYTES = 256 * 2**20
LOSS_CHUNK_MIN = 16
LOSS_CHUNK_MAX = 4096

# Activation offloading (`activation_offloading = true`, runtime/offload.py, CUDA only, with gradient
# checkpointing): the checkpointed layer inputs go to pinned host memory during the forward pass on a side stream
# and come back one layer ahead in backward; at most OFFLOAD_LAYERS_ON_DEVICE of them are on the device at any
# moment (two in flight while copying out, the one in use and the one prefetched in backward). Host memory holds
# all of them, up to twice that in pinned blocks (torch rounds pinned allocations up to powers of two).
OFFLOAD_LAYERS_ON_DEVICE = 3

# Working memory of one decoder layer's backward pass (gradients of its intermediate tensors), in
# bytes per token per feature of the widest MLP gradient (i, or 2i for a fused gate/up). Measured on the CPU
# calibration tables (benchmarks/calibrate.py, 2026-11-30, fitted as the median |error| over 267 runs): ~4
# bytes/element for adapters with 16-bit inputs (LORA_INPUTS_UNCAST: the gradients stay 16-bit), ~3 for full
# fine-tuning; a gated MLP with the tanh-approximated GELU (Gemma) keeps ~3 more for its backward's temporaries.
# Under FSDP2 (accelerate, mixed precision: the adapters themselves cast to bf16 for the step) the two-rank CPU
# calibration fits ~4 as well (benchmarks/calibrate_parallel.py).
BACKWARD_WORKING_BYTES = {"adapter": 4, "adapter_plain_mlp": 4, "full": 3, "adapter_fsdp": 4}
BACKWARD_WORKING_EXTRA = {"gated_gelu": 3}

# --- Device overhead (device_total_bytes - peak_allocated_bytes) ----------------------------------
# CUDA context + cuBLAS/cuDNN workspaces as nvidia-smi shows them for a PyTorch process: about
# 0.5 GiB on recent GPUs (PyTorch forum / measured on A100 and H100 with torch 2.x), none on CPU.
CUDA_CONTEXT_BYTES = 512 * 2**20
# Caching allocator: reserved exceeds allocated by fragmentation; torch's own docs and published
# runs show reserved/allocated of 1.05-1.25 in steady training. We use a fraction of the peak.
# Generated launches set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (run.sh and train.py), which lets a
# segment grow in place instead of splitting blocks between differently sized tensors: PyTorch's CUDA memory notes
# describe it as the remedy for fragmentation with changing batch shapes. We keep 10% of the peak as the reserve:
# not lowered until GPU runs measure reserved - allocated under the setting (no device was lent to check it).
ALLOCATOR_RESERVE_FRACTION = 0.10
# Safety headroom the planner keeps free on the device when it decides whether a plan fits.
FIT_HEADROOM_FRACTION = 0.05
