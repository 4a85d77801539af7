"""Pull steps for prefect.yaml: where a worker's flow runs start."""

from __future__ import annotations

import os
from pathlib import Path

from onboarding.errors import InputError

PROJECT_DIR = Path(__file__).resolve().parent.parent


def set_project_dir() -> dict[str, str]:
    """Change to the worker's checkout of this project: ONBOARD_PROJECT_DIR if set, else the
    checkout this code was installed from (the one `uv sync` ran in). Prefect's own
    `set_working_directory` with an unset variable failed with `FileNotFoundError: ''`."""
    configured = os.environ.get("ONBOARD_PROJECT_DIR", "").strip()
    directory = Path(configured).expanduser() if configured else PROJECT_DIR
    if not (directory / "prefect.yaml").is_file():
        why = "is not a folder" if not directory.is_dir() else "has no prefect.yaml"
        source = "ONBOARD_PROJECT_DIR" if configured else "the installed project folder"
        raise InputError(
            f"{source} ({directory}) {why}: set ONBOARD_PROJECT_DIR in the worker's environment "
            "to its checkout of this project (the folder holding prefect.yaml)"
        )
    os.chdir(directory)
    return {"directory": os.getcwd()}
