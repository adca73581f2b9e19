"""The one error type of the API: a status, a closed `error_type`, and a message for the client."""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}
