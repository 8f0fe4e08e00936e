"""runtime/offload.py on the CPU (plain CPU copies as the "host", no streams): which saved tensors move, that the
gradients do not change by a single bit, and the bookkeeping against numbers computed from the shapes here.
The CUDA test (pinned memory, side stream, device memory actually freed) is marked gpu."""

import copy

import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra")

from peftplan.runtime.loss import install
from peftplan.runtime.offload import MIN_OFFLOAD_BYTES, OffloadActivations

B, T, H, LAYERS, VOCAB = 2, 32, 64, 3, 300
S = B * T * H * 4  # one fp32 hidden state: what a checkpointed layer saves as its input


def checkpointed_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                               max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert install(model).enabled  # the loss saves nothing: what remains is the decoder's
    model.train()
    return model


def ids():
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))


def test_min_bytes_default_is_one_mib():
    assert MIN_OFFLOAD_BYTES == 2**20


def test_checkpointed_layer_inputs_are_offloaded_and_gradients_are_bitwise_equal():
    model = checkpointed_llama()
    ref = copy.deepcopy(model)
    layer_inputs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: layer_inputs.append(args[0].data_ptr()))
             for layer in model.model.layers]
    offload = OffloadActivations("cpu", min_bytes=S, record=True)
    x = ids()
    with offload:
        loss = model(input_ids=x, labels=x).loss
    for h in hooks:
        h.remove()
    s = offload.stats
    # forward: every layer input, and the final RMSNorm's input (saved by pow and by mul: copied once) and
    # its normalized output; nothing else of B·T·H·4 bytes is saved outside the checkpointed layers
    assert [r[0] for r in s.records] == [(B, T, H)] * (LAYERS + 2)
    assert [r[2] for r in s.records][:LAYERS] == layer_inputs
    assert s.packed == LAYERS + 2 and s.shared == 1
    assert s.offloaded_bytes == (LAYERS + 2) * S == s.host_bytes == s.host_peak_bytes
    assert s.in_flight_peak_forward_bytes == 2 * S  # max_in_flight = 2: double buffering
    assert s.kept > 0  # the small ones (rsqrt of the norm, embedding indices) and parameters
    loss.backward()
    # backward: the last two still on the device, every other one prefetched before it was needed
    assert s.from_stash == 2 and s.prefetched == LAYERS and s.fetched_on_demand == 0
    assert S <= s.in_flight_peak_backward_bytes <= (2 + 1) * S  # max_in_flight + prefetch
    assert s.host_bytes == 0 and s.in_flight_bytes == 0  # released at the end of backward
    ref(input_ids=x, labels=x).loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_without_prefetch_each_tensor_is_fetched_when_backward_needs_it():
    model = checkpointed_llama()
    offload = OffloadActivations("cpu", min_bytes=S, max_in_flight=1, prefetch=0)
    x = ids()
    with offload:
        loss = model(input_ids=x, labels=x).loss
    assert offload.stats.in_flight_peak_forward_bytes == S
    loss.backward()
    s = offload.stats
    assert (s.from_stash, s.prefetched, s.fetched_on_demand) == (1, 0, LAYERS + 1)
    assert s.in_flight_peak_backward_bytes == S


def test_parameters_views_of_parameters_and_small_tensors_stay():
    w = torch.nn.Parameter(torch.randn(256, 256))
    x = torch.randn(64, 256, requires_grad=True)
    big = 64 * 256 * 4
    offload = OffloadActivations("cpu", min_bytes=big, record=True)
    with offload:
        a = x * 2.0  # saves nothing big
        y = (a @ w.t()).relu()  # mm saves a (activation) and w.t() (a view of a parameter); relu saves its output
        z = (y * w[0]).sum()  # saves y (relu's output again: copied once) and a row of w (a parameter view)
    assert [r[0] for r in offload.stats.records] == [(64, 256), (64, 256)]  # a and relu's output only
    assert offload.stats.shared == 1
    z.backward()
    got = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    ((x * 2.0) @ w.t()).relu().mul(w[0]).sum().backward()
    assert torch.equal(got[0], x.grad) and torch.equal(got[1], w.grad)
    with OffloadActivations("cpu", min_bytes=1 << 40) as nothing:
        ((x * 2.0) @ w.t()).relu().sum().backward()
    assert nothing.stats.packed == 0 and nothing.stats.kept > 0


def test_backward_twice_is_a_clear_error():
    x = torch.randn(64, 256, requires_grad=True)
    with OffloadActivations("cpu", min_bytes=1024):
        y = (x.sin() * x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="max_in_flight"):
        OffloadActivations("cpu", max_in_flight=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_frees_device_memory_and_keeps_gradients():
    model = checkpointed_llama().cuda()
    x = ids().cuda()
    peaks, grads = {}, {}
    for name in ("resident", "offloaded"):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        offload = OffloadActivations(min_bytes=S) if name == "offloaded" else None
        if offload:
            with offload:
                loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        grads[name] = [p.grad.clone() for p in model.parameters()]
    assert offload.stats.packed == LAYERS + 2 and offload.stats.host_bytes == 0
    for a, b in zip(grads["resident"], grads["offloaded"], strict=True):
        assert torch.equal(a, b)
