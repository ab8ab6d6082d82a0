"""ComfyUI's emphasis syntax, parsed into plain text and weights."""

import pytest

from consistentid_core.prompt.emphasis import parse_emphasis, strip_emphasis


@pytest.mark.parametrize(
    "text,segments",
    [
        ("a man", [("a man", 1.0)]),
        ("a (red:1.3) hat", [("a ", 1.0), ("red", 1.3), (" hat", 1.0)]),
        ("((ugly))", [("ugly", pytest.approx(1.21))]),
        ("(a (b:2.0):0.5)", [("a ", 0.5), ("b", 1.0)]),
        (r"\(not weighted\)", [("(not weighted)", 1.0)]),
        ("open (bracket", [("open (bracket", 1.0)]),
        ("(x:.5)", [("x", 0.5)]),
    ],
)
def test_parse_emphasis(text, segments):
    assert parse_emphasis(text) == segments


def test_strip_emphasis_keeps_the_words():
    assert strip_emphasis("((((ugly)))), (duplicate:1.2), morbid") == "ugly, duplicate, morbid"
