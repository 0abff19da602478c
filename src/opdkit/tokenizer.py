"""A character-level Hugging Face tokenizer built in-process (no download).

Used by the CPU miniature and by the tests: every character of ``alphabet`` is one token and the
special tokens are matched first. The result is a ``PreTrainedTokenizerFast`` with a Qwen-style chat
template, so it round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import string

DEFAULT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_ALPHABET = string.digits + string.ascii_letters + " \n+-*/=:().,?{}\\<>_|"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET, specials: tuple[str, ...] = DEFAULT_SPECIALS,
                   *, chat_template: str | None = CHAT_TEMPLATE):
    """Build a character-level ``PreTrainedTokenizerFast``.

    Ids: specials first (0..len(specials)-1), then the alphabet in order. ``<|endoftext|>`` is pad,
    ``<|im_end|>`` is eos when present (else the first special).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(list(specials) + chars)}
    unk = "<|endoftext|>" if "<|endoftext|>" in vocab else specials[0]
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    eos = "<|im_end|>" if "<|im_end|>" in vocab else specials[0]
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=unk, pad_token=unk, eos_token=eos,
                                  additional_special_tokens=[s for s in specials if s not in (unk, eos)])
    if chat_template:
        tok.chat_template = chat_template
    return tok
