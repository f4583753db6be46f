"""Errors that cross a boundary (CLI, gRPC, HTTP) carry a code and a message that names the problem."""
from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Each code maps to one gRPC status and one HTTP status."""

    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 400)
    NOT_FOUND = ("NOT_FOUND", 404)
    RESOURCE_EXHAUSTED = ("RESOURCE_EXHAUSTED", 429)
    UNAVAILABLE = ("UNAVAILABLE", 503)
    DEADLINE_EXCEEDED = ("DEADLINE_EXCEEDED", 504)
    CANCELLED = ("CANCELLED", 499)
    FAILED_PRECONDITION = ("FAILED_PRECONDITION", 400)
    INTERNAL = ("INTERNAL", 500)

    @property
    def grpc_name(self) -> str:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


class PdserveError(Exception):
    code = ErrorCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequestError(PdserveError):
    """A request's own content is wrong (bad sampling parameter, prompt too long...)."""

    code = ErrorCode.INVALID_ARGUMENT


class ConfigError(PdserveError):
    """A deployment file or model folder is wrong; the message names the file and field."""

    code = ErrorCode.INVALID_ARGUMENT


class UnsupportedModelError(PdserveError):
    code = ErrorCode.INVALID_ARGUMENT


class ResourceExhaustedError(PdserveError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class WorkerFailedError(PdserveError):
    """A worker (or one rank of a gang) died or stopped answering within its deadline."""

    code = ErrorCode.UNAVAILABLE


class TransferError(PdserveError):
    """A KV transfer failed, timed out, or its peer's layout did not match."""

    code = ErrorCode.UNAVAILABLE


class TransferGone(TransferError):
    """A sender's part arrived for a transfer the receiver does not hold (it ended there, e.g. cancelled when
    its request was aborted, or it was never expected): its bytes have nowhere to go."""
