"""A run's parameters, as a flow receives them, turned into the core's checked run inputs
(onboarding.inputs.run_request): what only the flow layer knows is settled here first (a roster kept
in a Secret block, the folder a deployment's run may read, whether a server keeps the run's
parameters). A run the CLI starts in its own process is given the inputs the CLI checked
(`given_inputs`); any other run checks its own."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from prefect.context import FlowRunContext
from prefect.runtime import deployment

from flows.running.server import on_temporary_server
from onboarding.batch.delivery import Delivery
from onboarding.batch.run_request import RosterPart, RunInputs, RunRequest, check_run
from onboarding.errors import InputError
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.inputs.roster import TenantRow
from onboarding.settings import Settings, files_root

SECRET_ROSTER = "secret:"


def profile_paths(profile: str | Sequence[str]) -> list[str]:
    """The profile paths a run was given: one (a str), or several for a campaign."""
    paths = [profile] if isinstance(profile, str) else list(profile)
    if not paths:
        raise InputError("profile: give at least one connector profile")
    return paths


def connector_label(profiles: Sequence[ConnectorProfile]) -> str:
    """The connectors as people read them and as the ledger and files name them: 'acme-crm
    (Acme CRM)', each profile's name with its display name (when it differs), for run names,
    artifacts and logs."""
    return " + ".join(
        p.name if p.display_name == p.name else f"{p.name} ({p.display_name})" for p in profiles
    )


def connectors_of(profile: str | Sequence[str] | None, settings: Settings) -> str:
    """A run's connectors named by connector_label, for its run name; a profile that does not
    load is named by its file (the flow itself reports a bad profile: the name must not fail
    first)."""
    paths = [profile] if isinstance(profile, str) else list(profile or [])
    try:
        return connector_label([load_profile(p, root=run_files_root(settings)) for p in paths])
    except Exception:
        return " + ".join(Path(str(p)).stem for p in paths)


def run_files_root(settings: Settings) -> Path | None:
    """Local paths of a run started through a deployment (by whoever may call it) must lie in
    ONBOARD_FILES_ROOT; a run started by hand reads any path its user can."""
    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        return files_root(context.flow_run.deployment_id is not None, settings)
    # Naming a run: its context is not set yet.
    return files_root(deployment.id is not None, settings)


def roster_location(roster: str) -> str:
    """Where to read the roster from. `secret:<name>` reads it from the Prefect Secret block of
    that name: the way to pass a URL that carries a credential (a signed URL, a token), which
    as a flow parameter a Prefect server keeps, and shows, in clear."""
    if not roster.startswith(SECRET_ROSTER):
        return roster
    from prefect.blocks.system import Secret

    name = roster.removeprefix(SECRET_ROSTER)
    try:
        return str(Secret.load(name).get())  # type: ignore[union-attr]  # sync call
    except ValueError as err:
        raise InputError(
            f"roster {roster}: no Secret block named {name!r}; create it in the Prefect UI "
            "(Blocks, Secret) with the roster URL as its value"
        ) from err


def run_request(
    profile: str | Sequence[str],
    roster: str | None = None,
    tenants: Sequence[TenantRow] | None = None,
    only: Sequence[str] | None = None,
    deliver: Delivery = Delivery.STORE,
    dry_run: bool = False,
    *,
    reminders: bool = False,
    chunked: bool = False,
    part: RosterPart | None = None,
    settings: Settings,
) -> RunRequest:
    """The core's request for a run with these parameters (a `secret:` roster read here), under
    the run's `settings`."""
    if roster is not None and tenants is not None:
        raise InputError("give either `roster` (a file or URL) or `tenants` (inline), not both")
    return RunRequest(
        profiles=tuple(profile_paths(profile)),
        roster=roster_location(roster) if roster is not None else None,
        tenants=tuple(tenants) if tenants is not None else None,
        only=tuple(only) if only else None,
        deliver=deliver,
        dry_run=dry_run,
        reminders=reminders,
        chunked=chunked,
        # A URL read from a Secret block was never a parameter.
        keeps_parameters=not on_temporary_server() and not (roster or "").startswith(SECRET_ROSTER),
        root=run_files_root(settings),
        part=part,
    )


class HandOffError(RuntimeError):
    """The inputs given to a run (`given_inputs`) were checked for another request: a bug in
    whoever started it, not bad input."""


@dataclass
class _Given:
    inputs: RunInputs
    taken: bool = False


# The inputs the CLI checked, for the one flow run it starts in this process. A ContextVar, set
# around the flow's call: Prefect runs a sync flow called in-process (`run_here`) in the
# caller's thread and context (flow_engine.run_flow_sync), so the flow's body sees it.
_GIVEN: contextvars.ContextVar[_Given | None] = contextvars.ContextVar(
    "given_run_inputs", default=None
)


@contextmanager
def given_inputs(inputs: RunInputs) -> Iterator[None]:
    """Give `inputs`, checked by the caller, to the flow run started in this block (in this
    process and context): its `run_inputs` takes them, once, instead of checking (reading each
    profile, downloading a roster URL) again. A flow run started any other way checks its own."""
    token = _GIVEN.set(_Given(inputs))
    try:
        yield
    finally:
        _GIVEN.reset(token)


def run_inputs(request: RunRequest, settings: Settings) -> RunInputs:
    """The checked inputs: those given for this run (`given_inputs`), else checked now under
    the run's `settings`. Inputs given for another request are a HandOffError, never a
    silent second check."""
    given = _GIVEN.get()
    if given is None or given.taken:
        return check_run(request, settings)
    if given.inputs.request != request:
        # The fields' names only: a roster URL may carry a credential, tenants are people.
        differ = [
            f.name
            for f in fields(RunRequest)
            if getattr(given.inputs.request, f.name) != getattr(request, f.name)
        ]
        raise HandOffError(
            "the run was given inputs checked for another request (they differ in "
            f"{', '.join(differ)}): a bug in what started the run"
        )
    given.taken = True
    return given.inputs
