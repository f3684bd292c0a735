"""A byte-level BPE tokenizer trained with HF ``tokenizers`` on the training text.

Byte-level: any input encodes (no unknown token), and decode(encode(text)) == text.
The tokenizer is saved in the run directory and reused on resume.
"""

from __future__ import annotations

import errno
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
    """Atomically (a temporary file, then a rename). A failed write (a full disk) is an OSError
    with the temporary file removed: ``tokenizers`` raises a bare Exception."""
    tmp = Path(str(path) + ".tmp")
    try:
        tok.save(str(tmp))
        tmp.replace(path)
    except Exception as err:  # noqa: BLE001 - tokenizers' errors are plain Exceptions
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise
        nospace = "No space left" in str(err)
        raise OSError(errno.ENOSPC if nospace else errno.EIO, "no space left on device" if nospace
                      else f"could not write the tokenizer ({err})", str(path)) from None


def load_tokenizer(path: Path) -> Tokenizer:
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer {str(path)!r} not found; the run directory should hold "
                                "tokenizer.json (was it written by moekit train?)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers' errors are plain Exceptions
        raise ValueError(f"tokenizer {str(path)!r} is corrupt or not a tokenizers file ({str(err)[:120]}); "
                         "restore it from a copy") from None


# end-of-text tokens of pretrained tokenizers (SmolLM2 and GPT-2 use moekit's own)
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def eos_id(tok: Tokenizer, required: bool = True) -> int | None:
    """The end-of-text token: moekit's, or a pretrained tokenizer's own; none is one line
    (or None when not ``required``)."""
    for name in _EOS_NAMES:
        if (i := tok.token_to_id(name)) is not None:
            return i
    if not required:
        return None
    raise ValueError(f"the tokenizer has no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                     "use a tokenizer with one")
