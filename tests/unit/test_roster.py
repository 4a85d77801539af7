"""Rosters: every format, exact line numbers, every problem reported at once, streaming."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from onboarding.errors import InputError, Problem
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.inputs.roster import (
    MAX_PROBLEMS,
    Tenant,
    load_roster,
    open_roster_slice,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HEADER = "tenant_id,name,admin_email,subdomain,plan"


@pytest.fixture(scope="module")
def profile() -> ConnectorProfile:
    # authorize_url https://{subdomain}.zendesk.com/..., login_hint={admin_email}
    return load_profile(EXAMPLES / "profile.yaml")


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8"))
    else:
        path.write_bytes(content)
    return path


def csv_text(*rows: str, newline: str = "\n") -> str:
    return newline.join([HEADER, *rows]) + newline


def problems_of(
    location: str | Path, profile: ConnectorProfile | None = None, **kwargs: object
) -> list[Problem]:
    with pytest.raises(InputError) as info:
        load_roster(location, profile, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def located(problems: list[Problem]) -> list[tuple[int | None, str]]:
    return [(p.line, p.field) for p in problems]


def ids(roster: object) -> list[str]:
    return [t.tenant_id for t in roster]  # type: ignore[attr-defined]


# --- the example and CSV ---------------------------------------------------------------------


def test_example_roster_loads(profile: ConnectorProfile) -> None:
    roster = load_roster(EXAMPLES / "tenants.csv", profile)
    assert len(roster) == 25
    tenants = list(roster)
    assert len(tenants) == 25
    assert tenants[0] == Tenant(
        tenant_id="t001",
        name="Acme Corp",
        admin_email="admin@acmecorp.example.com",
        fields={"subdomain": "acme-corp", "plan": "growth"},
    )


@pytest.mark.parametrize("bom", [False, True], ids=["no-bom", "bom"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_csv_newlines_and_bom(
    tmp_path: Path, profile: ConnectorProfile, newline: str, bom: bool
) -> None:
    rows = ["t1,Acme,a@acme.com,acme,growth", "t2,Globex,g@globex.com,globex,starter"]
    prefix = b"\xef\xbb\xbf" if bom else b""
    path = write(tmp_path, "t.csv", prefix + csv_text(*rows, newline=newline).encode())
    roster = load_roster(path, profile)
    assert len(roster) == 2
    tenants = list(roster)
    assert ids(tenants) == ["t1", "t2"]  # the BOM does not stick to the first column's name
    assert tenants[1].fields == {"subdomain": "globex", "plan": "starter"}

    # Line numbers are right whatever the line ending.
    bad = [*rows, "t3,,c@x.com,c,growth", "", "t4,,d@x.com,d,growth", "t5,E,e@x.com,e,growth"]
    path = write(tmp_path, "bad.csv", prefix + csv_text(*bad, newline=newline).encode())
    assert located(problems_of(path, profile)) == [(4, "name"), (6, "name")]


def test_csv_quoted_commas_and_embedded_newlines(tmp_path: Path, profile: ConnectorProfile) -> None:
    text = csv_text(
        't1,"Acme, Inc.",a@acme.com,acme,"growth, annual"',  # line 2
        't2,"Two\nLines",b@x.com,b,growth',  # lines 3-4
        't3,"Ends with a break\n",c@x.com,c,growth',  # lines 5-6: trimmed, so accepted
        "t4,,d@x.com,d,growth",  # line 7
        't5,"Three\r\nphysical\nlines",e@x.com,e,growth',  # lines 8-10
        "t6,F,,f,growth",  # line 11
    )
    problems = problems_of(write(tmp_path, "t.csv", text), profile)
    # Each once: a refused value is not also reported as missing, and admin_email (required
    # and used by the templates) is not reported twice.
    assert located(problems) == [(3, "name"), (7, "name"), (8, "name"), (11, "admin_email")]
    assert "line break" in problems[0].message
    assert problems[1].message == "is required"
    assert "line break" in problems[2].message

    good = csv_text('t1,"Acme, Inc.",a@acme.com,acme,"growth, annual"', 't3,"C\n",c@x.com,c,g')
    tenants = list(load_roster(write(tmp_path, "good.csv", good), profile))
    assert tenants[0].name == "Acme, Inc."
    assert tenants[0].fields["plan"] == "growth, annual"
    assert tenants[1].name == "C"


def test_csv_blank_and_empty_rows_are_skipped_and_keep_line_numbers(tmp_path: Path) -> None:
    text = csv_text(
        "t1,A,a@x.com,a,p",  # 2
        "",  # 3
        "t2,,b@x.com,b,p",  # 4: right after a blank line
        ",,,,",  # 5
        "",  # 6
        "",  # 7
        "   ",  # 8
        "",
        "",
    )
    problems = problems_of(write(tmp_path, "t.csv", text))
    # "   " is one cell of spaces: a row, with every required value missing.
    assert located(problems) == [(4, "name"), (8, "tenant_id"), (8, "name"), (8, "admin_email")]


def test_csv_header_and_values_are_trimmed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "t.csv",
        " tenant_id , name ,admin_email , subdomain \n  t1 ,  Acme  , a@x.com ,acme\n",
    )
    (tenant,) = load_roster(path)
    assert tenant == Tenant(
        tenant_id="t1", name="Acme", admin_email="a@x.com", fields={"subdomain": "acme"}
    )


def test_csv_header_only_and_empty_file(tmp_path: Path) -> None:
    assert len(load_roster(write(tmp_path, "h.csv", HEADER + "\n"))) == 0
    problems = problems_of(write(tmp_path, "e.csv", ""))
    assert located(problems) == [(1, "")]
    assert "empty file" in problems[0].message


def test_csv_row_with_more_cells_than_header(tmp_path: Path, profile: ConnectorProfile) -> None:
    path = write(tmp_path, "t.csv", csv_text("t1,A,a@x.com,a,p", "t2,B,b@x.com,b,p,x,y"))
    (problem,) = problems_of(path, profile)
    assert (problem.line, problem.field) == (3, "")
    assert "2 more value(s) than the header has columns" in problem.message


def test_csv_row_with_fewer_cells(tmp_path: Path, profile: ConnectorProfile) -> None:
    path = write(tmp_path, "t.csv", csv_text("t1,A,a@x.com"))
    assert located(problems_of(path, profile)) == [(2, "subdomain")]


def test_csv_field_too_large_is_bad_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", csv_text("t1,A,a@x.com,a,p", 't2,"' + "x" * 200_000 + '",b'))
    (problem,) = problems_of(path)
    assert problem.line == 3
    assert problem.message.startswith("bad CSV")


# --- JSON, JSONL, YAML -----------------------------------------------------------------------


def tenant_json(n: int, **extra: object) -> str:
    return json.dumps(
        {"tenant_id": f"t{n}", "name": f"N{n}", "admin_email": f"a{n}@x.com", **extra}
    )


def test_json_array_line_numbers(tmp_path: Path) -> None:
    text = (
        "[\n"  # 1
        f"  {tenant_json(1)},\n"  # 2
        "  {\n"  # 3
        '    "tenant_id": "t2",\n'  # 4
        '    "name": "",\n'  # 5
        '    "admin_email": "b@x.com"\n'  # 6
        "  },\n"  # 7
        "\n"  # 8
        f"  {tenant_json(3)}, {tenant_json(4, admin_email='nope')}\n"  # 9
        "]\n"
    )
    path = write(tmp_path, "t.json", text)
    assert located(problems_of(path)) == [(3, "name"), (9, "admin_email")]
    good = write(tmp_path, "good.json", "[" + ",\n".join(tenant_json(n) for n in range(3)) + "]")
    assert ids(load_roster(good)) == ["t0", "t1", "t2"]
    assert len(load_roster(write(tmp_path, "empty.json", " [ ] "))) == 0


def test_json_object_with_tenants_key(tmp_path: Path) -> None:
    text = (
        "{\n"  # 1
        '  "meta": {"kind": "tenants", "tags": ["not", "tenants"]},\n'  # 2
        '  "note": "the \\"tenants\\" key follows",\n'  # 3
        '  "tenants": [\n'  # 4
        f"    {tenant_json(1)},\n"  # 5
        f"    {tenant_json(2, name='')}\n"  # 6
        "  ],\n"  # 7
        '  "after": [1, 2]\n'  # 8
        "}\n"
    )
    path = write(tmp_path, "t.json", text)
    assert located(problems_of(path)) == [(6, "name")]
    ok = write(tmp_path, "ok.json", text.replace('"name": ""', '"name": "B"'))
    assert ids(load_roster(ok)) == ["t1", "t2"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[\n{"tenant_id": "t1",\n "name": }\n]', 3, "bad JSON"),
        ('{\n"tenants": [\n{"tenant_id": "t1" "name": "x"}]}', 3, "bad JSON"),
        ('\n\n{"rows": []}', 3, "expected a JSON array"),
        ('{"tenants": {"t1": {}}}', 1, "expected a JSON array"),
        ('"just a string"', 1, "expected a JSON array"),
        (f"[{tenant_json(1)}\n {tenant_json(2)}]", 2, "expected , or ]"),
        (f"[{tenant_json(1)},\n]", 2, "bad JSON"),
        (f"[{tenant_json(1)},\n", 2, "bad JSON"),
        (f"[{tenant_json(1)}\n", 2, "expected , or ]"),
        # A second array would otherwise be dropped without a word.
        (f"[{tenant_json(1)}]\n[{tenant_json(2)}]", 2, "unexpected text after"),
    ],
)
def test_json_structure_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    (problem,) = problems_of(write(tmp_path, "t.json", text))
    assert problem.line == line
    assert message in problem.message


def test_jsonl_blank_lines_and_line_numbers(tmp_path: Path) -> None:
    text = "\n".join(
        [tenant_json(1), "", "   ", tenant_json(2, name=""), "", tenant_json(3, tenant_id="t 3")]
    )
    path = write(tmp_path, "t.jsonl", text + "\n\n")
    assert located(problems_of(path)) == [(4, "name"), (6, "tenant_id")]
    ok = write(tmp_path, "ok.ndjson", f"\n{tenant_json(1)}\r\n\r\n{tenant_json(2)}")
    assert ids(load_roster(ok)) == ["t1", "t2"]


def test_jsonl_bad_line(tmp_path: Path) -> None:
    path = write(tmp_path, "t.jsonl", f"{tenant_json(1)}\n\n{{oops\n")
    (problem,) = problems_of(path)
    assert (problem.line, problem.field) == (3, "")
    assert problem.message.startswith("bad JSON")


YAML_LIST = """\
# tenants
- tenant_id: t1
  name: Acme
  admin_email: a@acme.com
  subdomain: acme

