"""The buffer pool behind the expert FFN: a buffer is reused only when nothing holds it, and
reuse never changes a result (outputs, gradients, accumulated and held gradients)."""

import struct
import threading

import torch

from moekit import MoEConfig, MoELayer, reference_moe
from moekit.moe.workspace import WORKSPACE, Workspace

from ..conftest import rel_err

CPU = torch.device("cpu")


def test_an_idle_buffer_is_reused_and_a_held_one_is_not():
    ws = Workspace(min_bytes=0)
    a = ws.empty((4, 8), torch.float32, CPU)
    ptr = a.data_ptr()
    b = ws.empty((32,), torch.float32, CPU)      # a is held: a second buffer
    assert b.data_ptr() != ptr and ws.nbytes == 2 * 32 * 4
    view = a[1:]
    del a
    assert ws.empty((32,), torch.float32, CPU).data_ptr() != ptr   # a view still holds it
    del view
    c = ws.empty((2, 16), torch.float32, CPU)
    assert c.data_ptr() == ptr and c.shape == (2, 16) and c.is_contiguous()
    assert ws.empty((32,), torch.bfloat16, CPU).data_ptr() not in (ptr, b.data_ptr())   # per dtype


def test_sizes_the_pool_does_not_serve_and_the_cap():
    ws = Workspace(min_bytes=1024, max_bytes=4096, slack=1.25)
    small = ws.empty((10,), torch.float32, CPU)            # 40 bytes < min_bytes: not pooled
    assert ws.nbytes == 0 and small.shape == (10,)
    big = ws.empty((1000,), torch.float32, CPU)
    ptr = big.data_ptr()
    held = ws.empty((700,), torch.float32, CPU)            # big is in use: not evicted, not pooled
    assert ws.nbytes == 4000 and held.data_ptr() != ptr
    del big
    assert ws.empty((900,), torch.float32, CPU).data_ptr() == ptr
    assert ws.empty((700,), torch.float32, CPU).data_ptr() != ptr   # 1000 > 1.25 * 700: too big
    assert ws.nbytes == 2800                               # ... so the idle 1000 made room for it
    assert ws.empty((2000,), torch.float32, CPU).numel() == 2000 and ws.nbytes == 2800   # > cap
    assert ws.empty((4, 4), torch.float32, torch.device("meta")).device.type == "meta"
    ws.clear()
    assert ws.nbytes == 0


def test_clear_keeps_buffers_in_use():
    ws = Workspace(min_bytes=0)
    held = ws.empty((8,), torch.float32, CPU)
    ws.empty((8,), torch.float32, CPU)
    ws.clear()
    assert ws.nbytes == 8 * 4
    held.fill_(3.0)
    assert float(held.sum()) == 24.0


def _layer(num_experts=4):
    torch.manual_seed(0)
    return MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=num_experts, top_k=2,
                              backend="segment_mm"))


def _step(layer, x):
    y, _ = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()


def test_gradients_adopted_from_the_pool_survive_the_next_step():
    layer = _layer()
    w = layer.experts.w_up_EDF
    x1, x2 = torch.randn(40, 16), torch.randn(40, 16) * 3
    _step(layer, x1)
    g1, g1_copy = w.grad, w.grad.clone()
    w_ptr = g1.data_ptr()
    layer.zero_grad(set_to_none=True)
    _step(layer, x2)                          # g1 is still held by the test: not overwritten
    assert w.grad.data_ptr() != w_ptr
    torch.testing.assert_close(g1, g1_copy, rtol=0, atol=0)
    g2 = w.grad.clone()
    del g1
    layer.zero_grad(set_to_none=True)
    _step(layer, x2)                          # the same step again, on reused buffers
    torch.testing.assert_close(w.grad, g2, rtol=0, atol=0)


