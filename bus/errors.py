"""Errors as values at the boundary: each maps to one row of the contract's error table (§2)."""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct, frozen=True):
    code: int
    type: str
    message: str
    details: list[str] = []


class ErrorReply(msgspec.Struct, frozen=True):
    error: ErrorBody


class ServiceError(Exception):
    """An expected failure, answered with its code, type and message; anything else is a 500."""

    code: int = 500
    type: str = "internal"

    def __init__(self, message: str, *, type: str | None = None, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if type is not None:
            self.type = type
        self.details = details or []

    def body(self) -> ErrorBody:
        return ErrorBody(code=self.code, type=self.type, message=self.message, details=self.details)


class BadRequest(ServiceError):
    code, type = 400, "bad_request"


class InvalidCredentials(ServiceError):
    code, type = 401, "invalid_credentials"


class NotFound(ServiceError):
    code, type = 404, "not_found"


class Conflict(ServiceError):
    """409; `type` names what collided: `email_taken`, `sku_taken`, `idempotency_conflict`."""

    code = 409

    def __init__(self, message: str, *, type: str, details: list[str] | None = None) -> None:
        super().__init__(message, type=type, details=details)


class Unprocessable(ServiceError):
    """422; `type` names the business rule: `insufficient_funds`, `out_of_stock`, ..."""

    code = 422

    def __init__(self, message: str, *, type: str, details: list[str] | None = None) -> None:
        super().__init__(message, type=type, details=details)


class Unavailable(ServiceError):
    code, type = 503, "unavailable"


class Internal(ServiceError):
    code, type = 500, "internal"


class RemoteError(ServiceError):
    """An error reply received from another service, kept as it came so it can be passed on."""

    def __init__(self, body: ErrorBody) -> None:
        super().__init__(body.message, type=body.type, details=list(body.details))
        self.code = body.code


INTERNAL_MESSAGE = "internal error"
