"""Connector profiles: loading, templating (always URL-encoded), and located problems."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from onboarding.constants import RESERVED_QUERY_KEYS
from onboarding.errors import InputError, Problem
from onboarding.inputs.profile import ConnectorProfile, load_profile, template_fields

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "profile.yaml"

ORG = "01M8F12B95S4BX0QFB3TPDWZ0P"
CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"
CREDENTIAL = "01M8F12B95S4BX0QFB3TPDWZ0R"
OTHER_ORG = "01J9Z6ZQ7T8KX3N5V2W4Y6A8C0"

# Line numbers matter below: each key sits on the line noted at its right.
BASE = f"""\
name: Test Profile
organisation_id: {ORG}
connector_id: {CONNECTOR}
credential_id: {CREDENTIAL}
client_id: the-client
authorize_url: https://{{subdomain}}.example.com/oauth/authorize
scopes: [read, write]
prompt: consent
additional_params:
  login_hint: "{{admin_email}}"
link_ttl_hours: 24
"""
LINE = {
    "name": 1,
    "organisation_id": 2,
    "connector_id": 3,
    "credential_id": 4,
    "client_id": 5,
    "authorize_url": 6,
    "scopes": 7,
    "prompt": 8,
    "additional_params": 9,
    "link_ttl_hours": 11,
}

TENANT = {
    "tenant_id": "t1",
    "name": "Acme",
    "admin_email": "a+b@x.com",
    "subdomain": "acme-corp",
}


def write(tmp_path: Path, text: str, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def replace_line(key: str, new: str) -> str:
    """BASE with the line of `key` replaced by `new` (which may span several lines)."""
    lines = BASE.splitlines()
    lines[LINE[key] - 1] = new
    return "\n".join(lines) + "\n"


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(InputError) as info:
        load_profile(path)
    return info.value.problems


def only_problem(path: Path) -> Problem:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


def profile_with(**changes: object) -> ConnectorProfile:
    data: dict[str, object] = {
        "name": "p",
        "organisation_id": ORG,
        "connector_id": CONNECTOR,
        "credential_id": CREDENTIAL,
        "client_id": "the-client",
        "authorize_url": "https://{subdomain}.example.com/oauth/authorize",
    }
    data.update(changes)
    return ConnectorProfile.model_validate(data)


# --- loading ---------------------------------------------------------------------------------


def test_example_profile_loads() -> None:
    profile = load_profile(EXAMPLE)
    assert profile.name == "zendesk-demo"
    assert profile.organisation_id == ORG
    assert profile.connector_id == CONNECTOR
    assert profile.credential_id == CREDENTIAL
    # Not in the file: defaults to the organisation.
    assert profile.credential_organisation_id == profile.organisation_id
    assert profile.fields_used == ["subdomain", "admin_email"]
    assert profile.slug == "zendesk-demo"
    assert profile.scopes == ["read", "write"]
    assert profile.link_ttl_hours == 72


def test_load_accepts_str_path_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    profile = load_profile(str(path))
    assert profile.name == "Test Profile"


def test_explicit_credential_organisation_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + f"credential_organisation_id: {OTHER_ORG}\n")
    profile = load_profile(path)
    assert profile.credential_organisation_id == OTHER_ORG
    assert profile.render(TENANT).credential.organisation_id == OTHER_ORG


def test_lowercase_ulid_is_normalised() -> None:
    assert profile_with(connector_id=CONNECTOR.lower()).connector_id == CONNECTOR


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("zendesk-demo", "zendesk-demo"),
        ("Zendesk Demo (EU)!", "zendesk-demo-eu"),
        ("  HubSpot__CRM  ", "hubspot-crm"),
        ("!!!", "profile"),
    ],
)
def test_slug(name: str, slug: str) -> None:
    assert profile_with(name=name).slug == slug


def test_fields_used_in_first_use_order_without_duplicates() -> None:
    profile = profile_with(
        authorize_url="https://{subdomain}.example.com/{region}/authorize",
        additional_params="login_hint={admin_email}&region={region}&team={team}",
    )
    assert profile.fields_used == ["subdomain", "region", "admin_email", "team"]
    assert profile_with(additional_params="").fields_used == ["subdomain"]


# --- rendering -------------------------------------------------------------------------------


def test_render_example_tenant() -> None:
    profile = load_profile(EXAMPLE)
    request = profile.render(TENANT)
    assert request.authorize_url == "https://acme-corp.zendesk.com/oauth/authorizations/new"
    assert request.additional_params == "login_hint=a%2Bb%40x.com"
    assert parse_qsl(request.additional_params) == [("login_hint", "a+b@x.com")]
    assert request.client_id == "demo-client-id"
    assert request.scopes == ["read", "write"]
    assert request.prompt == "consent"
    assert request.credential.id == CREDENTIAL
    assert request.credential.organisation_id == ORG
    wire = request.to_wire()
    assert wire["authorizeUrl"] == request.authorize_url
    assert wire["additionalParams"] == "login_hint=a%2Bb%40x.com"
    assert wire["credential"] == {"id": CREDENTIAL, "organisationId": ORG}
    assert wire["disableOfflineAccess"] is False


EVIL = ["x&state=evil", "a=b c", "a+b@x.com", "100%", "#frag", "v&redirect_uri=https://evil"]


@pytest.mark.parametrize("value", EVIL)
def test_string_additional_params_cannot_gain_a_parameter(value: str) -> None:
    profile = profile_with(additional_params="login_hint={admin_email}&team={team}")
    request = profile.render({**TENANT, "admin_email": value, "team": value + " & more="})
    pairs = parse_qsl(request.additional_params, keep_blank_values=True, strict_parsing=True)
    assert pairs == [("login_hint", value), ("team", value + " & more=")]


@pytest.mark.parametrize("value", EVIL)
def test_mapping_additional_params_cannot_gain_a_parameter(value: str) -> None:
    profile = profile_with(
        additional_params={"login_hint": "{admin_email}", "team": "t-{team}", "fixed": "1"}
    )
    request = profile.render({**TENANT, "admin_email": value, "team": value})
    pairs = parse_qsl(request.additional_params, keep_blank_values=True, strict_parsing=True)
    assert pairs == [("login_hint", value), ("team", "t-" + value), ("fixed", "1")]


@pytest.mark.parametrize("value", ["evil.com/x?y=1#", "a b", "a&b=c", "x@evil.com", "..%2F"])
def test_authorize_url_values_are_encoded(value: str) -> None:
    profile = profile_with(authorize_url="https://login.example.com/{subdomain}/authorize")
    parts = urlsplit(profile.render({**TENANT, "subdomain": value}).authorize_url)
    assert parts.hostname == "login.example.com"
    assert parts.query == ""
    assert parts.fragment == ""
    assert parts.path.count("/") == 2
    assert parts.path.endswith("/authorize")


def test_render_has_no_additional_params_when_none_set() -> None:
    request = profile_with().render(TENANT)
    assert request.additional_params == ""
    assert request.prompt is None


# --- templates -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", ["{a.b}", "{x:>3}", "{x!r}", "{a[0]}", "{0}", "{}", "{ x }", "{é-x}"]
)
def test_template_fields_refuses_anything_but_plain_names(template: str) -> None:
    with pytest.raises(ValueError, match="not a plain"):
        template_fields("https://h/" + template)


def test_template_fields_plain() -> None:
    assert template_fields("a={a}&b={b_2}&{{literal}}") == ["a", "b_2"]
    assert template_fields("") == []


# --- problems, located -----------------------------------------------------------------------


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("client_id: the-client\n", ""))
    problem = only_problem(path)
    assert problem == Problem(str(path), 1, "client_id", "Field required")
    assert str(problem) == f"{path}:1: client_id: Field required"


def test_every_missing_key_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\n")
    fields = {p.field for p in problems_of(path)}
    assert fields == {
        "organisation_id",
        "connector_id",
        "credential_id",
        "client_id",
        "authorize_url",
    }


@pytest.mark.parametrize("key", ["organisation_id", "connector_id", "credential_id"])
@pytest.mark.parametrize(
    "bad", ["not-a-ulid", "01M8F12B95S4BX0QFB3TPDWZ0U", "81M8F12B95S4BX0QFB3TPDWZ0Q", "'123'"]
)
def test_non_ulid_id(tmp_path: Path, key: str, bad: str) -> None:
    path = write(tmp_path, replace_line(key, f"{key}: {bad}"))
    problem = only_problem(path)
    assert (problem.line, problem.field) == (LINE[key], key)
    assert "is not a ULID" in problem.message
    assert str(problem).startswith(f"{path}:{LINE[key]}: {key}: ")


def test_non_ulid_credential_organisation(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "credential_organisation_id: nope\n")
    problem = only_problem(path)
    assert (problem.line, problem.field) == (12, "credential_organisation_id")


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("colour: red", "colour", "unknown key `colour`"),  # nothing close: no guess
        ("scope: [read]", "scope", "unknown key `scope`; did you mean `scopes`?"),
        ("link_ttl: 12", "link_ttl", "unknown key `link_ttl`; did you mean `link_ttl_hours`?"),
        (
            "display-name: X",
            "display-name",
            "unknown key `display-name`; did you mean `display_name`?",
        ),
        (
            "redirect_hots: a.b",
            "redirect_hots",
            "unknown key `redirect_hots`; did you mean `redirect_host`?",
        ),
    ],
)
def test_unknown_key_names_the_closest_known_one(
    tmp_path: Path, line: str, key: str, message: str
) -> None:
    path = write(tmp_path, BASE + line + "\n")
    assert only_problem(path) == Problem(str(path), 12, key, message)
    assert f"{path}:12: {key}: {message}" in str(problems_of(path)[0])


def test_a_key_under_a_mapping_gets_no_guess_from_the_top_level() -> None:
    from onboarding.files import unknown_key

    assert unknown_key("scope", None) == "unknown key `scope`"
    assert unknown_key("scope", ConnectorProfile).endswith("did you mean `scopes`?")


@pytest.mark.parametrize(
    ("name", "readable"),
    [
        ("zendesk-demo", "Zendesk Demo"),
        ("slack_demo", "Slack Demo"),
        ("HubSpot", "HubSpot"),  # already readable: kept
        ("google  drive-v2", "Google Drive V2"),
        ("---", "---"),  # no word in it: the name itself
    ],
)
def test_display_name_defaults_to_a_readable_name(name: str, readable: str) -> None:
    assert profile_with(name=name).display_name == readable


def test_display_name_is_kept_and_must_be_one_line(tmp_path: Path) -> None:
    assert profile_with(display_name=" Zendesk Support ").display_name == "Zendesk Support"
    path = write(tmp_path, BASE + 'display_name: "Zendesk\\nSupport"\n')
    problem = only_problem(path)
    assert (problem.line, problem.field) == (12, "display_name")
    assert problem.message == "must be one line: email subjects show it"


@pytest.mark.parametrize("key", sorted(RESERVED_QUERY_KEYS))
def test_reserved_key_in_mapping_additional_params(tmp_path: Path, key: str) -> None:
    text = replace_line(
        "additional_params", f'additional_params:\n  login_hint: "{{admin_email}}"\n  {key}: x'
    )
    problem = only_problem(write(tmp_path, text))
    assert (problem.line, problem.field) == (LINE["additional_params"], "additional_params")
    assert f"sets {key}, which Versori sets itself" in problem.message


@pytest.mark.parametrize("key", sorted(RESERVED_QUERY_KEYS))
def test_reserved_key_in_string_additional_params(tmp_path: Path, key: str) -> None:
    text = replace_line(
        "additional_params", f'additional_params: "login_hint={{admin_email}}&{key}=x"'
    ).replace('  login_hint: "{admin_email}"\n', "")
    path = write(tmp_path, text)
    problem = only_problem(path)
    assert str(problem).startswith(f"{path}:{LINE['additional_params']}: additional_params: ")
    assert f"sets {key}," in problem.message


def test_a_value_cannot_add_a_reserved_key() -> None:
    # The template's own text decides the keys: a filled-in value is encoded, never parsed.
    profile = profile_with(additional_params="x={state}")
    assert parse_qsl(profile.render({**TENANT, "state": "a&state=b"}).additional_params) == [
        ("x", "a&state=b")
    ]


@pytest.mark.parametrize("placeholder", ["{a.b}", "{x:>3}", "{admin_email!r}", "{0}"])
def test_bad_placeholder_in_authorize_url(tmp_path: Path, placeholder: str) -> None:
    text = replace_line("authorize_url", f"authorize_url: https://{placeholder}.example.com/a")
    problem = only_problem(write(tmp_path, text))
    assert (problem.line, problem.field) == (LINE["authorize_url"], "authorize_url")
    assert "is not a plain {field} placeholder" in problem.message


@pytest.mark.parametrize("placeholder", ["{a.b}", "{x:>3}"])
def test_bad_placeholder_in_additional_params(tmp_path: Path, placeholder: str) -> None:
    mapping = BASE.replace('"{admin_email}"', f'"{placeholder}"')
    problem = only_problem(write(tmp_path, mapping, "mapping.yaml"))
    assert (problem.line, problem.field) == (LINE["additional_params"], "additional_params")
    assert placeholder in problem.message
    assert "is not a plain {field} placeholder" in problem.message

    string = replace_line("additional_params", f'additional_params: "hint={placeholder}"')
    string = string.replace('  login_hint: "{admin_email}"\n', "")
    problem = only_problem(write(tmp_path, string, "string.yaml"))
    assert (problem.line, problem.field) == (LINE["additional_params"], "additional_params")


def test_unbalanced_brace(tmp_path: Path) -> None:
    text = replace_line("authorize_url", "authorize_url: https://{subdomain.example.com/a")
    problem = only_problem(write(tmp_path, text))
    assert (problem.line, problem.field) == (LINE["authorize_url"], "authorize_url")


@pytest.mark.parametrize(
    "url",
    [
        "/oauth/authorize",
        "{subdomain}.example.com/oauth",
        "ftp://example.com/oauth",
        "https:///oauth",
    ],
)
def test_authorize_url_must_be_absolute(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, replace_line("authorize_url", f'authorize_url: "{url}"'))
    problem = only_problem(path)
    assert problem == Problem(
        str(path),
        LINE["authorize_url"],
        "authorize_url",
        "must be an absolute http(s) URL with a host",
    )


def test_authorize_url_fragment(tmp_path: Path) -> None:
    text = replace_line("authorize_url", "authorize_url: https://{subdomain}.example.com/a#x")
    problem = only_problem(write(tmp_path, text))
    assert problem.message == "must not have a #fragment"


@pytest.mark.parametrize("ttl", ["0", "-1", "-0.5"])
def test_link_ttl_must_be_positive(tmp_path: Path, ttl: str) -> None:
    path = write(tmp_path, replace_line("link_ttl_hours", f"link_ttl_hours: {ttl}"))
    problem = only_problem(path)
    assert (problem.line, problem.field) == (LINE["link_ttl_hours"], "link_ttl_hours")
    assert "greater than 0" in problem.message


def test_all_problems_at_once_with_a_hint(tmp_path: Path) -> None:
    text = (
        replace_line("connector_id", "connector_id: nope")
        .replace("link_ttl_hours: 24", "link_ttl_hours: 0")
        .replace("client_id: the-client\n", "client_id: the-client\ncolour: red\n")
    )
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_profile(path)
    located = {(p.field, p.line) for p in info.value.problems}
    assert located == {("connector_id", 3), ("colour", 6), ("link_ttl_hours", 12)}
    message = str(info.value)
    assert f"{path}:3: connector_id: " in message
    assert f"{path}:6: colour: unknown key `colour`\n" in message
    assert "examples/profile.yaml" in info.value.hint


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(InputError, match="file not found") as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.replace("Test Profile", "Caf\xe9").encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        load_profile(path)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: x\n  foo: : bar\n", 2),
        ("name: x\nscopes: [read, write\nprompt: consent\n", 3),
        ('name: "unterminated\n', 2),
    ],
)
def test_invalid_yaml_reports_the_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    problem = only_problem(path)
    assert problem.line == line
    assert problem.message.startswith("not valid YAML")
    assert str(problem).startswith(f"{path}:{line}: not valid YAML")


@pytest.mark.parametrize("text", ["- name: x\n- name: y\n", "just text\n", "", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    problem = only_problem(path)
    assert problem.line == 1
    assert "a profile is a YAML mapping" in problem.message


# --- no content in errors, bombs, where a profile may be (issue 10, #1 and #5) -----------------

SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("app.ini", f"[database]\npassword = {SECRET}\n"),
        ("app.yaml", f"[database]\npassword = {SECRET}\n"),
        ("app.yaml", f"name: x\npassword: {SECRET}: more\n"),
        ("app.yaml", f'name: x\ntoken: "{SECRET}\\q"\n'),
        ("app.yaml", f"name: x\n\tpassword: {SECRET}\n"),
        ("app.yaml", f"name: *{SECRET}\n"),
        ("app.yaml", f"name: !{SECRET} x\n"),
        ("app.yaml", f"organisation_id: {SECRET}\n"),
        ("app.yaml", f"name: x\nscopes: [{SECRET}\n"),
    ],
)
def test_errors_never_quote_the_file(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, text, name)
    with pytest.raises(InputError) as caught:
        load_profile(path)
    assert SECRET not in str(caught.value)
    assert all(p.source == str(path) for p in caught.value.problems)


def test_a_profile_is_a_yaml_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE, "profile.ini")
    (problem,) = problems_of(path)
    assert "name the profile .yaml" in problem.message


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
scopes: *g
"""


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (BOMB, 2, "alias"),
        ("&t [*t]\n", 1, "alias"),
        (BASE + "prompt: *x\n", 12, "alias"),
        ("scopes: " + "[" * 5000 + "]" * 5000 + "\n", 1, "nest"),
        ("scopes: " + "{a: " * 3000 + "b" + "}" * 3000 + "\n", 1, "nest"),
        ("scopes:\n" + "".join("  " * n + "- \n" for n in range(100)), 33, "nested"),
        ("name: x\nlink_ttl_hours: " + "1" * 5000 + "\n", 2, "YAML"),
        ("? [a, b]\n: c\n", 1, "YAML"),
        ("!!python/object/apply:os.system [ls]\n", 1, "YAML"),
    ],
)
def test_bombs_and_oddities_are_input_errors(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    import time

    path = write(tmp_path, text)
    started = time.monotonic()
    problem = only_problem(path)
    assert time.monotonic() - started < 5
    assert (problem.source, problem.line) == (str(path), line)
    assert message in problem.message


def test_a_profile_has_a_size_cap(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "#" * (2 * 1024 * 1024) + "\n")
    assert "larger than" in only_problem(path).message


def test_a_profile_outside_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    inside = write(root, BASE)
    outside = write(tmp_path, BASE, "other.yaml")
    (root / "link.yaml").symlink_to(outside)
    assert load_profile(inside, root=root).name == "Test Profile"
    for path in (outside, root / ".." / "other.yaml", root / "link.yaml", tmp_path / "no.yaml"):
        with pytest.raises(InputError, match="outside the folder runs may read"):
            load_profile(path, root=root)