def test_accumulated_and_retained_graph_gradients_equal_the_reference():
    layer = _layer()
    x = torch.randn(30, 16)
    y_ref = reference_moe(layer, x)
    ref = torch.autograd.grad(y_ref.square().sum(), list(layer.parameters()))
    y, _ = layer(x)
    loss = y.square().sum()
    loss.backward(retain_graph=True)
    loss.backward()                           # a second backward over the same saved buffers
    layer(torch.randn(30, 16))                # a forward in between must not touch the grads
    for p, r in zip(layer.parameters(), ref):
        assert rel_err(p.grad, 2 * r) < 1e-5


def test_layers_in_threads_get_their_own_buffers():
    layers = [_layer(), _layer(8)]
    xs = [torch.randn(64, 16), torch.randn(64, 16)]
    want = [reference_moe(layer, x).detach() for layer, x in zip(layers, xs)]
    got, errors = [None, None], []

    def run(i):
        try:
            for _ in range(20):
                with torch.no_grad():
                    got[i] = layers[i](xs[i])[0]
        except Exception as err:   # surfaced below: a thread's exception is otherwise lost
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    assert WORKSPACE.nbytes > 0               # the layers did draw from the shared pool


def test_padded_layout_ignores_garbage_in_reused_buffers():
    """padded_mm's pad rows come from reused buffers: fill every pooled buffer with NaN first;
    the output and every gradient must still be the reference's, an empty expert's zero."""
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=1, backend="padded_mm"))
    with torch.no_grad():
        layer.router.weight_ED[3] = -10.0       # expert 3 gets no token (x > 0)
    x = torch.rand(50, 16) + 0.1
    for _ in range(2):
        _step(layer, x)                         # fills the pool with this shape's buffers
        layer.zero_grad(set_to_none=True)
    for buffers in WORKSPACE._buffers.values():
        for buf in buffers:
            buf.fill_(float("nan"))
    y, aux = layer(x)
    assert int(aux.tokens_per_expert[3]) == 0
    y.square().sum().backward()
    y_ref = reference_moe(layer, x)
    ref = torch.autograd.grad(y_ref.square().sum(), list(layer.parameters()))
    assert rel_err(y, y_ref) < 1e-5
    for p, r in zip(layer.parameters(), ref):
        assert torch.isfinite(p.grad).all() and rel_err(p.grad, r) < 1e-5
    assert float(layer.experts.w_up_EDF.grad[3].abs().max()) == 0.0


def test_inference_mode_buffers_never_reach_training():
    """A forward under inference_mode must not pool inference tensors that a later training
    step (with a new size) would be handed and fail to write."""
    layer = _layer()
    WORKSPACE.clear()
    with torch.inference_mode():
        layer(torch.randn(64, 16))
    assert WORKSPACE.nbytes == 0
    _step(layer, torch.randn(64, 16))         # would raise on an inference buffer
    assert layer.experts.w_up_EDF.grad is not None


def test_a_held_storage_object_keeps_its_buffer():
    ws = Workspace(min_bytes=0)
    t = ws.empty((8,), torch.float32, CPU)
    t.fill_(7.0)
    kept = t.untyped_storage()                # the user keeps the storage, not the tensor
    del t
    other = ws.empty((8,), torch.float32, CPU)
    other.fill_(-1.0)
    assert bytes(kept.tolist()) == struct.pack("8f", *[7.0] * 8)   # not overwritten


def test_sizes_that_stop_coming_are_freed():
    ws = Workspace(min_bytes=0)
    for n in range(1000, 1200):               # a new size every request, none held
        ws.empty((n,), torch.float32, CPU)
    assert ws.nbytes < 70 * 1200 * 4          # stale buffers dropped (200 made)
    steady = [ws.empty((500,), torch.float32, CPU) for _ in range(3)]
    ptrs = {t.data_ptr() for t in steady}
    del steady
    for _ in range(100):                      # the same three sizes step after step: all reused
        step = [ws.empty((500,), torch.float32, CPU) for _ in range(3)]
        assert {t.data_ptr() for t in step} == ptrs
        del step


def test_the_layer_output_can_be_modified_in_place():
    layer = _layer()
    y, _ = layer(torch.randn(12, 16))
    y.add_(1.0).sum().backward()
    assert layer.experts.w_up_EDF.grad is not None
