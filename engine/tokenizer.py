"""The model's own tokenizer and chat template (from its folder), with the two calls we need."""
from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError

from pdserve.errors import ConfigError, InvalidRequestError


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    def encode_prompt(self, text: str, chat: bool = False) -> list[int]:
        if not chat:
            return self.hf.encode(text)
        if not self.hf.chat_template:
            raise ConfigError("chat: this model's tokenizer has no chat template")
        return list(self.hf.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        ))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A whole conversation through the chat template, with the generation prompt added."""
        if not self.hf.chat_template:
            raise ConfigError("chat: this model's tokenizer has no chat template")
        try:
            return list(self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
        except TemplateError as e:  # a template's own `raise_exception` (roles that do not alternate, ...)
            raise InvalidRequestError(f"messages: the model's chat template refuses them: {e}") from None

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        return Tokenizer(AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model: no usable tokenizer in {path}: {e}") from None
