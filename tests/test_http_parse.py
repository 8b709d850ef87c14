"""Parsing what a twistnet-http client sends, without IO: a submission into a Job, queries."""

from __future__ import annotations

import json

import pytest

from twistnet.http.errors import ApiError
from twistnet.http.parse import int_query, submission, whole_number
from twistnet.http.tools import BUILTIN_TOOLS, catalogue

TOOLS = catalogue(BUILTIN_TOOLS)
JSON = b"application/json"


def parse(document, content_type=JSON):
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return submission(body, content_type, TOOLS, now=1234.5, job_id="f" * 32)


def test_a_valid_submission_is_a_queued_job_with_the_given_id_and_time():
    job = parse({"tool": "echo", "params": {"text": "hi"}, "timeout": 2})
    assert (job.id, job.tool, job.params, job.timeout) == ("f" * 32, "echo", {"text": "hi"}, 2.0)
    assert job.created == 1234.5 and job.status == "queued"


def test_the_timeout_defaults_to_the_tools_and_parameters_are_optional():
    job = parse({"tool": "date"})
    assert job.timeout == TOOLS["date"].timeout and job.params == {}


@pytest.mark.parametrize(
    "content_type", [b"application/json; charset=utf-8", b"Application/JSON", b" application/json"]
)
def test_the_media_type_ignores_case_parameters_and_spaces(content_type):
    assert parse({"tool": "date"}, content_type).tool == "date"


@pytest.mark.parametrize(
    ("document", "content_type", "status", "detail"),
    [
        ({"tool": "date"}, None, 415, "application/json"),
        ({"tool": "date"}, b"text/json", 415, "application/json"),
        (b"{", JSON, 400, "not valid JSON"),
        (b"\xff", JSON, 400, "not valid UTF-8"),
        (b'{"tool": "sleep", "params": {"seconds": Infinity}}', JSON, 400, "Infinity is not JSON"),
        (b"[" * 100_000, JSON, 400, "nested too deeply"),
        ([], JSON, 400, "must be a JSON object"),
        ({"tool": "date", "shell": 1}, JSON, 400, "Unknown field 'shell'"),
        ({"tool": 1}, JSON, 400, "'tool' is required"),
        ({"tool": "nope"}, JSON, 404, "No tool named 'nope'"),
        ({"tool": "echo", "params": {}}, JSON, 400, "'text': is required"),
        ({"tool": "date", "timeout": True}, JSON, 400, "more than 0"),
        ({"tool": "date", "timeout": 0}, JSON, 400, "more than 0"),
        ({"tool": "date", "timeout": "5"}, JSON, 400, "more than 0"),
        ({"tool": "date", "timeout": 1e9}, JSON, 400, "at most"),
    ],
)
def test_a_bad_submission_is_the_error_to_answer(document, content_type, status, detail):
    with pytest.raises(ApiError) as raised:
        parse(document, content_type)
    assert raised.value.status == status
    assert detail in raised.value.detail


@pytest.mark.parametrize(
    ("text", "number"),
    [("0", 0), ("42", 42), ("9" * 18, 10**18 - 1), ("-1", None), ("\u00b2", None), ("", None)],
)
def test_whole_numbers_are_ascii_digits_within_bounds(text, number):
    assert whole_number(text, 10**18 - 1) == number


def test_an_int_query_is_its_default_when_absent_and_refused_out_of_bounds():
    assert int_query({}, b"limit", 50, 1, 500) == 50
    assert int_query({b"limit": [b"9", b"7"]}, b"limit", 50, 1, 500) == 7
    for bad in (b"0", b"501", b"x"):
        with pytest.raises(ApiError, match="limit must be a whole number, 1-500"):
            int_query({b"limit": [bad]}, b"limit", 50, 1, 500)
