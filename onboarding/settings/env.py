"""The base of every settings class: values read from the environment (and a .env file), a bad
one an InputError that names its variable."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from onboarding.errors import InputError, Problem

# What every error about a setting ends with.
ENV_HINT = "Set them in the environment or in .env."


class EnvSettings(BaseSettings):
    """Settings read from the environment (and a .env file). A value that does not pass its
    check is an InputError that names the variable and what is wrong, never the value (it may
    be a secret), instead of pydantic's traceback."""

    # What a problem is located in, as the error shows it.
    settings_source: ClassVar[str] = "environment"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise self.input_error(err) from None

    @classmethod
    def input_error(cls, err: ValidationError) -> InputError:
        problems = [
            Problem(cls.settings_source, None, cls.variable(e["loc"]), validation_reason(e))
            for e in err.errors()
        ]
        return InputError(problems, hint=ENV_HINT)

    @classmethod
    def variable(cls, loc: tuple[int | str, ...]) -> str:
        """The environment variable of the field at `loc`: its alias, or prefix and name."""
        name = str(loc[0]) if loc else ""
        info = cls.model_fields.get(name)
        if info is not None and isinstance(info.validation_alias, str):
            return info.validation_alias
        return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def validation_reason(error: Any) -> str:
    """What is wrong, in words: a validator's own message, or pydantic's."""
    cause = error.get("ctx", {}).get("error")
    return str(cause) if isinstance(cause, ValueError) else str(error["msg"])
