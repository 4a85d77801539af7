"""onboarding/inputs/files.py: an operator's files read safely. `resolve_under` (the folder
rule), `read_bounded_text` (regular files, a size cap, UTF-8), `load_yaml_with_lines` (bounded
YAML with a line for every key path; aliases, deep nesting and too many values refused),
`problems_from_validation` (FILE:LINE: field: message) and `without_quotes`. Through the
profile and roster loaders: tests/unit/test_profile.py, tests/unit/test_roster.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import AfterValidator, BaseModel, ValidationError

from onboarding.errors import InputError, Problem
from onboarding.files import (
    MAX_YAML_DEPTH,
    load_yaml_with_lines,
    problems_from_validation,
    read_bounded_text,
    resolve_under,
    without_quotes,
)

pytestmark = pytest.mark.timeout(60)

OUTSIDE = "outside the folder runs may read"


def problem_of(call: Any, *args: Any, **kwargs: Any) -> Problem:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    (problem,) = caught.value.problems
    return problem


# --- resolve_under -----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "sub" / "in.yaml").write_text("a: 1\n")
    (tmp_path / "out.yaml").write_text("a: 1\n")
    return tmp_path / "root"


def test_without_a_root_the_path_is_given_back_as_it_is(tmp_path: Path) -> None:
    relative = Path("../somewhere/else.yaml")
    assert resolve_under(relative, None, "p", "profile") is relative
    assert resolve_under(tmp_path / "missing", None, "p", "profile") == tmp_path / "missing"


def test_a_path_in_the_root_comes_back_resolved(root: Path) -> None:
    dotted = root / "sub" / ".." / "sub" / "in.yaml"
    got = resolve_under(dotted, root, "p", "profile")
    assert got == (root / "sub" / "in.yaml").resolve() and got.is_absolute()
    assert resolve_under(root / "sub" / "new.yaml", root, "p", "profile").name == "new.yaml"


def test_a_relative_path_is_taken_from_the_working_folder(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(root / "sub")
    assert resolve_under(Path("in.yaml"), root, "in.yaml", "profile") == root.resolve() / "sub" / (
        "in.yaml"
    )
    with pytest.raises(InputError, match=OUTSIDE):
        resolve_under(Path("../../out.yaml"), root, "../../out.yaml", "profile")


def test_paths_that_leave_the_root_are_refused_naming_source_root_and_what(root: Path) -> None:
    outside = root.parent / "out.yaml"
    (root / "link.yaml").symlink_to(outside)
    for path in (outside, root / "sub" / ".." / ".." / "out.yaml", root / "link.yaml"):
        with pytest.raises(InputError) as caught:
            resolve_under(path, root, "the-source", "roster")
        assert str(caught.value) == (
            f"the-source: {OUTSIDE} ({root}, ONBOARD_FILES_ROOT); put the roster there"
        )


def test_a_sibling_folder_sharing_the_roots_name_as_a_prefix_is_outside(root: Path) -> None:
    sibling = root.parent / (root.name + "-other")
    sibling.mkdir()
    (sibling / "x.yaml").write_text("a: 1\n")
    with pytest.raises(InputError, match=OUTSIDE):
        resolve_under(sibling / "x.yaml", root, "p", "profile")


def test_a_link_from_outside_into_the_root_is_judged_by_its_target(root: Path) -> None:
    link = root.parent / "into.yaml"
    link.symlink_to(root / "sub" / "in.yaml")
    assert resolve_under(link, root, "p", "profile") == (root / "sub" / "in.yaml").resolve()


def test_a_root_given_through_a_link_is_resolved_too(root: Path) -> None:
    linked_root = root.parent / "linked-root"
    linked_root.symlink_to(root, target_is_directory=True)
    assert resolve_under(root / "sub" / "in.yaml", linked_root, "p", "profile").exists()
    assert resolve_under(linked_root / "sub" / "in.yaml", str(root), "p", "profile").exists()


def test_a_missing_file_outside_gets_the_same_answer_as_one_that_exists(root: Path) -> None:
    """No existence oracle: outside is outside, whether or not the file is there."""
    answers = set()
    for name in ("out.yaml", "no-such.yaml"):
        with pytest.raises(InputError) as caught:
            resolve_under(root.parent / name, root, "p", "profile")
        answers.add(str(caught.value))
    assert len(answers) == 1


# --- read_bounded_text -------------------------------------------------------------------------


def test_text_is_read_with_its_bom_dropped(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"\xef\xbb\xbfZ\xc3\xbcrich\r\n")
    assert read_bounded_text(path, "f", 100) == "Zürich\r\n"


def test_the_size_cap_is_max_bytes_exactly(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"x" * 10)
    assert read_bounded_text(path, "f", 10) == "x" * 10
    with pytest.raises(InputError) as caught:
        read_bounded_text(path, "the-file", 9, "profile")
    assert str(caught.value) == "the-file: larger than 9 bytes; this is not a profile"


def test_a_missing_file_and_a_folder_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError) as missing:
        read_bounded_text(tmp_path / "nope", "src", 10)
    assert str(missing.value) == "src: file not found"
    with pytest.raises(InputError) as folder:
        read_bounded_text(tmp_path, "src", 10, "roster")
    assert str(folder.value) == "src: is a folder; give the roster file"


def test_a_device_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        read_bounded_text(Path("/dev/zero"), "src", 10, "profile")  # endless, were it read
    assert str(caught.value) == "src: not a regular file; give the profile file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "profile.yaml"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            read_bounded_text(fifo, "src", 10, "profile")
        except BaseException as err:
            errors.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(0.5)
    hung = reader.is_alive()
    if hung:  # let the reader's open() return: a writer comes and goes
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
    assert not hung, "still waiting for a writer after 0.5 s"
    assert len(errors) == 1 and "not a regular file" in str(errors[0])


def test_text_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"ok: \xff\n")
    problem = problem_of(read_bounded_text, path, "src", 100)
    assert problem == Problem("src", None, "", "not UTF-8 text (byte 4); save it as UTF-8")


# --- load_yaml_with_lines ----------------------------------------------------------------------


def load(tmp_path: Path, text: str | bytes, **bounds: int) -> tuple[Any, dict[Any, int]]:
    path = tmp_path / "f.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return load_yaml_with_lines(
        path,
        "f.yaml",
        max_bytes=bounds.get("max_bytes", 100_000),
        max_nodes=bounds.get("max_nodes", 10_000),
    )


def refused(tmp_path: Path, text: str, **bounds: int) -> Problem:
    return problem_of(load, tmp_path, text, **bounds)


def test_every_key_path_has_its_line_and_a_block_value_its_keys_line(tmp_path: Path) -> None:
    data, lines = load(tmp_path, "a: 1\nb:\n  c:\n    - d: 2\n      e: 3\n    - x\n")
    assert data == {"a": 1, "b": {"c": [{"d": 2, "e": 3}, "x"]}}
    assert lines == {
        (): 1,
        ("a",): 1,
        ("b",): 2,  # the key's line, not line 3 where its value starts
        ("b", "c"): 3,
        ("b", "c", 0): 4,
        ("b", "c", 0, "d"): 4,
        ("b", "c", 0, "e"): 5,
        ("b", "c", 1): 6,
    }


@pytest.mark.parametrize("text", ["", "# a comment only\n", "\ufeff"])
def test_an_empty_document_is_none_with_no_lines(tmp_path: Path, text: str) -> None:
    assert load(tmp_path, text) == (None, {})


def test_the_source_defaults_to_the_path(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("a: *x\n")
    problem = problem_of(load_yaml_with_lines, path, max_bytes=100, max_nodes=100)
    assert problem.source == str(path)


def test_an_anchor_alone_is_fine_but_any_alias_is_refused_at_its_line(tmp_path: Path) -> None:
    assert load(tmp_path, "a: &x 1\n")[0] == {"a": 1}
    problem = refused(tmp_path, "a: &x 1\nb: *x\n")
    assert (problem.source, problem.line) == ("f.yaml", 2)
    assert problem.message == "uses a YAML alias (*name), which is not accepted; write it out"
    assert "alias" in refused(tmp_path, "base: &b {x: 1}\nother:\n  <<: *b\n").message


@pytest.mark.timeout(10)
def test_a_billion_laughs_is_refused_at_once(tmp_path: Path) -> None:
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [
        f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    started = time.monotonic()
    problem = refused(tmp_path, "\n".join(rows) + "\n")
    assert time.monotonic() - started < 1
    assert (problem.line, "alias" in problem.message) == (2, True)


def test_nesting_is_bounded_at_max_yaml_depth(tmp_path: Path) -> None:
    deepest = "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH
    assert load(tmp_path, deepest)[0] is not None
    too_deep = refused(tmp_path, "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1))
    assert too_deep.message == f"is nested more than {MAX_YAML_DEPTH} levels deep"
    block = "".join(f"{'  ' * n}k{n}:\n" for n in range(MAX_YAML_DEPTH + 1)) + "  " * 40 + "x\n"
    assert "nested more than" in refused(tmp_path, block).message


def test_values_are_bounded_at_max_nodes_the_document_counting_as_one(tmp_path: Path) -> None:
    assert load(tmp_path, "[1, 2, 3, 4]", max_nodes=5)[0] == [1, 2, 3, 4]
    problem = refused(tmp_path, "[1, 2, 3, 4, 5]", max_nodes=5)
    assert (problem.line, problem.message) == (1, "has more than 5 values")


def test_the_size_cap_holds_for_yaml(tmp_path: Path) -> None:
    assert load(tmp_path, "a: 1\n", max_bytes=5)[0] == {"a": 1}
    with pytest.raises(InputError, match="larger than 4 bytes"):
        load(tmp_path, "a: 1\n", max_bytes=4)


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("a: 1\n---\nb: 2\n", 2, "expected a single document in the stream"),
        ('a: "never closed s3cret\n', 2, "found unexpected end of stream"),
        ("a: b: c\n", 1, "mapping values are not allowed in this context"),
        ("a: 1\nb: !!python/object:os.system s3cret\n", 2, "could not determine a constructor"),
        ("a: !s3cret x\n", 1, "could not determine a constructor for the tag …"),
        ("a: 1\nb: " + "9" * 5000 + "\n", 2, "a number too long"),
        ("? [a]\n: b\n", 1, "found unhashable key"),
        ("a: {b: 1\n", 2, "did not find expected ',' or '}'"),
    ],
)
def test_bad_yaml_is_one_problem_with_its_line_and_never_the_files_text(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    problem = refused(tmp_path, text)
    assert (problem.source, problem.line, problem.field) == ("f.yaml", line, "")
    assert problem.message.startswith("not valid YAML: ") and reason in problem.message
    assert "s3cret" not in problem.message and "9999" not in problem.message


def test_yaml_that_is_not_utf8_is_an_input_error(tmp_path: Path) -> None:
    problem = problem_of(load, tmp_path, b"a: \xff\n")
    assert problem.message.startswith("not UTF-8 text")


# --- problems_from_validation ------------------------------------------------------------------


def ok_tag(value: str) -> str:
    if not value.startswith("ok"):
        raise ValueError(f"{value!r} is not ok")
    return value


class Item(BaseModel):
    d: int
    tag: Annotated[str, AfterValidator(ok_tag)] = "ok"


class Doc(BaseModel):
    name: str
    items: list[Item]
    either: int | Annotated[str, AfterValidator(ok_tag)] = 1


LINES = {(): 1, ("items",): 2, ("items", 0): 3, ("items", 0, "d"): 3, ("either",): 5}


def validation_error(data: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Doc.model_validate(data)
    return caught.value


def test_each_error_is_file_line_field_message() -> None:
    error = validation_error({"name": "n", "items": [{"d": "x"}]})
    (problem,) = problems_from_validation(error, "p.yaml", LINES)
    assert problem == Problem(
        "p.yaml",
        3,
        "items.0.d",
        "Input should be a valid integer, unable to parse string as an integer",
    )
    assert str(problem).startswith("p.yaml:3: items.0.d: Input should be a valid integer")


def test_a_field_without_a_line_takes_its_nearest_parents() -> None:
    error = validation_error({"items": [{"tag": "okay"}]})  # name and items.0.d missing
    problems = problems_from_validation(error, "p.yaml", LINES)
    assert [(p.line, p.field, p.message) for p in problems] == [
        (1, "name", "Field required"),  # the document's own line
        (3, "items.0.d", "Field required"),  # items.0's line
    ]
    assert [p.line for p in problems_from_validation(error, "p.yaml", {})] == [None, None]


def test_a_value_error_loses_its_prefix_and_never_quotes_the_value() -> None:
    error = validation_error({"name": "n", "items": [{"d": 1, "tag": "s3cret"}]})
    (problem,) = problems_from_validation(error, "p.yaml", LINES)
    assert (problem.line, problem.field, problem.message) == (
        3,
        "items.0.tag",
        "the value is not ok",
    )


def test_a_unions_validator_step_is_left_out_of_the_field_name() -> None:
    error = validation_error({"name": "n", "items": [], "either": "s3cret"})
    fields = [(p.line, p.field, p.message) for p in problems_from_validation(error, "p", LINES)]
    assert (5, "either", "the value is not ok") in fields
    assert all("function-" not in field for _, field, _ in fields)
    assert "s3cret" not in repr(fields)


# --- without_quotes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("found unknown tag '!s3cret'", "found unknown tag …"),
        ("found undefined alias 'name'", "found undefined alias …"),
        ("found 'a' here", "found … here"),  # one letter of the file is the file's too
        ('and "double s3cret" too', "and … too"),
        ("'' empty", "… empty"),
        (
            "expected <block end>, but found '<scalar>'",
            "expected <block end>, but found '<scalar>'",
        ),
        ("found character '\\t' that cannot start any token", None),
        ("expected ':' or '-' here", None),
        ("'\\x00' and '\\u2028'", None),
        ("'<Scalar>'", "…"),  # token names are lower case
    ],
)
def test_quoted_input_is_hidden_but_token_names_and_punctuation_stay(
    message: str, shown: str | None
) -> None:
    assert without_quotes(message) == (message if shown is None else shown)
