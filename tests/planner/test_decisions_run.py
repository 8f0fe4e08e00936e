"""The run `peftplan plan --json` predicts, pinned by hand: micro-batch × accumulation × devices, steps per epoch,
the tokens computed (padding, packing), the FLOPs per token of each method, the memory-bound terms, communication
across nodes, and the cost of every device the plan uses.

Every expected number is arithmetic written in the test from the model's config.json shapes (the catalog's
Llama 3.x entries, restated below), the runtime's behaviour (Trainer steps, the collator's padding, pack()) and the
rule's source; none is read back from the planner. The plans go through `plan_spec` and the JSON `plan --json`
prints (`plan_json`). Hyperparameters and method choices are in test_decisions.py.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from peftplan.planner.choose import plan_spec
from peftplan.planner.plan_report import plan_json
from peftplan.schemas import spec_from_dict

ROOT = Path(__file__).resolve().parents[2]


def plan(model: str, hardware: dict, data: dict, lengths: dict | None = None, **tables) -> dict:
    s = spec_from_dict({"model": {"name": model}, "hardware": hardware, "data": data, **tables})
    return plan_json(plan_spec(s, lengths=lengths))


# --- batch geometry, steps and cost across devices and nodes ---------------------------------------------------------
# Llama 3.1 8B LoRA, 100,000 examples of 1,024 tokens (no avg_tokens: every row full), 1 epoch (≥ 100,000 examples).
# Held out: 1,000 (10%, at most 1,000) → 99,000 train. Effective batch: 128 (100,000 / 128 = 781 ≥ 400 steps).
# Accumulation = ceil(128 / (micro-batch × devices)). Steps (Trainer, accelerate's even batches): batches per
# device = ceil(ceil(99,000 / micro-batch) / devices), steps = ceil(batches / accumulation). Cost: hours × the
# price of one device-hour (hardware.price_per_hour = 2.0 here) × the devices the plan uses.
@pytest.mark.parametrize("count,nodes,parallelism,mb,devices,accumulation,steps", [
    (1, 1, "auto", 4, 1, 32, 774),     # 128/4 = 32; ceil(99,000/4) = 24,750 batches; ceil(24,750/32) = 774
    (2, 1, "ddp", 4, 2, 16, 774),      # 128/(4·2) = 16; ceil(24,750/2) = 12,375; ceil(12,375/16) = 774
    (8, 1, "ddp", 2, 8, 8, 774),       # 128/(2·8) = 8; ceil(49,500/8) = 6,188; ceil(6,188/8) = 774
    (8, 2, "ddp", 2, 16, 4, 774),      # 128/(2·16) = 4; ceil(49,500/16) = 3,094; ceil(3,094/4) = 774
    (8, 1, "fsdp", 4, 8, 4, 774),      # 128/(4·8) = 4; ceil(24,750/8) = 3,094; ceil(3,094/4) = 774
    (8, 1, "single", 4, 1, 32, 774),   # one of the eight devices: only it is used, and paid for
])
def test_accumulation_steps_and_cost_across_devices(count, nodes, parallelism, mb, devices, accumulation, steps):
    out = plan("meta-llama/Llama-3.1-8B", {"gpu": "A100-80GB", "count": count, "nodes": nodes, "price_per_hour": 2.0},
               {"num_examples": 100_000, "seq_len": 1024}, method={"name": "lora"},
               training={"micro_batch_size": mb, "parallelism": parallelism})
    c = out["chosen"]
    g = c["geometry"]
    assert (c["devices"], g["micro_batch_size"], g["gradient_accumulation_steps"]) == (devices, mb, accumulation)
    assert g["effective_batch_size"] == 128 and c["hyperparameters"]["effective_batch_size"] == 128
    assert c["steps_per_epoch"] == steps and c["time"]["optimizer_steps"] == steps  # one epoch
    assert c["time"]["tokens"] == c["time"]["useful_tokens"] == 99_000 * 1024  # over all devices
    hours = c["time"]["seconds"] / 3600
    assert c["cost_usd"] == pytest.approx(hours * 2.0 * devices, rel=1e-3, abs=0.01)


# Whole sequences per device, and exactly the batch the plan states: the rule's batch (8 below 6,400 examples, 128 from
# 51,200) is split into whole sequences per device, rounded up to a multiple of the largest power of two (≤ 8) not
# above a quarter of the share so that micro-batches divide it (planner/hyper.py per_device_share), and micro-batch ×
# accumulation × devices is that batch exactly (planner/choose.py _geometries keeps micro-batches dividing the share).
@pytest.mark.parametrize("n,count,batch", [
    (300, 5, 10),        # 8 → 2 per device (quarter 0.5: quantum 1) → 10
    (300, 3, 9),         # 8 → 3 per device → 9
    (100_000, 8, 128),   # 16 per device (quarter 4: a multiple of 4 already) → 128
    (100_000, 3, 144),   # 128 → 43 per device; quarter 10.75: quantum 8 → 48 → 144 (43 only divides by 1)
    (100_000, 6, 144),   # 128 → 22 per device; quarter 5.5: quantum 4 → 24 → 144
])
def test_effective_batch_is_the_rules_in_whole_sequences_per_device(n, count, batch):
    out = plan("meta-llama/Llama-3.2-1B", {"gpu": "H100-SXM", "count": count}, {"num_examples": n, "seq_len": 512},
               method={"name": "lora"}, training={"parallelism": "ddp"})
    c = out["chosen"]
    g = c["geometry"]
    assert c["devices"] == count
    assert g["micro_batch_size"] * g["gradient_accumulation_steps"] * count == batch == g["effective_batch_size"]
    if count == 5:  # 2 sequences per device fit one micro-batch of a 1B model: no accumulation needed
        assert (g["micro_batch_size"], g["gradient_accumulation_steps"]) == (2, 1)


def test_the_70b_8xa100_example_pays_for_eight_devices():
    # examples/llama-70b-8x-a100.toml: 70B in 16-bit (131 GiB of weights) is sharded over 8 A100s at $1.79 per
    # device-hour (gpus.toml); the bill is hours × 1.79 × 8, and the effective batch 128 (100,000 examples) is
    # micro-batch × accumulation × 8
    out = plan("meta-llama/Llama-3.1-70B", {"gpu": "A100-80GB", "count": 8},
               {"num_examples": 100_000, "seq_len": 4096, "avg_tokens": 1500})
    c = out["chosen"]
    g = c["geometry"]
    assert c["devices"] == 8 and c["parallelism"] in ("fsdp", "deepspeed-zero3")
    assert g["micro_batch_size"] * g["gradient_accumulation_steps"] * 8 == 128 == g["effective_batch_size"]
    assert c["cost_usd"] == pytest.approx(c["time"]["seconds"] / 3600 * 1.79 * 8, rel=1e-3, abs=0.01)


# --- tokens: padding and packing --------------------------------------------------------------------------------------
# 2,000 examples, half of 100 tokens and half of 300 (a measured histogram, as `plan` passes it when it read the data):
# 200 held out (10%) → 1,800 train, mean 200 tokens; 3 epochs (< 10,000 examples); effective batch 8.
LENGTHS = {100: 1_000, 300: 1_000}


@pytest.mark.parametrize("mb,packing,tokens,steps", [
    # padded to the longest of each micro-batch of 2: E[max] = 300·(1 − ½²) + 100·½² = 250; 900 batches per epoch
    # × 2 rows × 250 = 450,000 positions; × 3 epochs. Steps: 900 batches / accumulation 4 = 225 per epoch
    (2, False, 1_350_000, 675),
    # micro-batch 4: E[max] = 300·(1 − ½⁴) + 100·½⁴ = 287.5; 450 batches × 4 × 287.5 = 517,500; × 3. 450/2 = 225
    (4, False, 1_552_500, 675),
    # packed into rows of 512 (runtime pack()): ceil(1,800 × 200 / 512) = ceil(703.1) = 704 rows × 512 = 360,448
    # positions; × 3. 704 rows / 2 = 352 batches, / 4 = 88 steps per epoch
    (2, True, 1_081_344, 264),
])
def test_padding_and_packing_are_counted(mb, packing, tokens, steps):
    out = plan("meta-llama/Llama-3.1-8B", {"gpu": "A100-80GB"},
               {"num_examples": 2_000, "seq_len": 512, "packing": packing}, lengths=LENGTHS,
               method={"name": "lora"}, training={"micro_batch_size": mb})
    t = out["chosen"]["time"]
    assert t["tokens"] == tokens
    assert t["useful_tokens"] == 1_080_000  # 3 × 1,800 × 200: what the data holds, padding or not
    assert t["optimizer_steps"] == steps


# --- FLOPs per token, per method --------------------------------------------------------------------------------------
# Llama 3.2 1B (catalog config.json): hidden h = 2048, MLP 8192, 16 layers, 32 heads × 64, 8 KV heads (k, v: 512 wide),
# vocabulary 128,256. Weights multiplied per token: N_layers = 16 × (2·2048² + 2·2048·512 + 3·2048·8192)
# = 16 × 60,817,408 = 973,078,528; the head 128,256 × 2048 = 262,668,288; N = 1,235,746,816.
N_LAYERS = 973_078_528
N = N_LAYERS + 262_668_288
IN_PLUS_OUT = (2048 + 2048) + 2 * (2048 + 512) + (2048 + 2048) + 3 * (2048 + 8192)  # q, k, v, o, gate, up, down: 44,032
# Attention, 512-token rows all full: every micro-batch is unpadded and runs causal, (512 + 1)/2 = 256.5 key
# positions per query; forward 4·d per pair and head over 16 layers × 32 heads × 64 = 131,072 × 256.5 = 33,619,968
# FLOPs per token; FlashAttention-2's backward 2.5× the forward; the forward again when checkpointing.
ATTN_FWD = 4 * 32 * 64 * 16 * 256.5


def thin(r: int) -> int:
    """LoRA's two thin matmuls per token and layer stack, forward: 16 layers × 2·r·(in + out) summed over modules."""
    return 16 * 2 * r * IN_PLUS_OUT


