"""Runs an OpenAI request's choices through the router core and shapes what comes back.

`FanOut` merges the core's delta streams of a request's n choices; `ChatFormat` and `CompletionFormat`
turn deltas into OpenAI's whole responses or stream chunks (the only differences between the two
endpoints: body shapes and the logprobs format). Stream chunks are plain dicts in the schema's field order
(what `model_dump` of openai_schema's chunk types gives): they are built once per streamed message.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from pdserve.router.frontend import GenerateDelta, GenerateInput, RouterCore
from pdserve.router.openai_schema import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)

# Pumps being cancelled: asyncio keeps only weak references to tasks, and a cancelled pump still
# has to run its core iterator's clean-up (the abort) to the end.
_closing: set[asyncio.Task] = set()


class FanOut:
    """The deltas of n core requests as one stream of (choice index, delta).

    Each choice is pumped by its own task, so closing (a client gone, an error) cancels those tasks and
    the core's iterators run their abort in a task of their own, not in a scope that is being torn down.
    An error raised by any choice is raised from the iteration.
    """

    def __init__(self, core: RouterCore, inputs: list[GenerateInput]):
        self._queue: asyncio.Queue[tuple[int, GenerateDelta | BaseException | None]] = asyncio.Queue()
        self._open = len(inputs)
        self._tasks = [asyncio.create_task(self._pump(i, core, inp)) for i, inp in enumerate(inputs)]

    async def _pump(self, index: int, core: RouterCore, request: GenerateInput):
        try:
            async with contextlib.aclosing(core.generate(request)) as deltas:
                async for delta in deltas:
                    self._queue.put_nowait((index, delta))
            self._queue.put_nowait((index, None))
        except Exception as e:  # noqa: BLE001 -- handed to the consumer, which answers the client with it
            self._queue.put_nowait((index, e))

    def __aiter__(self) -> AsyncIterator[tuple[int, GenerateDelta]]:
        return self

    async def __anext__(self) -> tuple[int, GenerateDelta]:
        while self._open:
            index, item = await self._queue.get()
            if item is None:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return index, item
        raise StopAsyncIteration

    def close(self):
        """Cancel every choice still running (which aborts it in the core); returns at once."""
        for task in self._tasks:
            if not task.done():
                task.cancel()
                _closing.add(task)
                task.add_done_callback(_closing.discard)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[tuple[int, dict]] = field(default_factory=list)  # (token id, the core's entry): whole responses
    text_offset: int = 0  # completions' logprobs: where the next token's text starts
    started: bool = False  # chat streams: the first chunk carries the role


class ResponseFormat:
    """Accumulates a request's choices and writes its bodies; subclasses give the endpoint's shapes:
    its body types, `_chunk` (one delta as a stream chunk's choice), `_choice` (a whole choice), `_logprobs`."""

    response_type: type[BaseModel]
    chunk_type: type[BaseModel]

    def __init__(self, core: RouterCore, request_id: str, model: str, n: int, logprobs: bool,
                 tokens_as_ids: bool = False):
        self.core, self.request_id, self.model, self.want_logprobs = core, request_id, model, logprobs
        self.tokens_as_ids = tokens_as_ids
        self.created = int(time.time())  # one for every chunk of the request, as OpenAI's
        self.choices = [_Choice() for _ in range(n)]
        self._token_texts: dict[int, str] = {}
        self._chunk_head = {"id": request_id, "object": self.chunk_type.model_fields["object"].default,
                            "created": self.created, "model": model}

    def add(self, index: int, delta: GenerateDelta, stream: bool) -> dict | None:
        """Take one delta; when streaming, return its chunk (None when it carries nothing to send)."""
        choice = self.choices[index]
        choice.text.append(delta.text)
        if delta.usage is not None:
            choice.prompt_tokens, choice.completion_tokens = delta.usage.prompt_tokens, delta.usage.completion_tokens
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        entries = list(zip(delta.token_ids, delta.logprobs))
        if not stream:
            choice.logprobs.extend(entries)
            return None
        if not (delta.text or delta.finish_reason or (self.want_logprobs and entries)):
            return None
        logprobs = self._logprobs(choice, entries).model_dump() if self.want_logprobs else None
        return {**self._chunk_head, "choices": [self._chunk(index, choice, delta, logprobs)], "usage": None}

    def usage(self) -> UsageInfo:
        prompt = self.choices[0].prompt_tokens  # every choice has the same prompt; counted once, as OpenAI does
        completion = sum(c.completion_tokens for c in self.choices)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def response(self) -> dict:
        choices = [
            self._choice(i, c, self._logprobs(c, c.logprobs) if self.want_logprobs else None)
            for i, c in enumerate(self.choices)
        ]
        return self.response_type(**self._head(), choices=choices, usage=self.usage()).model_dump()

    def usage_chunk(self) -> dict:
        """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
        return self.chunk_type(**self._head(), choices=[], usage=self.usage()).model_dump()

    def _head(self) -> dict:
        return {"id": self.request_id, "created": self.created, "model": self.model}

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_texts:
            self._token_texts[token_id] = self.core.token_text(token_id)
        return self._token_texts[token_id]

    def token_name(self, token_id: int) -> str:
        """A token as logprobs name it: its text, or `token_id:<id>` (return_tokens_as_token_ids)."""
        return f"token_id:{token_id}" if self.tokens_as_ids else self.token_text(token_id)


class ChatFormat(ResponseFormat):
    response_type, chunk_type = ChatCompletionResponse, ChatCompletionChunk

    def _chunk(self, index, choice, delta, logprobs):
        role = None if choice.started else "assistant"
        choice.started = True
        return {"index": index, "delta": {"role": role, "content": delta.text}, "logprobs": logprobs,
                "finish_reason": delta.finish_reason}

    def _choice(self, index, choice, logprobs):
        message = ChatMessageOut(role="assistant", content="".join(choice.text))
        return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=choice.finish_reason)

    def _logprobs(self, choice, entries) -> ChatLogprobs:
        content = []
        for token_id, entry in entries:
            top = sorted(entry["top"].items(), key=lambda kv: -kv[1])
            content.append(TokenLogprob(
                token=self.token_name(token_id), logprob=entry["token_logprob"],
                bytes=list(self.token_text(token_id).encode()),
                top_logprobs=[TopLogprob(token=self.token_name(i), logprob=lp, bytes=list(self.token_text(i).encode()))
                              for i, lp in top]))
        return ChatLogprobs(content=content)


class CompletionFormat(ResponseFormat):
    response_type = chunk_type = CompletionResponse

    def _chunk(self, index, choice, delta, logprobs):
        return {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    def _choice(self, index, choice, logprobs):
        return CompletionChoice(index=index, text="".join(choice.text), logprobs=logprobs,
                                finish_reason=choice.finish_reason)

    def _logprobs(self, choice, entries) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, entry in entries:
            token = self.token_name(token_id)
            out.tokens.append(token)
            out.token_logprobs.append(entry["token_logprob"])
            # NOTE: the chosen token is always listed, as OpenAI does, even with logprobs=0.
            top = {self.token_name(i): lp for i, lp in entry["top"].items()}
            out.top_logprobs.append({token: entry["token_logprob"], **top})
            out.text_offset.append(choice.text_offset)
            choice.text_offset += len(self.token_text(token_id))
        return out