- tenant_id: t2
  name: ""
  admin_email: b@x.com
  subdomain: b
- {tenant_id: t3, name: C, admin_email: nope, subdomain: c}
"""


def test_yaml_list_line_numbers(tmp_path: Path, profile: ConnectorProfile) -> None:
    path = write(tmp_path, "t.yaml", YAML_LIST)
    assert located(problems_of(path, profile)) == [(7, "name"), (11, "admin_email")]


def test_yaml_tenants_key_line_numbers(tmp_path: Path, profile: ConnectorProfile) -> None:
    indented = "".join("  " + line if line else "\n" for line in YAML_LIST.splitlines(True))
    path = write(tmp_path, "t.yml", "source: crm\ntenants:\n" + indented)
    assert located(problems_of(path, profile)) == [(9, "name"), (13, "admin_email")]
    good = indented.replace('name: ""', "name: B").replace("nope", "c@x.com")
    roster = load_roster(write(tmp_path, "good.yml", "tenants:\n" + good), profile)
    assert ids(roster) == ["t1", "t2", "t3"]


@pytest.mark.parametrize("text", ["tenant_id: t1\n", "tenants: 3\n", "just text\n", ""])
def test_yaml_must_be_a_list(tmp_path: Path, text: str) -> None:
    (problem,) = problems_of(write(tmp_path, "t.yaml", text))
    assert problem.message == "expected a YAML list of tenants"


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "t.yaml", "- tenant_id: t1\n  name: [x\n"))
    assert problem.line is not None
    assert "not valid YAML" in problem.message


# --- values ----------------------------------------------------------------------------------


def test_numbers_and_bools_are_text(tmp_path: Path) -> None:
    row = {
        "tenant_id": 123,
        "name": True,
        "admin_email": "a@x.com",
        "seats": 1.5,
        "trial": False,
        "note": None,
    }
    path = write(tmp_path, "t.json", json.dumps([row]))
    (tenant,) = load_roster(path)
    assert tenant.tenant_id == "123"
    assert tenant.name == "true"
    assert tenant.fields == {"seats": "1.5", "trial": "false"}  # null: as if absent


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_nested_values_are_refused(tmp_path: Path, fmt: str) -> None:
    rows = [
        {"tenant_id": "t1", "name": "A", "admin_email": "a@x.com", "meta": {"a": 1}},
        {"tenant_id": "t2", "name": "B", "admin_email": "b@x.com", "tags": ["x"]},
        ["not", "an", "object"],
    ]
    text = json.dumps(rows, indent=None).replace("}, ", "},\n").replace("], [", "],\n[")
    problems = problems_of(write(tmp_path, f"t.{fmt}", text))  # JSON is YAML too
    assert located(problems)[:2] == [(1, "meta"), (2, "tags")]
    assert problems[0].message == "must be text, not a list or object"
    assert (problems[2].line, problems[2].message) == (
        3,
        "a row must be an object of column: value",
    )


@pytest.mark.parametrize("bad", ["A\nB", "A\rB", "A\r\nB", "A\x00B"])
def test_line_breaks_and_nul_are_refused(tmp_path: Path, bad: str) -> None:
    rows = [{"tenant_id": "t1", "name": "A", "admin_email": "a@x.com", "team": bad}]
    (problem,) = problems_of(write(tmp_path, "t.json", json.dumps(rows)))
    assert (problem.line, problem.field) == (1, "team")
    assert "line break or NUL" in problem.message


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("t.csv", HEADER.encode() + b"\nt1,Caf\xe9,a@x.com,a,p\n"),  # in the first read
        ("big.csv", csv_text(*[f"t{n},N,a{n}@x.com,s,p" for n in range(3000)]).encode() + b"\xff"),
        ("t.json", b'[{"tenant_id": "t1", "name": "Caf\xe9"}]'),
        ("t.jsonl", b'{"tenant_id": "t1", "name": "Caf\xe9"}\n'),
        ("t.yaml", b"- tenant_id: t1\n  name: Caf\xe9\n"),
    ],
)
def test_non_utf8_is_an_input_error(tmp_path: Path, name: str, content: bytes) -> None:
    with pytest.raises(InputError, match="UTF-8"):
        load_roster(write(tmp_path, name, content))


# --- every problem at once -------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tmp_path: Path, profile: ConnectorProfile) -> None:
    text = csv_text(
        "t1,Acme,admin@acme.com,acme,growth",  # 2: fine
        "t1,Acme Again,admin2@acme.com,acme2,growth",  # 3: duplicate
        "t2,Bad Email,not-an-email,bad,growth",  # 4
        "t3,,t3@x.com,t3,growth",  # 5: no name
        "t4,Empty Sub,t4@x.com,,growth",  # 6: template field empty
        "t 5,Space,t5@x.com,t5,growth",  # 7: tenant_id characters
        "-t6,Dash,t6@x.com,t6,growth",  # 8: tenant_id must start with a letter or digit
        "t7,Host,t7@x.com,bad host,growth",  # 9: invalid host
        "t8,Host,t8@x.com,a_b,growth",  # 10: invalid host
        "t9,Extra,t9@x.com,t9,growth,surplus",  # 11
        "t10,Fine,t10@x.com,Fine-Caps,growth",  # 12: fine (hosts are case-insensitive)
    )
    path = write(tmp_path, "t.csv", text)
    with pytest.raises(InputError) as info:
        load_roster(path, profile)
    problems = info.value.problems
    assert located(problems) == [
        (3, "tenant_id"),
        (4, "admin_email"),
        (5, "name"),
        (6, "subdomain"),
        (7, "tenant_id"),
        (8, "tenant_id"),
        (9, "subdomain"),
        (10, "subdomain"),
        (11, ""),
    ]
    by_line = {p.line: p for p in problems}
    assert by_line[3].message == "duplicate 't1' (first at line 2)"
    assert by_line[5].message == "is required"
    assert by_line[6].message == "is empty, and the profile's templates use it"
    assert "letters, digits" in by_line[7].message
    assert "authorize_url host invalid" in by_line[9].message
    assert all(p.source == str(path) for p in problems)
    message = str(info.value)
    assert f"{path}:3: tenant_id: duplicate 't1' (first at line 2)" in message
    assert "Fix the roster (9 problem(s)); nothing was sent to Versori." in message


def test_missing_columns_reported_once_at_line_1(tmp_path: Path, profile: ConnectorProfile) -> None:
    text = "tenant_id,admin_email,plan\nt1,a@x.com,p\nt2,b@x.com,p\nt3,c@x.com,p\n"
    path = write(tmp_path, "t.csv", text)
    problems = problems_of(path, profile)
    assert located(problems) == [(1, "name"), (1, "subdomain")]
    assert problems[0].message == (
        "no such column among the header's 3; check the first line's spelling"
    )
    assert problems[1].message == (
        "no such column among the header's 3 (the profile's templates use it); check the first "
        "line's spelling"
    )
    assert str(problems[1]).startswith(f"{path}:1: subdomain: no such column")


def test_missing_column_both_required_and_templated(
    tmp_path: Path, profile: ConnectorProfile
) -> None:
    path = write(tmp_path, "t.csv", "tenant_id,name,subdomain\nt1,A,a\n")
    (problem,) = problems_of(path, profile)
    assert (problem.line, problem.field) == (1, "admin_email")
    assert problem.message.startswith("no such column among the header's 3")


def test_template_field_needed_only_with_a_profile(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", "tenant_id,name,admin_email\nt1,A,a@x.com\n")
    assert len(load_roster(path)) == 1


def test_template_field_missing_from_json_rows(tmp_path: Path, profile: ConnectorProfile) -> None:
    path = write(tmp_path, "t.json", f"[{tenant_json(1)},\n{tenant_json(2, subdomain='b')}]")
    (problem,) = problems_of(path, profile)
    assert (problem.line, problem.field) == (1, "subdomain")
    assert problem.message == "is empty, and the profile's templates use it"


@pytest.mark.parametrize("subdomain", ["bad host", "a_b", "evil.com/x", "x@evil", "-lead", "é"])
def test_invalid_host_names_the_template_field(
    tmp_path: Path, profile: ConnectorProfile, subdomain: str
) -> None:
    rows = [{"tenant_id": "t1", "name": "A", "admin_email": "a@x.com", "subdomain": subdomain}]
    (problem,) = problems_of(write(tmp_path, "t.json", json.dumps(rows)), profile)
    assert (problem.line, problem.field) == (1, "subdomain")
    assert problem.message == "makes the authorize_url host invalid (letters, digits, - and . only)"


def test_problems_are_capped(tmp_path: Path) -> None:
    rows = [f"t{n},,a{n}@x.com,s,p" for n in range(MAX_PROBLEMS + 50)]
    with pytest.raises(InputError) as info:
        load_roster(write(tmp_path, "t.csv", csv_text(*rows)))
    assert len(info.value.problems) == MAX_PROBLEMS
    assert info.value.hint.startswith("…and 50 more. Fix the roster (250 problem(s))")


# --- locations -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t.txt", "t.xlsx", "tenants"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, csv_text("t1,A,a@x.com,a,p"))
    with pytest.raises(InputError, match="unknown roster format"):
        load_roster(path)


def test_extension_is_case_insensitive(tmp_path: Path) -> None:
    assert len(load_roster(write(tmp_path, "T.CSV", csv_text("t1,A,a@x.com,a,p")))) == 1


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="roster file not found"):
        load_roster(tmp_path / "nope.csv")
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder"):
        load_roster(folder)


# --- only, iteration -------------------------------------------------------------------------


def test_only_filters(tmp_path: Path, profile: ConnectorProfile) -> None:
    rows = [f"t{n},N{n},a{n}@x.com,s{n},p" for n in range(1, 6)]
    path = write(tmp_path, "t.csv", csv_text(*rows))
    roster = load_roster(path, profile, only=["t4", "t2", "t4"])
    assert len(roster) == 2
    assert ids(roster) == ["t2", "t4"]  # in file order
    assert ids(roster) == ["t2", "t4"]  # and again: each iteration reads the file afresh
    assert len(load_roster(path, profile, only=[])) == 5


def test_only_with_unknown_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", csv_text("t1,A,a@x.com,a,p", "t2,B,b@x.com,b,p"))
    problems = problems_of(path, only=["t1", "zz", "t9"])
    assert located(problems) == [(None, "only"), (None, "only")]
    assert [p.message for p in problems] == [
        "tenant_id 't9' is not in it",
        "tenant_id 'zz' is not in it",
    ]
    assert str(problems[0]) == f"{path}: only: tenant_id 't9' is not in it"


def test_iteration_streams_tenants_with_extra_columns(
    tmp_path: Path, profile: ConnectorProfile
) -> None:
    path = write(
        tmp_path,
        "t.csv",
        "tenant_id,name,admin_email,subdomain,plan,region,empty\n"
        "t1,Acme,a@acme.com,acme,growth,eu,\n"
        "t2,Globex,g@globex.com,globex,starter,us,\n",
    )
    roster = load_roster(path, profile)
    assert len(roster) == 2
    iterator = iter(roster)
    assert isinstance(iterator, Iterator)
    first = next(iterator)
    assert isinstance(first, Tenant)
    assert first.values == {
        "tenant_id": "t1",
        "name": "Acme",
        "admin_email": "a@acme.com",
        "subdomain": "acme",
        "plan": "growth",
        "region": "eu",
        "empty": "",
    }
    assert first.fields == {"subdomain": "acme", "plan": "growth", "region": "eu", "empty": ""}
    request = profile.render(first.values)
    assert request.authorize_url.startswith("https://acme.zendesk.com/")
    assert next(iterator).tenant_id == "t2"
    assert next(iterator, None) is None


# --- a big one ---------------------------------------------------------------------------------


def test_20k_row_csv(tmp_path: Path, profile: ConnectorProfile) -> None:
    rows = [f"t{n:05d},Tenant {n},admin{n}@t{n}.example.com,t{n},growth" for n in range(20_000)]
    path = write(tmp_path, "big.csv", csv_text(*rows))
    roster = load_roster(path, profile)
    assert len(roster) == 20_000
    count = 0
    for count, tenant in enumerate(roster, start=1):  # noqa: B007
        pass
    assert count == 20_000
    assert tenant.tenant_id == "t19999"


# --- slices, as a chunk of a batch reads them --------------------------------------------------


@pytest.mark.parametrize("name", ["r.csv", "r.jsonl", "r.json", "r.yaml"])
def test_slices_of_a_checked_roster_cover_it_once_in_order(tmp_path: Path, name: str) -> None:
    rows = [{"tenant_id": f"t{n}", "name": f"T{n}", "admin_email": f"a{n}@x.com"} for n in range(7)]
    if name.endswith(".csv"):
        content = "tenant_id,name,admin_email\n" + "".join(
            f"{r['tenant_id']},{r['name']},{r['admin_email']}\n" for r in rows
        )
    elif name.endswith(".jsonl"):
        content = "".join(json.dumps(r) + "\n" for r in rows)
    else:  # JSON is YAML too
        content = json.dumps(rows)
    path = write(tmp_path, name, content)
    roster = load_roster(path)
    parts = [open_roster_slice(path, roster.digest, a, min(a + 3, 7)) for a in (0, 3, 6)]
    assert [len(p) for p in parts] == [3, 3, 1]
    assert [ids(p) for p in parts] == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6"]]


def test_a_slice_counts_only_the_selected_tenants(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", csv_text(*(f"t{n},T,a{n}@x.com,s{n},p" for n in range(6))))
    roster = load_roster(path, only=["t1", "t3", "t4", "t5"])
    assert len(roster) == 4
    first = open_roster_slice(path, roster.digest, 0, 2, only=["t1", "t3", "t4", "t5"])
    second = open_roster_slice(path, roster.digest, 2, 4, only=["t1", "t3", "t4", "t5"])
    assert (ids(first), ids(second)) == (["t1", "t3"], ["t4", "t5"])


def test_a_slice_of_a_roster_changed_since_it_was_checked_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", csv_text("t1,A,a@x.com,a,p"))
    digest = load_roster(path).digest
    path.write_text(csv_text("t1,A,a@x.com,a,p", "t2,B,not-an-email,b,p"))
    with pytest.raises(InputError, match="changed after the batch checked it"):
        open_roster_slice(path, digest, 0, 1)
    with pytest.raises(InputError, match="not found where this worker looked"):
        open_roster_slice(tmp_path / "elsewhere.csv", digest, 0, 1)


# --- local paths under a root (issue 10, #1; roster URLs: tests/unit/test_roster_download.py) ---


def test_local_paths_must_lie_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    inside = write(root / "sub", "r.csv", csv_text("t1,A,a@x.com,a,p"))
    outside = write(tmp_path, "o.csv", csv_text("t1,A,a@x.com,a,p"))
    (root / "link.csv").symlink_to(outside)
    assert ids(load_roster(inside, root=root)) == ["t1"]
    digest = load_roster(inside).digest
    assert ids(open_roster_slice(inside, digest, 0, 1, root=root)) == ["t1"]
    for path in (outside, root / "sub" / ".." / ".." / "o.csv", root / "link.csv"):
        with pytest.raises(InputError, match="outside the folder runs may read"):
            load_roster(path, root=root)
        with pytest.raises(InputError, match="outside the folder runs may read"):
            open_roster_slice(path, digest, 0, 1, root=root)
    with pytest.raises(InputError, match="outside the folder runs may read"):
        load_roster(tmp_path / "missing.csv", root=root)  # the same answer: no existence oracle
    assert ids(load_roster(outside)) == ["t1"], "no root: any path (the CLI, a local run)"


# --- bombs and malformed input (issue 10, #5) ---------------------------------------------------

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
tenants: [*g]
"""


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (BILLION_LAUGHS, 2, "alias"),
        ("&t [*t]\n", 1, "alias"),
        ("- &r {tenant_id: t1, name: A, admin_email: a@x.com}\n- *r\n", 2, "alias"),
        ("[" * 5000 + "]" * 5000 + "\n", 1, "nest"),
        ("- " * 3000 + "x\n", 1, "nest"),
        ("- {tenant_id: " + "1" * 5000 + ", name: A, admin_email: a@x.com}\n", 1, "YAML"),
        ("- !!python/object:os.system {}\n", 1, "YAML"),
        ("- ? [a]\n  : b\n", 1, "YAML"),
    ],
)
def test_yaml_bombs_and_oddities_are_input_errors(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, "r.yaml", text)
    started = time.monotonic()
    (problem,) = problems_of(path)
    assert time.monotonic() - started < 5
    assert (problem.source, problem.line) == (str(path), line)
    assert message in problem.message


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("r.json", "[" * 100_000 + "]" * 100_000),
        ("r.json", '{"tenants": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ("r.json", "[" + "{" * 0 + '{"tenant_id": ' + "[" * 100_000 + "]" * 100_000 + "}]"),
        ("r.jsonl", '{"tenant_id": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
        ("r.json", '[{"tenant_id": ' + "1" * 5000 + "}]"),
        ("r.jsonl", '{"tenant_id": ' + "1" * 5000 + "}\n"),
    ],
)
def test_deep_or_huge_json_is_an_input_error(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, name, text)
    (problem,) = problems_of(path)
    assert problem.source == str(path) and problem.line == 1
    assert "JSON" in problem.message


# --- a value that lands in the authorize URL's path (issue 10, #11) -----------------------------


@pytest.fixture
def path_profile() -> ConnectorProfile:
    return ConnectorProfile.model_validate(
        {
            "name": "path",
            "organisation_id": "01M8F12B95S4BX0QFB3TPDWZ0P",
            "connector_id": "01M8F12B95S4BX0QFB3TPDWZ0Q",
            "credential_id": "01M8F12B95S4BX0QFB3TPDWZ0R",
            "client_id": "c",
            "authorize_url": "https://login.example.com/t/{region}/{tenant_id}/oauth/authorize",
        }
    )


@pytest.mark.parametrize(
    ("region", "tenant_id"),
    [
        ("..", "t1"),
        (".", "t1"),
        ("a/b", "t1"),
        ("a?b=1", "t1"),
        ("a#b", "t1"),
        ("%2e%2e", "t1"),
        ("%2F", "t1"),
        ("a\\b", "t1"),
    ],
)
def test_a_value_in_the_authorize_url_path_cannot_walk_it(
    tmp_path: Path, path_profile: ConnectorProfile, region: str, tenant_id: str
) -> None:
    rows = [
        {"tenant_id": "t0", "name": "ok", "admin_email": "a@x.com", "region": "eu"},
        {"tenant_id": tenant_id, "name": "bad", "admin_email": "b@x.com", "region": region},
    ]
    path = write(tmp_path, "r.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    (problem,) = problems_of(path, path_profile)
    assert (problem.source, problem.line, problem.field) == (str(path), 2, "region")
    assert "authorize_url path" in problem.message


def test_runs_started_through_a_deployment_read_only_under_the_files_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from prefect.context import FlowRunContext

    import flows.inputs.parameters as flow_module
    from onboarding.settings import load_settings

    monkeypatch.delenv("ONBOARD_FILES_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    run = SimpleNamespace(flow_run=SimpleNamespace(deployment_id=None))
    monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls: run))
    assert flow_module.run_files_root(load_settings()) is None, "a run started by hand: any path"
    run.flow_run.deployment_id = "d3b07384-d9a0-4c9b-8f6e-000000000001"
    unset = flow_module.run_files_root(load_settings())
    assert unset == tmp_path, "unset: the working folder (the checkout)"
    monkeypatch.setenv("ONBOARD_FILES_ROOT", str(tmp_path / "rosters"))
    root = flow_module.run_files_root(load_settings())
    assert root == tmp_path / "rosters"
    with pytest.raises(InputError, match="outside the folder runs may read"):
        load_roster("/etc/passwd.csv", root=root)


def test_a_roster_name_too_long_for_the_file_system_is_an_input_error(tmp_path: Path) -> None:
    """Found by tests/unit/test_fuzz_inputs.py: `9` * 5000 + `://` reached os.stat and came out
    as OSError (File name too long) instead of a clear input error."""
    with pytest.raises(InputError, match="cannot be read as a roster file"):
        load_roster(str(tmp_path / ("9" * 5000)))
