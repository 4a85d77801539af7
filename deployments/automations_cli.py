"""`onboard automations install`: the project's Prefect Automations on the tenant events
(`onboarding.tenant.<status>` about the resource `onboarding.tenant.<tenant_id>`, labelled
`onboarding.connector-id` and `onboarding.profile`; see onboarding/batch/tenant_events.py),
created or updated BY NAME, so that running it again leaves exactly one of each, changed in
place when an option changed (`prefect automation create --from-file` adds a copy each time):

- "onboarding: tenants failed in 10 minutes": `--failures` N `onboarding.tenant.failed` events
  within 10 minutes (a threshold event trigger), a notification through `--notify-block`; at
  most one such notification every 10 minutes;
- "onboarding: tenant connection broken": each `onboarding.tenant.broken` event, a
  notification through the same block;
- "onboarding: run a deployment for each connected tenant": each `onboarding.tenant.connected`
  event, a run of `--on-connected` with the tenant's `tenant_id`, `connector_id` and
  `connection_id` as parameters (Prefect's Jinja templating of the triggering event). Not on
  `activated`: that is `onboard sync` seeing the same connection later, and the deployment
  would run twice for most tenants.

The block and the deployment are resolved to their ids when installing (an unknown one exits 2,
naming the option). Registered on the main `onboard` app by deployments/cli.py; it imports
Prefect only when a command runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import typer
from rich.console import Console

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import Automation, AutomationCore, EventTrigger

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_BAD_INPUT = 2
EXIT_API_ERROR = 1

# Every name starts so: recognisably ours in the UI, and what `install` looks up.
PREFIX = "onboarding: "
FAILURES_NAME = f"{PREFIX}tenants failed in 10 minutes"
BROKEN_NAME = f"{PREFIX}tenant connection broken"
CONNECTED_NAME = f"{PREFIX}run a deployment for each connected tenant"
# The names examples/automations.yaml used before this command: told about if still there.
OLD_EXAMPLE_NAMES = ("onboarding-tenant-failed", "onboarding-tenant-connected")
TAGS = ["onboarding"]
FAILURES_WINDOW = timedelta(minutes=10)
DEFAULT_FAILURES = 5
TENANT_RESOURCES = "onboarding.tenant.*"
# The deployment's run gets these parameters; its flow must take them.
FOLLOW_UP_PARAMETERS = ("tenant_id", "connector_id", "connection_id")
# A label the connected event may carry (onboarding/batch/tenant_events.py does not send it
# yet): the run's connection_id is None without it.
CONNECTION_LABEL = "onboarding.connection-id"
# The API's largest page (PREFECT_API_DEFAULT_LIMIT).
PAGE = 200

# Jinja expressions on the triggering event (Prefect renders them when the action runs).
TENANT = "event.resource['prefect.resource.name']"
CONNECTOR = "event.resource['onboarding.connector-id']"
PROFILE = "event.resource['onboarding.profile']"
ERROR_CODE = "event.payload.error_code"
CONNECTION = f"event.resource.get('{CONNECTION_LABEL}')"


def _j(expression: str) -> str:
    return "{{ " + expression + " }}"


class OptionError(Exception):
    """A bad option value: its message names the option (exit 2)."""


@dataclass(frozen=True)
class NotifyBlock:
    id: UUID
    name: str
    type_slug: str

    @property
    def ref(self) -> str:
        return f"{self.type_slug}/{self.name}"


@dataclass(frozen=True)
class FollowUp:
    id: UUID
    name: str  # flow/deployment


# --- what is installed -------------------------------------------------------------------------


def failures_automation(block_id: UUID, failures: int) -> AutomationCore:
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=FAILURES_NAME,
        description=(
            f"{failures} tenants failed (onboarding.tenant.failed) within 10 minutes: a "
            "notification, at most one every 10 minutes. Installed by `onboard automations "
            "install`; run it again to change this automation."
        ),
        enabled=True,
        tags=TAGS,
        trigger=EventTrigger(
            expect={"onboarding.tenant.failed"},
            match={"prefect.resource.id": TENANT_RESOURCES},
            for_each=set(),
            posture=Posture.Reactive,
            threshold=failures,
            within=FAILURES_WINDOW,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=f"Onboarding: {failures} tenants failed within 10 minutes",
                body=(
                    f"{failures} tenants failed to onboard within 10 minutes "
                    "(onboarding.tenant.failed events). The latest: tenant "
                    f"{_j(TENANT)}, profile {_j(PROFILE)}, connector {_j(CONNECTOR)}, "
                    f"error {_j(ERROR_CODE)}.\n"
                    "`onboard status` counts the tenants by status; `onboard export` has "
                    "each tenant's error. This alert fires at most once every 10 minutes."
                ),
            )
        ],
        actions_on_trigger=[],
        actions_on_resolve=[],
    )


def broken_automation(block_id: UUID) -> AutomationCore:
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore

    return AutomationCore(
        name=BROKEN_NAME,
        description=(
            "Each onboarding.tenant.broken event (a tenant's connection whose credential "
            "lists errors or has expired): a notification. Installed by `onboard automations "
            "install`; run it again to change this automation."
        ),
        enabled=True,
        tags=TAGS,
        trigger=_each("onboarding.tenant.broken"),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=f"Onboarding: tenant {_j(TENANT)}'s connection is broken",
                body=(
                    f"Tenant {_j(TENANT)}'s connection (profile {_j(PROFILE)}, connector "
                    f"{_j(CONNECTOR)}) is broken: {_j(ERROR_CODE)}. Its credential lists "
                    "errors or has expired: the tenant's admin has to connect again.\n"
                    "`onboard status` counts the broken tenants; `onboard export` has each "
                    "one's error."
                ),
            )
        ],
        actions_on_trigger=[],
        actions_on_resolve=[],
    )


def connected_automation(deployment: FollowUp) -> AutomationCore:
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore

    return AutomationCore(
        name=CONNECTED_NAME,
        description=(
            f"Each onboarding.tenant.connected event: a run of {deployment.name} with the "
            "tenant's tenant_id, connector_id and connection_id (None when the event does not "
            f"carry the {CONNECTION_LABEL} label). Installed by `onboard automations install "
            "--on-connected`; run it again to change this automation."
        ),
        enabled=True,
        tags=TAGS,
        trigger=_each("onboarding.tenant.connected"),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=deployment.id,
                parameters={
                    "tenant_id": _j(TENANT),
                    "connector_id": _j(CONNECTOR),
                    "connection_id": _j(CONNECTION),
                },
                job_variables=None,
                schedule_after=timedelta(0),
            )
        ],
        actions_on_trigger=[],
        actions_on_resolve=[],
    )


def _each(event: str) -> EventTrigger:
    """A trigger that fires at once for every `event` about a tenant."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    return EventTrigger(
        expect={event},
        match={"prefect.resource.id": TENANT_RESOURCES},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )


