import torch

from moekit.config import RunConfig
from moekit.model.transformer import MoETransformer

from ..conftest import rel_err


def test_torch_compile_matches_eager_in_float32():
    # f32 torch._grouped_mm does not trace: the auto backend switches to segment_mm when compiling
    torch.manual_seed(0)
    moe = {"d_ff": 32, "num_experts": 4, "top_k": 2}
    cfg = RunConfig.from_dict({"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                                         "vocab_size": 97, "moe": moe}})
    model = MoETransformer.build(cfg.model)
    tokens = torch.randint(0, 97, (2, 16))
    params = {n: p for n, p in model.named_parameters() if "noise" not in n}

    def step(fn):
        """Logits and every parameter's gradient of one forward + backward, from no gradients."""
        model.zero_grad(set_to_none=True)
        out = fn(tokens)
        out.logits.square().mean().backward()
        return out, {n: p.grad for n, p in params.items()}

    compiled, compiled_grads = step(torch.compile(model))
    eager, eager_grads = step(model)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    assert all(g is not None for g in compiled_grads.values())
    # compiled (segment_mm) against eager (grouped_mm where torch has it): ~1e-6 apart here
    for name, grad in compiled_grads.items():
        assert rel_err(grad, eager_grads[name]) < 1e-5, name
