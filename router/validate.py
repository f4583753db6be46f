"""A request's prompt, tokenized and checked against the deployment's limits before anything runs."""
from __future__ import annotations

from pdserve.config import LimitsConfig
from pdserve.engine.tokenizer import Tokenizer
from pdserve.errors import InvalidRequestError
from pdserve.router.frontend import GenerateInput

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
# Every stop string is searched for at every new token, on the router's loop: their number is bounded.
MAX_STOP_STRINGS = 64


def prompt_ids(tokenizer: Tokenizer, request: GenerateInput) -> list[int]:
    """The prompt's token ids: `text` as given, `messages` through the chat template, `token_ids` as they are."""
    given = [x for x in (request.text, request.token_ids, request.messages) if x is not None]
    if len(given) != 1:
        raise InvalidRequestError("prompt: exactly one of text, token_ids or messages must be given")
    if request.token_ids is not None:
        return list(request.token_ids)
    if request.text is not None:
        if not request.text:
            raise InvalidRequestError("prompt is empty")
        return tokenizer.encode_prompt(request.text)
    if not request.messages:
        raise InvalidRequestError("messages: at least one message is needed")
    for i, m in enumerate(request.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role: unknown role {m.role!r} "
                                      f"(expected one of {', '.join(CHAT_ROLES)})")
    return tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in request.messages])


def check_request(prompt: list[int], request: GenerateInput, limits: LimitsConfig, max_model_len: int,
                  vocab_size: int) -> None:
    if not prompt:
        raise InvalidRequestError("prompt is empty")
    if limits.max_prompt_tokens is not None and len(prompt) > limits.max_prompt_tokens:
        raise InvalidRequestError(f"prompt has {len(prompt)} tokens; limits.max_prompt_tokens is "
                                  f"{limits.max_prompt_tokens}")
    if len(prompt) >= max_model_len:
        raise InvalidRequestError(f"prompt has {len(prompt)} tokens; max_model_len is {max_model_len} "
                                  f"(room for 1 new token needed)")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}")
    if request.params.max_tokens > limits.max_tokens:
        raise InvalidRequestError(f"max_tokens must be <= {limits.max_tokens} (limits.max_tokens), "
                                  f"got {request.params.max_tokens}")
