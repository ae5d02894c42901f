"""Tokenizers: a model folder's own, or the built-in character tokenizer (no hub needed).

The built-in tokenizer maps every printable ASCII character and newline to one
token, plus ChatML-style specials, and carries its own chat template. It is
what the embedded default run and the tests use.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Optional

from ..errors import UserError

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML. A system message is optional; add_generation_prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer():
    """A character-level fast tokenizer with ChatML specials and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 94 visible + space + newline
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=1_000_000,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(tokenizer_path: Optional[str], model_path: Optional[str], trust_remote_code: bool = False):
    """model.tokenizer, else model.path if it holds a tokenizer, else the built-in one."""
    from transformers import AutoTokenizer

    candidates = [tokenizer_path] if tokenizer_path else []
    if not tokenizer_path and model_path and any(
        (Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        candidates.append(model_path)
    if not candidates:
        return build_char_tokenizer()
    path = candidates[0]
    if not Path(path).is_dir():
        raise UserError(f"model.tokenizer: {path}: not a folder; point it at a Hugging Face tokenizer folder")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.tokenizer: {path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok
