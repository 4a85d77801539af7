"""Property tests (Hypothesis) over the roster and profile parsers: whatever the bytes, loading
ends in a value or an InputError, never another exception, never a hang (issue 10).

Each generated input is written to a real file and loaded the way a run loads it. The inputs
mix structured documents (JSON, JSON Lines, YAML, CSV of generated rows, then cut short or with
characters inserted), a soup of the formats' own tokens (anchors, aliases, tags, brackets,
quotes, BOMs, NULs) and arbitrary bytes. Roster URLs are fuzzed too, with no host allowed, so
every one must be refused before any connection.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onboarding.errors import InputError
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.inputs.roster import display_source, load_roster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUNS: Counter[str] = Counter()  # examples run, by property test

# Examples per test: 150 roster files, 200 profile files, 500 roster URLs (850 in all; they
# were 1,000, 1,500 and 500, then 400, 600 and 500: the roster test alone took 16 s of the
# suite, most of it Hypothesis drawing the inputs). Each run draws new ones (database=None), so
# CI covers more of the space run after run.
ROSTER_FILES, PROFILE_FILES, ROSTER_URLS = 150, 200, 500
FUZZ = settings(
    max_examples=PROFILE_FILES,
    deadline=timedelta(seconds=2),  # one input taking longer is a failure: no hangs
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TOKENS = [
    "&a ",
    "*a",
    "&b ",
    "*b",
    "<<: ",
    "!!python/object:os.system ",
    "!!binary ",
    "!!set ",
    "!tag ",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "? ",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "'",
    '"',
    "#",
    "\n",
    "  ",
    "\t",
    "\r\n",
    "\\",
    "\x00",
    "\ufeff",
    "\ud800",
    "~",
    "null",
    "true",
    "1e999",
    "0x1F",
    "12:30:00",
    "2024-13-45",
    "9" * 5000,
    "tenants",
    "tenant_id",
    "name",
    "admin_email",
    "subdomain",
    "region",
    "t1",
    "..",
    "/",
    "?",
    "%2e",
    "a@x.com",
    "Acme",
    "organisation_id",
    "01M8F12B95S4BX0QFB3TPDWZ0P",
    "authorize_url",
    "https://{subdomain}.example.com/{region}/auth",
    "additional_params",
    "scopes",
    "link_ttl_hours",
    "email_templates",
    "../../etc",
    "{admin_email}",
    "{0}",
    "{x!r}",
]
token_soup = st.lists(st.sampled_from(TOKENS) | st.text(max_size=8), max_size=60).map("".join)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
row_keys = st.sampled_from(["tenant_id", "name", "admin_email", "subdomain", "region"]) | st.text(
    max_size=10
)
rows = st.lists(st.dictionaries(row_keys, values, max_size=6), max_size=6)


def serialise(fmt: str, data: Any) -> str:
    if fmt == "json":
        return json.dumps(data)
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in data) if isinstance(data, list) else ""
    if fmt == "yaml":
        return yaml.safe_dump(data, allow_unicode=True)
    if not isinstance(data, list) or not data:
        return ""
    columns = list(dict.fromkeys(str(k) for row in data if isinstance(row, dict) for k in row))
    lines = [",".join(columns)]
    for row in data:
        cells = row.values() if isinstance(row, dict) else [row]
        lines.append(",".join(str(c) for c in cells))
    return "\n".join(lines) + "\n"


@st.composite
def mangled(draw: st.DrawFn, text: str) -> str:
    """The text, maybe cut short and maybe with a token or two inserted."""
    if text and draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
    return text


@st.composite
def documents(draw: st.DrawFn, fmt: str, data: st.SearchStrategy[Any]) -> bytes:
    kind = draw(st.sampled_from(["structured", "soup", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    text = draw(token_soup) if kind == "soup" else draw(mangled(serialise(fmt, draw(data))))
    encoded = text.encode("utf-8", "surrogatepass")
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + encoded


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    # Module-scoped: Hypothesis runs many examples within one call of a test function.
    with tempfile.TemporaryDirectory(prefix="fuzz-") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def profiles() -> list[ConnectorProfile]:
    example = load_profile(EXAMPLES / "profile.yaml")
    in_path = example.model_copy(
        update={"authorize_url": "https://{subdomain}.example.com/t/{region}/{tenant_id}/auth"}
    )
    return [example, in_path]


# What each property test asks Hypothesis for; each must run at least half of it (`ran_enough`):
# fewer, and its strategy mostly made inputs Hypothesis threw away, or it stopped early, and the
# test proved little. Checked in each test's own teardown, so it holds in any order (xdist).
ASKED = {
    "test_any_roster_file_loads_or_is_an_input_error": ROSTER_FILES,
    "test_any_profile_file_loads_or_is_an_input_error": PROFILE_FILES,
    "test_any_roster_url_is_refused_before_a_connection": ROSTER_URLS,
}


@pytest.fixture(autouse=True)
def ran_enough(request: pytest.FixtureRequest) -> Iterator[None]:
    name = request.node.originalname
    before = RUNS[name]
    yield
    if name in ASKED:
        ran = RUNS[name] - before
        assert ran >= ASKED[name] // 2, f"{name} ran {ran} examples of the {ASKED[name]} asked"


def test_every_property_test_is_held_to_its_examples() -> None:
    given_tests = {
        n for n, f in globals().items() if n.startswith("test_") and hasattr(f, "hypothesis")
    }
    assert given_tests == set(ASKED)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fuzzed URL may reach the network: any connection attempt by the test's thread or a
    roster download's fails the test. Other threads (the session's Prefect server, starting in
    the background, polls itself) connect as usual."""
    real = socket.create_connection
    test_thread = threading.get_ident()

    def refuse(*args: Any, **kwargs: Any) -> socket.socket:
        thread = threading.current_thread()
        if thread.ident == test_thread or thread.name == "roster-download":
            raise AssertionError(f"a connection was attempted: {args!r}")
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("ONBOARD_ROSTER_ALLOWED_HOSTS", raising=False)


@st.composite
def roster_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".csv", ".json", ".jsonl", ".yaml", ".yml"]))
    fmt = {".yml": "yaml"}.get(suffix, suffix[1:])
    wrapped = rows.map(lambda r: {"tenants": r}) if fmt in ("json", "yaml") else rows
    data = st.one_of(rows, wrapped, values) if fmt != "csv" else rows
    return suffix, draw(documents(fmt, data))


@settings(FUZZ, max_examples=ROSTER_FILES)  # each loads, checks and renders: the dearest
@given(case=roster_inputs(), which=st.integers(0, 2))
def test_any_roster_file_loads_or_is_an_input_error(
    folder: Path, profiles: list[ConnectorProfile], case: tuple[str, bytes], which: int
) -> None:
    suffix, content = case
    path = folder / f"roster{suffix}"
    path.write_bytes(content)
    profile = profiles[which] if which < len(profiles) else None
    RUNS["test_any_roster_file_loads_or_is_an_input_error"] += 1
    try:
        roster = load_roster(path, profile)
        assert len(list(roster)) == len(roster)
    except InputError as err:
        assert str(path) in str(err) or not err.problems[0].source


profile_keys = st.sampled_from(
    [
        "name",
        "organisation_id",
        "connector_id",
        "credential_id",
        "client_id",
        "authorize_url",
        "scopes",
        "prompt",
        "additional_params",
        "link_ttl_hours",
        "rate_limit_per_second",
        "max_concurrency",
        "email_templates",
        "disable_offline_access",
        "credential_organisation_id",
    ]
) | st.text(max_size=10)
profile_values = (
    values
    | st.sampled_from(TOKENS)
    | st.sampled_from(
        ["01M8F12B95S4BX0QFB3TPDWZ0P", "https://{subdomain}.example.com/auth", "login_hint={x}"]
    )
)
profile_data = st.dictionaries(profile_keys, profile_values, max_size=10) | values


@FUZZ
@given(content=documents("yaml", profile_data), suffix=st.sampled_from([".yaml", ".yml", ".ini"]))
def test_any_profile_file_loads_or_is_an_input_error(
    folder: Path, content: bytes, suffix: str
) -> None:
    path = folder / f"profile{suffix}"
    path.write_bytes(content)
    RUNS["test_any_profile_file_loads_or_is_an_input_error"] += 1
    try:
        load_profile(path)
    except InputError as err:
        assert all(p.source == str(path) for p in err.problems)


@settings(FUZZ, max_examples=ROSTER_URLS)
@given(
    url=st.builds(
        "{}{}".format,
        st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "file://", "http://[", ""]),
        st.text(max_size=40) | token_soup,
    )
)
def test_any_roster_url_is_refused_before_a_connection(url: str) -> None:
    RUNS["test_any_roster_url_is_refused_before_a_connection"] += 1
    display_source(url)  # a label never fails
    if "://" not in url:
        return
    with pytest.raises(InputError):
        load_roster(url)
