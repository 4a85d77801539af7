"""Errors, one type per failure class; retry decisions read the type, never a message.

    OnboardingError
    ├── InputError                 bad roster/profile/settings: names file, line, field
    ├── LinkCheckError             the returned authorize URL failed the checks
    ├── UnknownStateError          a connection's state that no tenant was ever given
    ├── SupersededStateError       a state whose link a newer link replaced
    ├── ExpiredStateError          a state whose link is past its expiry
    ├── StateUsedError             a state already accepted: the tenant is connected
    ├── LedgerSchemaError          the ledger's tables could not be created or brought up to date
    ├── LedgerUnavailableError     the ledger's connection was lost and not restored: transient
    ├── BatchStoppedError          the batch stopped (a refused key...): this call was not made
    ├── MailError                  sending an email failed (smtp_code: the server's reply code)
    │   ├── TransientMailError         4xx, a dropped connection, a timeout: worth retrying
    │   ├── PermanentMailError         5xx: retrying will not help
    │   │   ├── MailAuthError              the server refused our login (535)
    │   │   └── MailTlsError               TLS could not be set up
    │   └── UnsafeMessageError         a header would carry a line break: nothing was sent
    └── VersoriError
        ├── APIError               Versori answered with a non-2xx (code, message, fields)
        │   ├── BadRequestError            400
        │   ├── AuthenticationError        401
        │   ├── PermissionDeniedError      403
        │   ├── NotFoundError              404
        │   ├── ConflictError              409
        │   ├── PreconditionFailedError    412
        │   ├── RateLimitedError           429 (retry_after)
        │   ├── RetryableStatusError       408, 425
        │   └── ServerError                5xx
        └── APIConnectionError     no answer: refused, reset, DNS
            └── APITimeoutError    connect/read timeout or call deadline

No message here ever holds an API key, an SMTP password or an authorize URL: the URL carries a
CSRF `state`.
"""

from __future__ import annotations

from dataclasses import dataclass


class OnboardingError(Exception):
    """Base of every error this package raises on purpose."""

    code: str = "error"
    transient: bool = False

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take structured arguments, not their message: pickle and copy rebuild the
        # error from its state instead of calling __init__ again with the message.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[OnboardingError], args: tuple[object, ...], state: dict[str, object]
) -> OnboardingError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located as precisely as the format allows."""

    source: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        parts = [where, self.field, self.message] if self.field else [where, self.message]
        return ": ".join(p for p in parts if p)


class InputError(OnboardingError):
    """Bad input (roster, profile, settings). Nothing was called."""

    code = "bad_input"

    def __init__(self, problems: list[Problem] | str, *, hint: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem(source="", line=None, field="", message=problems)]
        self.problems = problems
        self.hint = hint
        lines = [str(p) for p in problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class LinkCheckError(OnboardingError):
    """Versori returned a URL that does not pass the authorize-URL checks; it is never stored."""

    code = "link_check_failed"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("returned authorize URL failed checks: " + "; ".join(problems))


class UnknownStateError(OnboardingError):
    """No tenant was ever given this state: nothing is recorded."""

    code = "unknown_state"


class SupersededStateError(OnboardingError):
    """A newer link replaced the one that carried this state: nothing is recorded."""

    code = "superseded_state"


class ExpiredStateError(OnboardingError):
    """The link that carried this state is past its expiry: nothing is recorded."""

    code = "expired_state"


class StateUsedError(OnboardingError):
    """The tenant is connected already: a state is accepted once."""

    code = "state_used"


class LedgerSchemaError(OnboardingError):
    """The ledger answered, but its tables could not be created or brought up to date. Not the
    operator's input: a database permission, or a schema another tool changed."""

    code = "ledger_schema"


class LedgerUnavailableError(OnboardingError):
    """The ledger's database connection was lost (a restart, a failover, a killed backend) and
    could not be restored within a few tries. Transient: the tenant is tried again, never
    recorded failed for it (the ledger is what could not be written). The message never holds
    SQL or its parameters."""

    code = "ledger_unavailable"
    transient = True


class BatchStoppedError(OnboardingError):
    """The batch stopped (retry_policy.BatchStop: a refused key, a connector Versori does not
    know, Ctrl-C) before this tenant's call was made: nothing was sent to Versori. The message
    is what stopped it."""

    code = "not_attempted"


class MailError(OnboardingError):
    """Base of the mail errors. `smtp_code` is the server's reply code when there was one."""

    code = "smtp_error"

    def __init__(self, message: str, *, smtp_code: int | None = None) -> None:
        self.smtp_code = smtp_code
        super().__init__(message)


class TransientMailError(MailError):
    """Worth retrying later: a 4xx reply, a dropped connection, a timeout, a refused connect."""

    code = "smtp_transient"
    transient = True


class PermanentMailError(MailError):
    """Retrying will not help: a 5xx reply (550 unknown mailbox, 553, 554...)."""

    code = "smtp_rejected"


class MailAuthError(PermanentMailError):
    """The server refused our login (535), or cannot take one: fix the SMTP credentials."""

    code = "smtp_auth_failed"


class MailTlsError(PermanentMailError):
    """TLS could not be set up: certificate not trusted, no STARTTLS, a TLS/plain port mix-up."""

    code = "smtp_tls_failed"


class UnsafeMessageError(MailError):
    """A header value would carry a line break (header injection). Nothing was sent."""

    code = "unsafe_message"

    def __init__(self, header: str, why: str = "would contain a line break (CR or LF)") -> None:
        self.header = header
        what = f"the {header} header {why}" if header else why
        super().__init__(f"refusing to send the message: {what}")


class VersoriError(OnboardingError):
    """Base of errors from talking to Versori."""


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class APIError(VersoriError):
    """Versori answered with an error status. Carries Versori's own `code` and `message`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: list[FieldError] | None = None,
        details: str = "",
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or []
        self.details = details
        text = f"HTTP {status} {code}: {message}"
        if self.fields:
            text += " (" + "; ".join(f"{f.field}: {f.message}" for f in self.fields) + ")"
        super().__init__(text)


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class PreconditionFailedError(APIError):
    pass


class RetryableStatusError(APIError):
    transient = True


class RateLimitedError(APIError):
    transient = True

    def __init__(self, *args: object, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerError(APIError):
    transient = True


class APIConnectionError(VersoriError):
    code = "connection_error"
    transient = True


class APITimeoutError(APIConnectionError):
    code = "timeout"


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RetryableStatusError,
    409: ConflictError,
    412: PreconditionFailedError,
    425: RetryableStatusError,
    429: RateLimitedError,
}


def error_class_for(status: int) -> type[APIError]:
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, APIError)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: transport errors, 408, 425, 429, 5xx."""
    return isinstance(exc, OnboardingError) and exc.transient
