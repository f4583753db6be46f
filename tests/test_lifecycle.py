"""A request's event stream in the router: bounded waits, coalesced tokens, failures after the tokens before them."""
from __future__ import annotations

import asyncio

import pytest

from pdserve.errors import ErrorCode
from pdserve.messages import RequestFailure, TokenOutput
from pdserve.router.lifecycle import RequestStream, StreamError


def test_tokens_queued_together_come_out_as_one_output_then_the_failure():
    async def run():
        stream = RequestStream("r", 3)
        stream.push(TokenOutput("r", [1], logprobs=[{"token_logprob": -1.0, "top": {}}]))
        stream.push(TokenOutput("r", [2, 3], logprobs=[{"token_logprob": -2.0, "top": {}}] * 2))
        stream.push(RequestFailure("r", "UNAVAILABLE", "lost"))
        out = await stream.next_event(1.0, "tokens")
        assert out.token_ids == [1, 2, 3] and [e["token_logprob"] for e in out.logprobs] == [-1.0, -2.0, -2.0]
        with pytest.raises(StreamError, match="lost") as e:
            await stream.next_event(1.0, "tokens")
        assert e.value.code is ErrorCode.UNAVAILABLE
        stream.close()

    asyncio.run(run())


def test_outputs_after_a_finish_are_not_merged_into_it():
    async def run():
        stream = RequestStream("r", 3)
        stream.push(TokenOutput("r", [1], "length"))
        stream.push(TokenOutput("r", [2]))
        assert (await stream.next_event(1.0, "tokens")).token_ids == [1]
        assert (await stream.next_event(1.0, "tokens")).token_ids == [2]
        stream.close()

    asyncio.run(run())


def test_each_wait_is_bounded_from_its_own_start():
    async def run():
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", 3)
        loop.call_later(0.15, stream.push, TokenOutput("r", [1]))
        assert (await stream.next_event(0.2, "tokens")).token_ids == [1]  # the timer set for 0.2 s moves on
        start = loop.time()
        with pytest.raises(StreamError, match=r"^no tokens from the decode worker within 0s \(queued\)$") as e:
            await stream.next_event(0.2, "tokens from the decode worker")
        assert e.value.code is ErrorCode.UNAVAILABLE and 0.19 <= loop.time() - start < 0.5
        stream.close()

    asyncio.run(run())