# --- resolving the options ---------------------------------------------------------------------


def notify_blocks(client: SyncPrefectClient) -> list[NotifyBlock]:
    """Every named block document whose block type can notify (the "notify" capability):
    Slack, email, custom webhook, Microsoft Teams..."""
    from prefect.client.schemas.objects import BlockDocument

    found: list[NotifyBlock] = []
    offset = 0
    while True:
        response = client.request(
            "POST",
            "/block_documents/filter",
            json={
                "block_documents": {"is_anonymous": {"eq_": False}},
                "block_schemas": {"block_capabilities": {"all_": ["notify"]}},
                "include_secrets": False,
                "offset": offset,
                "limit": PAGE,
            },
        )
        page = BlockDocument.model_validate_list(response.json())
        for doc in page:
            slug = doc.block_type.slug if doc.block_type else str(doc.block_type_name)
            found.append(NotifyBlock(doc.id, str(doc.name), slug))
        if len(page) < PAGE:
            return sorted(found, key=lambda b: (b.name, b.type_slug))
        offset += PAGE


def resolve_notify_block(client: SyncPrefectClient, given: str) -> NotifyBlock:
    """The notification block `given` names: NAME, or TYPE/NAME (a block type's slug, e.g.
    slack-webhook/alerts) when several types have a block of that name."""
    blocks = notify_blocks(client)
    slug, _, name = given.rpartition("/")
    matches = [b for b in blocks if b.name == name and (not slug or b.type_slug == slug)]
    if len(matches) == 1:
        return matches[0]
    existing = ", ".join(b.ref for b in blocks) or "none"
    if matches:
        raise OptionError(
            f"--notify-block: {given!r} names {len(matches)} notification blocks "
            f"({', '.join(b.ref for b in matches)}): give it as TYPE/NAME"
        )
    other = _other_blocks_named(client, name)
    hint = (
        f" (a block named {name!r} exists, of type {', '.join(other)}, which cannot send "
        "notifications)"
        if other
        else ""
    )
    raise OptionError(
        f"--notify-block: no notification block named {given!r}{hint}. "
        f"Notification blocks on this server: {existing}. Create one in the UI (Blocks: "
        "Slack Webhook, Custom Webhook, SendGrid Email...) or with its block class's .save(NAME)."
    )


