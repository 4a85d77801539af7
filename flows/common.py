"""What the flows share: secrets from Prefect blocks, progress reporting, artifact keys."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.events import TenantEventSender, on_temporary_server
from onboarding.client import VersoriClient, parse_retry_after
from onboarding.errors import InputError
from onboarding.ledger import Ledger
from onboarding.models import Api
from onboarding.pacing import Pacer, Spacing
from onboarding.profile import ConnectorProfile
from onboarding.settings import VersoriSettings
from onboarding.tenant_steps import Delivery, OnboardingJob, TenantEvents

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect_email import EmailServerCredentials

    from onboarding.mail import MailSender, MailTemplates, SmtpSettings
    from onboarding.mail.settings import Security


def resolve_api_key(settings: VersoriSettings) -> str | None:
    """The API key from VERSORI_API_KEY, else from the Secret block named VERSORI_API_KEY_BLOCK."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if settings.api_key_block:
        from prefect.blocks.system import Secret

        return str(Secret.load(settings.api_key_block).get())  # type: ignore[union-attr]  # sync
    return None


def tag_run(profile: ConnectorProfile) -> None:
    """Tag the current flow run `profile:<slug>`, so the UI can filter runs by profile."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    tag = f"profile:{profile.slug}"
    if flow_run.id is None or tag in (flow_run.tags or []):
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*(flow_run.tags or []), tag])


def rate_limit_name(profile: ConnectorProfile) -> str:
    return f"onboarding-rate-{profile.slug}"


def make_pacer(profile: ConnectorProfile) -> Pacer:
    """A pacer at the profile's `rate_limit_per_second`, if it sets one.

    Against a Prefect server, slots come from a Prefect global concurrency limit with slot
    decay, so the rate holds across every process and machine running the profile; the limit
    is created, or corrected, first (a missing one would not be enforced at all). Against
    Prefect's temporary server (no PREFECT_API_URL), no other process can share the limit: the
    pacer spaces calls in this process, which costs no API round trips."""
    rate = profile.rate_limit_per_second
    if rate is None:
        return Pacer()
    logger = get_run_logger()
    if on_temporary_server():
        logger.info(
            "Pacing at %g calls/s in this process (Prefect's temporary server: no other "
            "process shares it)",
            rate,
        )
        return Pacer(acquire=Spacing(rate))
    from prefect.client.orchestration import get_client

    name = rate_limit_name(profile)
    # Half a second's worth a block: the next block then has half a second to arrive, which a
    # busy server needs (with rate/5, 0.2 s, a 50/s run reached 92% of the rate, not 95%).
    block = max(1, math.ceil(rate / 2))
    # Capacity of one second's worth of calls (at least a block): slots free up continuously
    # at `rate` per second, and a burst never exceeds what the API accepts in a second.
    capacity = max(block, math.floor(rate))
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, capacity, slot_decay_per_second=rate)
        limit = client.read_global_concurrency_limit_by_name(name)
        if not limit.active:
            from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active=True))
    logger.info(
        "Pacing at %g calls/s across all runs of %s (global concurrency limit %r)",
        rate,
        profile.name,
        name,
    )
    return Pacer(acquire=SlotDispenser(name, rate, block))


log = logging.getLogger(__name__)

# Waits between tries of a failed slot request (transport error or 5xx): about 7.5 s in all.
SLOT_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)


class SlotDispenser:
    """Takes slots from the global limit `block` at a time and hands them out one by one, at
    most `rate` a second from this process.

    Why not `prefect.concurrency.sync.rate_limit(name, strict=True)` per call: measured here
    inside task runs, each of its calls took 1.8 s on average (it hops through Prefect's shared
    event loop, busy with every task run's events), so a 50/s profile ran at 5/s. This sends
    the same request to the same limit (`POST /v2/concurrency_limits/increment`, mode
    `rate_limit`) with the synchronous client, and honours the server's 423 + Retry-After the
    same way. A block of rate/2 slots needs about two requests a second; the next block is
    fetched in the background while the current one is spent, and the local spacing keeps a
    block from reaching the API as a burst. A fetch that fails on a transport error or a 5xx
    is retried (SLOT_RETRY_DELAYS); one that still fails fails only the callers waiting for
    that block, and the next caller fetches again."""

    def __init__(self, name: str, rate: float, block: int) -> None:
        self.name, self.block = name, block
        self._spacing = Spacing(rate)
        self._lock = threading.Lock()
        self._available = 0
        self._fetched = threading.Event()
        self._fetching = False
        self._error: BaseException | None = None

    def __call__(self) -> None:
        # One thread at a time refills; the others queue here.
        with self._lock:
            if self._available == 0:
                if not self._fetching:
                    self._prefetch()
                self._fetched.wait()
                self._fetching = False
                error, self._error = self._error, None
                if error is not None:
                    raise error
                self._available = self.block
                self._prefetch()  # the next block is on its way while this one is spent
            self._available -= 1
        self._spacing()

    def _prefetch(self) -> None:
        def fetch() -> None:
            try:
                self._take_block()
            except BaseException as err:  # handed to the caller that waits for this block
                self._error = err
            finally:
                self._fetched.set()

        self._fetched.clear()
        self._fetching = True
        threading.Thread(target=fetch, name=f"slots-{self.name}", daemon=True).start()

    def _take_block(self) -> None:
        """One block of slots. A transport error or a 5xx from the API is retried (a new
        client each time, after SLOT_RETRY_DELAYS), so one blip costs no caller its slot."""
        from httpx import HTTPStatusError, TransportError
        from prefect.client.orchestration import get_client

        delays = iter(SLOT_RETRY_DELAYS)
        while True:
            try:
                with get_client(sync_client=True) as client:
                    self._increment(client)
                return
            except (TransportError, ConnectionError, TimeoutError) as err:
                failure: BaseException = err
            except HTTPStatusError as err:
                if err.response.status_code < 500:
                    raise
                failure = err
            delay = next(delays, None)
            if delay is None:
                raise failure
            log.warning(
                "Slots of %s: the concurrency API failed (%s); retrying in %g s",
                self.name,
                type(failure).__name__,
                delay,
            )
            time.sleep(delay)

    def _increment(self, client: SyncPrefectClient) -> None:
        from httpx import HTTPStatusError

        while True:
            try:
                response = client.increment_concurrency_slots(
                    names=[self.name], slots=self.block, mode="rate_limit"
                )
            except HTTPStatusError as err:
                if err.response.status_code != 423:
                    raise
                # Clamped, as a Versori 429 is: an odd header never stalls pacing for long.
                wait = parse_retry_after(err.response.headers.get("Retry-After"))
                time.sleep(1.0 if wait is None else wait)
                continue
            if not response.json():  # strict: a limit that vanished is an error
                raise InputError(
                    f"the global concurrency limit {self.name!r} does not exist any more; "
                    "it is created at the start of each run"
                )
            return


def open_job(
    stack: ExitStack,
    profile: ConnectorProfile,
    ledger: Ledger,
    deliver: Delivery,
    templates: MailTemplates | None,
    concurrency: int,
    events: TenantEvents = TenantEvents.AUTO,
) -> OnboardingJob:
    """Everything a batch's tasks share: Versori client, SMTP sender when mail goes out, pacer,
    tenant events. Closed with `stack`."""
    from prefect.runtime import flow_run

    return OnboardingJob(
        profile=profile,
        client=stack.enter_context(open_client(concurrency, profile.api)),
        ledger=ledger,
        deliver=deliver,
        mailer=open_mailer(stack) if deliver.sends_email else None,
        templates=templates,
        run_id=flow_run.id,
        pacer=make_pacer(profile),
        on_status=stack.enter_context(TenantEventSender(events)),
    )


def effective_concurrency(profile: ConnectorProfile, asked: int) -> int:
    return min(asked, profile.max_concurrency) if profile.max_concurrency else asked


def open_client(concurrency: int, api: Api = "connect-v1") -> VersoriClient:
    """A Versori client from VERSORI_* settings, pooled for `concurrency` calls at once, for
    `api` (a profile's): unless VERSORI_BASE_URL is set, that API's production base URL."""
    versori = VersoriSettings()
    return VersoriClient(
        api=api,
        api_key=resolve_api_key(versori),
        base_url=versori.base_url if "base_url" in versori.model_fields_set else None,
        connect_timeout=versori.connect_timeout,
        read_timeout=versori.read_timeout,
        call_deadline=versori.call_deadline,
        max_connections=concurrency,
    )


def load_templates(profile: ConnectorProfile) -> MailTemplates:
    """The profile's email templates (its `email_templates` folder over the defaults)."""
    from onboarding.mail import MailTemplates

    return MailTemplates(Path(profile.email_templates) if profile.email_templates else None)


def open_mailer(stack: ExitStack) -> MailSender:
    """The SMTP sender from ONBOARD_SMTP_* settings, or, when ONBOARD_SMTP_HOST is not set, from
    the prefect-email EmailServerCredentials block named by ONBOARD_SMTP_BLOCK; closed with
    `stack`."""
    from onboarding.mail import MailSender, SmtpSettings

    settings = SmtpSettings()
    # Settings given directly win over a block name, as VERSORI_API_KEY wins over its block.
    use_block = bool(settings.block) and not settings.host
    sender = _sender_from_block(settings) if use_block else MailSender.from_settings(settings)
    return stack.enter_context(sender)


# ONBOARD_SMTP_SECURITY's values and prefect-email's SMTPType names, one for one, both ways:
# `smtp_block_of` writes a block with them, `_sender_from_block` reads one back.
SMTP_TYPES: dict[Security, str] = {"ssl": "SSL", "starttls": "STARTTLS", "none": "INSECURE"}


def smtp_block_of(settings: SmtpSettings, host: str) -> EmailServerCredentials:
    """A prefect-email EmailServerCredentials block holding `settings` (SMTP through `host`);
    its own `.save(name)` stores it."""
    from prefect_email import EmailServerCredentials

    password = settings.password.get_secret_value() if settings.password else None
    return EmailServerCredentials(
        smtp_server=host,
        smtp_port=settings.port,
        smtp_type=SMTP_TYPES[settings.security],
        username=settings.username,
        password=password,
    )


def _sender_from_block(settings: SmtpSettings) -> MailSender:
    from prefect_email import EmailServerCredentials

    from onboarding.mail import MailSender

    assert settings.block
    try:
        block = EmailServerCredentials.load(settings.block)
    except ValueError as err:
        raise InputError(
            f"ONBOARD_SMTP_BLOCK: no EmailServerCredentials block named {settings.block!r} "
            "(create it with `onboard blocks create` or in the Prefect UI)"
        ) from err
    kind = getattr(block.smtp_type, "name", str(block.smtp_type)).upper()
    security: Security = next((s for s, t in SMTP_TYPES.items() if t == kind), "starttls")
    password = block.password.get_secret_value() if block.password else None
    return MailSender(
        host=block.smtp_server,
        port=block.smtp_port,
        username=block.username,
        password=password,
        security=security,
        timeout=settings.timeout,
        email_from=settings.email_from or block.username,
        ca_file=settings.ca_file,
    )


class _DropRoutineTaskRunLogs(logging.Filter):
    """Drops the one INFO line per successful task run; retries and failures still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and str(record.msg).startswith("Finished in state Completed")
        )


@contextmanager
def quiet_routine_task_logs() -> Iterator[None]:
    """In a batch of thousands, that line costs CPU per tenant and buries the progress lines;
    the UI shows each task run's state without it."""
    logger = logging.getLogger("prefect.task_runs")
    routine = _DropRoutineTaskRunLogs()
    logger.addFilter(routine)
    try:
        yield
    finally:
        logger.removeFilter(routine)


class Progress:
    """A progress artifact and a log line that move as tenants finish, without flooding the API:
    at most one artifact update a second and one log line every 10% or 15 seconds."""

    def __init__(self, total: int, key_hint: str) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.failed = 0
        self._logger = get_run_logger()
        self._artifact_id: UUID = create_progress_artifact(  # type: ignore[assignment]  # sync
            progress=0.0, description=f"Tenants done for {key_hint}"
        )
        self._last_update = self._last_log = time.monotonic()
        self._last_logged_pct = 0.0

    def advance(self, failed: int = 0, count: int = 1) -> None:
        """`count` more tenants done, `failed` of them failed (a bool counts as 0 or 1)."""
        self.done += count
        self.failed += int(failed)
        now = time.monotonic()
        pct = 100.0 * self.done / self.total
        if now - self._last_update >= 1.0:
            update_progress_artifact(self._artifact_id, progress=min(pct, 100.0))
            self._last_update = now
        if pct - self._last_logged_pct >= 10 or now - self._last_log >= 15:
            self._logger.info(
                "%d/%d tenants done (%.0f%%), %d failed", self.done, self.total, pct, self.failed
            )
            self._last_log, self._last_logged_pct = now, pct

    def finish(self) -> None:
        update_progress_artifact(self._artifact_id, progress=100.0)
