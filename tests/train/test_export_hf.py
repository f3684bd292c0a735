"""moekit export --format hf: the tokenizer and end-of-text token travel with the weights."""

import json

import pytest
import torch

from moekit.config import RunConfig
from moekit.data.tokenizer import train_tokenizer
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer
from moekit.train.run_dir import export_hf, save_export

transformers = pytest.importorskip("transformers")


def test_transformers_reads_the_exported_tokenizer_and_stops_at_end_of_text(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer.build(ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                                             max_seq_len=48)).eval()
    tok = train_tokenizer(["the house will come to order, order order " * 10] * 4, vocab_size=300)
    save_export(model, tok, RunConfig(model=model.cfg), tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the house will come to order"
    assert theirs(text)["input_ids"] == tok.encode(text).ids
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert theirs.eos_token == "<|endoftext|>"
    assert theirs.model_max_length == config["max_position_embeddings"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.generation_config.eos_token_id == 0 == config["eos_token_id"]
    ids = torch.tensor([tok.encode(text).ids])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-4)