def _other_blocks_named(client: SyncPrefectClient, name: str) -> list[str]:
    from prefect.client.schemas.objects import BlockDocument

    response = client.request(
        "POST",
        "/block_documents/filter",
        json={"block_documents": {"name": {"any_": [name]}}, "include_secrets": False},
    )
    docs = BlockDocument.model_validate_list(response.json())
    return sorted({d.block_type.slug if d.block_type else str(d.block_type_name) for d in docs})


def check_deployment_name(given: str) -> None:
    flow, slash, deployment = given.partition("/")
    if not (flow and slash and deployment) or "/" in deployment:
        raise OptionError(
            f"--on-connected: {given!r} is not FLOW/DEPLOYMENT (e.g. provision-tenant/default; "
            "`prefect deployment ls` lists them)"
        )


def resolve_deployment(client: SyncPrefectClient, given: str) -> FollowUp:
    """The deployment `given` names (flow/deployment), whose flow must take the parameters
    the automation passes: otherwise every run it starts would fail."""
    from prefect.exceptions import ObjectNotFound

    check_deployment_name(given)
    try:
        deployment = client.read_deployment_by_name(given)
    except ObjectNotFound:
        raise OptionError(
            f"--on-connected: no deployment named {given!r} on this server "
            "(`prefect deployment ls` lists them)"
        ) from None
    schema = deployment.parameter_openapi_schema or {}
    if "properties" in schema:
        missing = [p for p in FOLLOW_UP_PARAMETERS if p not in schema["properties"]]
        if missing:
            raise OptionError(
                f"--on-connected: the flow of deployment {given!r} has no parameter "
                f"{', '.join(missing)}; it must take tenant_id, connector_id and connection_id "
                "(str | None = None), which each connected tenant's run is given"
            )
    return FollowUp(deployment.id, given)


# --- installing --------------------------------------------------------------------------------


@dataclass
class Step:
    """What `install` does (or, in a dry run, would do) to one automation."""

    name: str
    action: str  # create, update, unchanged
    desired: AutomationCore
    id: UUID | None = None
    changed: list[str] = field(default_factory=list)
    duplicates: list[UUID] = field(default_factory=list)
    kept_paused: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "id": str(self.id) if self.id else None,
            "changed": self.changed,
            "duplicates": [str(d) for d in self.duplicates],  # deleted (in a dry run: would be)
            "kept_paused": self.kept_paused,
            "definition": self.desired.model_dump(mode="json"),
        }


# Compared between what is installed and what is wanted: `enabled` is left as it is (a
# paused automation stays paused).
COMPARED = (
    "description",
    "tags",
    "trigger",
    "actions",
    "actions_on_trigger",
    "actions_on_resolve",
)
# Sets in a trigger, which JSON makes lists in no particular order.
SET_FIELDS = ("expect", "after", "for_each")