# DoRA's weight norm, every forward pass, token-independent (peft DoraLinearLayer): per module 2·in²·r + (2r+3)·in·out
# at r = 32: six modules read 2048 wide (2·2048²·32 = 268,435,456 each), down_proj 8192 (2·8192²·32 = 4,294,967,296);
# Σ in·out per layer = 60,817,408, × 67. Per layer 9,980,346,368; × 16 layers = 159,685,541,888 per forward pass.
DORA_NORM = 16 * (6 * 2 * 2048**2 * 32 + 2 * 8192**2 * 32 + 67 * (N_LAYERS // 16))


def per_micro_batch_tokens(micro_batch: int) -> float:
    # 19,000 training rows (20,000 − 1,000 held out) of 512 tokens in ceil(19,000 / b) micro-batches (the last short)
    return 19_000 * 512 / math.ceil(19_000 / micro_batch)


@pytest.mark.parametrize("gc", [False, True])
def test_flops_per_token_of_each_method(gc):
    out = plan("meta-llama/Llama-3.2-1B", {"gpu": "H100-SXM"}, {"num_examples": 20_000, "seq_len": 512},
               training={"gradient_checkpointing": gc})
    recompute = 2 * N_LAYERS if gc else 0  # the layers run forward again (not the head)
    attention = ATTN_FWD * (1 + 2.5 + (1 if gc else 0))
    adapters = 3 + (1 if gc else 0)  # forward 1, backward 2 (input and weight gradients), recomputed 1
    expected = {
        # full fine-tuning: forward 2N, input gradients 2N, weight gradients 2N — backward is 2× the forward
        "full": 6 * N + recompute + attention,
        # frozen base: forward 2N and input gradients 2N; r = 64 adapters (the QLoRA recipe)
        "lora": 4 * N + recompute + adapters * thin(64) + attention,
        "qlora": 4 * N + recompute + adapters * thin(64) + attention,  # de-quantization is bytes, not FLOPs
    }
    for m in ("dora", "qdora"):  # r = 32, no dropout (20,000 examples), the norm once per forward pass
        b = out["methods"][m]["geometry"]["micro_batch_size"]
        norm = DORA_NORM * (2 if gc else 1) / per_micro_batch_tokens(b)
        expected[m] = 4 * N + recompute + adapters * thin(32) + attention + norm
    for m, flops in expected.items():
        assert out["methods"][m]["time"]["flops_per_token"] == pytest.approx(flops, rel=1e-9), m


def test_dora_dropout_runs_the_base_matmul_again():
    # peft's DoraLinearVariant with dropout: the adapted weights (all linears: N_LAYERS) multiply the dropped input
    # again, forward 2·W and input gradient 2·W per token (and 2·W more when recomputed)
    def flops(dropout: float, gc: bool) -> float:
        out = plan("meta-llama/Llama-3.2-1B", {"gpu": "H100-SXM"}, {"num_examples": 20_000, "seq_len": 512},
                   method={"name": "dora", "dropout": dropout}, training={"gradient_checkpointing": gc,
                                                                          "micro_batch_size": 8})
        return out["methods"]["dora"]["time"]["flops_per_token"]

    assert flops(0.05, False) - flops(0.0, False) == pytest.approx(4 * N_LAYERS, rel=1e-9)
    assert flops(0.05, True) - flops(0.0, True) == pytest.approx(6 * N_LAYERS, rel=1e-9)


# --- memory-bound terms: 4-bit de-quantization and the optimizer step ------------------------------------------------
def test_dequantization_and_optimizer_traffic():
    # Llama 3.1 8B on an A100 (2,039 GB/s, gpus.toml) at the fitted share of the bandwidth k_bw
    # (planner/data/throughput_fit.toml: an input of the time model, not its output); 200,000 examples, 1 epoch.
    with (ROOT / "planner" / "data" / "throughput_fit.toml").open("rb") as fh:
        k_bw = tomllib.load(fh)["coefficients"]["bandwidth_efficiency"]
    bandwidth = 2039e9 * k_bw
    # decoder linears per layer: q 4096², k, v 4096·1024, o 4096², gate, up, down 3·4096·14336 → × 32 layers
    linears = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # 6,979,321,856
    # LoRA r = 64 on all seven: Σ(in + out) = 8192 + 2·5120 + 8192 + 3·18432 = 81,920 per layer
    adapter = 32 * 64 * 81_920  # 167,772,160 fp32 parameters (4 bytes)
    out = plan("meta-llama/Llama-3.1-8B", {"gpu": "A100-80GB"}, {"num_examples": 200_000, "seq_len": 512},
               training={"gradient_checkpointing": False, "micro_batch_size": 4, "optimizer": "adamw_torch"})
    # 199,000 train / 4 = 49,750 micro-steps, accumulation 128 / 4 = 32 → ceil(49,750 / 32) = 1,555 steps
    micro_steps, steps, accumulation = 49_750, 1_555, 32
    q = out["methods"]["qlora"]
    assert (q["geometry"]["micro_batch_size"], q["geometry"]["gradient_accumulation_steps"]) == (4, accumulation)
    # bitsandbytes de-quantizes every 4-bit weight on every pass (forward; input gradient): 2 passes × 2.5 bytes
    # (NF4 read 0.5 + 16-bit written 2) per weight, per micro-step
    dequant = micro_steps * 2 * 2.5 * linears / bandwidth
    assert q["time"]["breakdown_seconds"]["memory-bound"] == pytest.approx(dequant, rel=1e-3)
    assert out["methods"]["lora"]["time"]["breakdown_seconds"]["memory-bound"] == 0  # 16-bit base: nothing
    # fused AdamW reads weight, gradient, two states and writes three (7e), clipping 3e, the NaN guard 1e per
    # optimizer step; accumulating adds 3e per micro-step after the first (e = 4 bytes, fp32 adapters)
    lora = out["methods"]["lora"]
    assert lora["geometry"]["gradient_accumulation_steps"] == accumulation
    per_step = (11 * 4 + (accumulation - 1) * 3 * 4) * adapter
    assert lora["time"]["breakdown_seconds"]["optimizer"] == pytest.approx(steps * per_step / bandwidth, rel=2e-3)


# --- communication: the ring runs at its slowest link ---------------------------------------------------------------
def test_communication_across_nodes_runs_at_the_network_speed():
    # Llama 3.1 70B LoRA (r = 64) under FSDP on 2 nodes × 8 H100: each micro-step all-gathers the 16-bit decoder
    # weights twice (forward, backward) and reduce-scatters the fp32 adapter gradients, over the slowest link of the
    # ring: the nodes' network (hardware.network_gbps), below NVLink's 450 GB/s per direction. Half of it is hidden
    # behind compute. Between a 25 and a 50 GB/s network only that time changes:
    #   W = 80 layers × (2·8192² + 2·8192·1024 + 3·8192·28672) × 2 bytes = 136,902,082,560
    #   G = 80 × 64 × (2·8192 + 2·(8192+1024) + 8192+8192 + 3·(8192+28672)) × 4 bytes = 3,313,500,160
    #   per micro-step (2·15/16·W + 15/16·G) = 259,797,811,200 bytes
    # 20,000 examples: 1,000 held out, effective batch 32 → accumulation 32/(1·16) = 2; ceil(19,000/16) = 1,188
    # batches per device, 594 steps per epoch, 2 epochs: 1,188 steps of 2 micro-steps.
    def run(network: float) -> dict:
        return plan("meta-llama/Llama-3.1-70B", {"gpu": "H100-SXM", "count": 8, "nodes": 2, "network_gbps": network},
                    {"num_examples": 20_000, "seq_len": 2048}, method={"name": "lora", "rank": 64},
                    training={"parallelism": "fsdp", "micro_batch_size": 1, "gradient_checkpointing": True,
                              "optimizer": "adamw_torch", "activation_offloading": False})["chosen"]

    slow, fast = run(25.0), run(50.0)
    for c in (slow, fast):
        assert (c["devices"], c["geometry"]["gradient_accumulation_steps"], c["time"]["optimizer_steps"]) == \
            (16, 2, 1_188)
    per_micro = 2 * 15 / 16 * 136_902_082_560 + 15 / 16 * 3_313_500_160
    hidden = 0.5
    expected = 1_188 * 2 * per_micro * (1 / 25e9 - 1 / 50e9) * (1 - hidden)  # ≈ 6,172.8 s
    assert slow["time"]["seconds"] - fast["time"]["seconds"] == pytest.approx(expected, abs=0.2)
    assert any("over 25 GB/s links" in a for a in slow["time"]["assumptions"])
