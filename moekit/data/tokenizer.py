"""A byte-level BPE tokenizer trained with HF ``tokenizers`` on the training text.

Byte-level: any input encodes (no unknown token), and decode(encode(text)) == text.
The tokenizer is saved in the run directory and reused on resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train byte-level BPE on ``texts``; the end-of-text token has id 0.

    Example:
        >>> tok = train_tokenizer(["hello world, hello moe"] * 10, vocab_size=300)
        >>> tok.decode(tok.encode("hello moe").ids)
        'hello moe'
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size}: byte-level BPE needs at least 257 (256 bytes + "
                         "end-of-text); use e.g. 8192")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)


def load_tokenizer(path: Path) -> Tokenizer:
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer {str(path)!r} not found; the run directory should hold "
                                "tokenizer.json (was it written by moekit train?)")
    return Tokenizer.from_file(str(path))


def eos_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOS)
