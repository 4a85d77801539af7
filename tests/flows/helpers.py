"""What the flow tests share beside their fixtures (tests/flows/conftest.py): the summary, or
the error, a flow run ends with."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State


def summary_of(state: State[Any], raise_on_failure: bool = True) -> dict[str, Any]:
    """The summary dict a run of our flows holds. They return `State[dict[str, Any]]`, which the
    run unwraps: its result is that dict, a Failed run's too (with `raise_on_failure=False`)."""
    result = state.result(raise_on_failure=raise_on_failure)
    assert isinstance(result, dict), result
    return result


def error_of(state: State[Any]) -> Exception:
    """The exception a flow run stopped on, before it had a summary to end with."""
    result = state.result(raise_on_failure=False)
    assert isinstance(result, Exception), result
    return result