def _comparable(automation: AutomationCore) -> dict[str, Any]:
    dumped = automation.model_dump(mode="json")
    trigger = dumped.get("trigger")
    if isinstance(trigger, dict):
        for key in SET_FIELDS:
            if isinstance(trigger.get(key), list):
                trigger[key] = sorted(trigger[key])
    return {key: dumped.get(key) for key in COMPARED}


def _fully_set(automation: AutomationCore) -> AutomationCore:
    """The same automation with every field, nested ones too, counted as set: the client's
    update_automation sends only the fields set (exclude_unset), and a freshly built action
    would go without its `type`, which the API needs to tell the actions apart. All but
    `owner_resource`, which the API's update refuses (and these have none)."""
    from prefect.events.schemas.automations import AutomationCore

    dumped = automation.model_dump(mode="json", exclude={"owner_resource"})
    return AutomationCore.model_validate(dumped)


def plan_step(client: SyncPrefectClient, desired: AutomationCore) -> Step:
    found: list[Automation] = client.read_automations_by_name(desired.name)
    # read_automations_by_name sorts by the latest update first: that one is kept.
    if not found:
        return Step(desired.name, "create", _fully_set(desired))
    keep, *extra = found
    wanted = _fully_set(desired.model_copy(update={"enabled": keep.enabled}))
    have, want = _comparable(keep), _comparable(wanted)
    changed = [key for key in COMPARED if have[key] != want[key]]
    return Step(
        desired.name,
        "update" if changed else "unchanged",
        wanted,
        id=keep.id,
        changed=changed,
        duplicates=[a.id for a in extra],
        kept_paused=not keep.enabled,
    )


def apply_step(client: SyncPrefectClient, step: Step) -> None:
    if step.action == "create":
        step.id = client.create_automation(step.desired)
    elif step.action == "update":
        assert step.id is not None
        client.update_automation(step.id, step.desired)
    for duplicate in step.duplicates:
        client.delete_automation(duplicate)


@dataclass
class Plan:
    api: str
    steps: list[Step]
    skipped: list[dict[str, str]]
    notes: list[str]
    block: NotifyBlock | None = None
    deployment: FollowUp | None = None

    def summary(self, dry_run: bool) -> dict[str, Any]:
        return {
            "dry_run": dry_run,
            "api": self.api,
            "notify_block": (
                {"name": self.block.name, "type": self.block.type_slug, "id": str(self.block.id)}
                if self.block
                else None
            ),
            "on_connected": (
                {"name": self.deployment.name, "id": str(self.deployment.id)}
                if self.deployment
                else None
            ),
            "automations": [step.summary() for step in self.steps],
            "skipped": self.skipped,
            "notes": self.notes,
        }


def make_plan(
    client: SyncPrefectClient,
    api: str,
    notify_block: str | None,
    on_connected: str | None,
    failures: int,
) -> Plan:
    """Options resolved, and what to do to each automation; nothing written."""
    desired: list[AutomationCore] = []
    skipped: list[dict[str, str]] = []
    block = deployment = None
    if notify_block is not None:
        block = resolve_notify_block(client, notify_block)
        desired += [failures_automation(block.id, failures), broken_automation(block.id)]
    else:
        why = "no --notify-block: the alerts need a notification block to send through"
        skipped += [{"name": FAILURES_NAME, "reason": why}, {"name": BROKEN_NAME, "reason": why}]
    if on_connected is not None:
        deployment = resolve_deployment(client, on_connected)
        desired.append(connected_automation(deployment))
    else:
        skipped.append({"name": CONNECTED_NAME, "reason": "no --on-connected"})
    notes = []
    for skip in skipped:
        existing = client.read_automations_by_name(skip["name"])
        if existing:
            skip["reason"] += "; the one installed before is left as it was"
    for old in OLD_EXAMPLE_NAMES:
        for automation in client.read_automations_by_name(old):
            notes.append(
                f"An automation {old!r} (from the old examples/automations.yaml) is still "
                f"there (id {automation.id}): delete it if these replace it "
                f"(`prefect automation delete --id {automation.id}`)."
            )
    steps = [plan_step(client, automation) for automation in desired]
    return Plan(api, steps, skipped, notes, block, deployment)


