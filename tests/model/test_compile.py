import torch

from moekit.config import RunConfig
from moekit.model.transformer import MoETransformer


def test_torch_compile_matches_eager_in_float32():
    # f32 torch._grouped_mm does not trace: the auto backend switches to segment_mm when compiling
    torch.manual_seed(0)
    moe = {"d_ff": 32, "num_experts": 4, "top_k": 2}
    cfg = RunConfig.from_dict({"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                                         "vocab_size": 97, "moe": moe}})
    model = MoETransformer.build(cfg.model)
    tokens = torch.randint(0, 97, (2, 16))
    compiled = torch.compile(model)(tokens)
    eager = model(tokens)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    compiled.logits.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "noise" not in n)
