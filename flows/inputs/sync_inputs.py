"""A sync's inputs, checked as a run's are (onboarding.batch.run_request) but for what a sync
needs: the environment, each profile (read once, each connector once, within
ONBOARD_FILES_ROOT for a deployment's run) and an API key. No roster and no mail: a sync
reads the tenants from the ledger, and a dry run reads Versori too, so it needs the key."""

from __future__ import annotations

from collections.abc import Sequence

from flows.inputs.parameters import profile_paths, run_files_root
from onboarding.batch.run_request import check_api_key_is_set, check_environment
from onboarding.errors import InputError
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.settings import Settings


def sync_profiles(profile: str | Sequence[str], settings: Settings) -> list[ConnectorProfile]:
    """The profiles a sync was given (one path, or several), checked under the run's
    `settings`; an InputError names what to fix: a variable, a profile's file and line, a
    connector named twice, a missing API key."""
    paths = profile_paths(profile)
    check_environment(settings)
    root = run_files_root(settings)
    profiles = [load_profile(path, root=root) for path in paths]
    first: dict[str, str] = {}
    for path, loaded in zip(paths, profiles, strict=True):
        if loaded.target_id in first:
            raise InputError(
                f"profile {path}: names connector {loaded.target_id}, as "
                f"{first[loaded.target_id]} does; give each connector once"
            )
        first[loaded.target_id] = path
    check_api_key_is_set(settings.versori)
    return profiles