# --- the command -------------------------------------------------------------------------------

automations_app = typer.Typer(
    help="Prefect Automations on the tenant events, installed by name.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_enable=False,
)


@automations_app.callback()
def _automations() -> None:
    """Prefect Automations on the tenant events (`onboarding.tenant.<status>`): alerts on
    failures and broken connections, a deployment run for each connected tenant."""


@automations_app.command()
def install(
    notify_block: Annotated[
        str | None,
        typer.Option(
            "--notify-block",
            metavar="NAME",
            help="A notification block's name (any type: Slack webhook, email, custom "
            "webhook...; TYPE/NAME when several types have one of that name). Without it, "
            "the two alerts are not installed.",
        ),
    ] = None,
    on_connected: Annotated[
        str | None,
        typer.Option(
            "--on-connected",
            metavar="DEPLOYMENT",
            help="flow/deployment to run for each connected tenant, with tenant_id, "
            "connector_id and connection_id as parameters.",
        ),
    ] = None,
    failures: Annotated[
        int,
        typer.Option(
            "--failures",
            min=1,
            metavar="N",
            help="The failures alert fires when this many tenants fail within 10 minutes.",
        ),
    ] = DEFAULT_FAILURES,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print what would be created or updated; write nothing."),
    ] = False,
) -> None:
    """Create or update, by name, the Automations on the tenant events: an alert when
    --failures tenants fail within 10 minutes and one for each broken connection (both
    through --notify-block), and a run of --on-connected for each connected tenant. Run it
    again to change them: there is only ever one of each."""
    try:
        _install(notify_block, on_connected, failures, dry_run)
    except OptionError as error:
        err.print(f"Bad option: {error}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _install(
    notify_block: str | None, on_connected: str | None, failures: int, dry_run: bool
) -> None:
    if notify_block is None and on_connected is None:
        raise OptionError(
            "nothing to install: give --notify-block NAME (the failure and broken-connection "
            "alerts) and/or --on-connected FLOW/DEPLOYMENT (a run for each connected tenant)"
        )
    if on_connected is not None:
        check_deployment_name(on_connected)
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value() or "").rstrip("/")
    if not api:
        raise OptionError(
            "PREFECT_API_URL is not set: Automations live on a Prefect server (or Prefect "
            "Cloud). Start one (`uv run prefect server start`) and `export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    try:
        with get_client(sync_client=True) as client:
            plan = make_plan(client, api, notify_block, on_connected, failures)
            if not dry_run:
                for step in plan.steps:
                    apply_step(client, step)
    except httpx.HTTPStatusError as error:
        detail = error.response.text[:1000]
        err.print(
            f"The Prefect API at {api} refused a request ({error.response.status_code}): {detail}",
            markup=False,
        )
        raise typer.Exit(EXIT_API_ERROR) from None
    except httpx.HTTPError as error:
        raise OptionError(
            f"cannot reach the Prefect API at {api} ({type(error).__name__}); is the server "
            "running, and is PREFECT_API_URL right?"
        ) from None
    if dry_run:
        typer.echo(json.dumps(plan.summary(dry_run=True), indent=2))
        return
    _report(plan)


def _report(plan: Plan) -> None:
    done = {"create": "created", "update": "updated", "unchanged": "unchanged"}
    out.print(f"Automations on {plan.api}:", markup=False)
    for step in plan.steps:
        line = f"  {done[step.action]:<9} {step.name!r} (id {step.id})"
        if step.changed:
            line += f": {', '.join(step.changed)}"
        if step.kept_paused:
            line += "; it is paused, and stays so (resume it in the UI)"
        if step.duplicates:
            line += f"; deleted {len(step.duplicates)} duplicate(s) of the same name"
        out.print(line, markup=False)
    for skip in plan.skipped:
        out.print(f"  skipped   {skip['name']!r}: {skip['reason']}", markup=False)
    for note in plan.notes:
        out.print(note, markup=False)
