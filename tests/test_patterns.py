"""Patterns shared by every front end: globs, type checks, and the names listed on a miss."""

import pytest

from tensorstate_onnx.patterns import as_patterns, matches_any, preview


def test_as_patterns_takes_one_string_a_sequence_or_none():
    assert as_patterns("Conv", "attach_to") == ["Conv"]
    assert as_patterns(("Conv", "features.*"), "attach_to") == ["Conv", "features.*"]
    assert as_patterns(None, "exclude") == []
    with pytest.raises(TypeError, match=r"exclude entries must be strings, got 3"):
        as_patterns(["Conv", 3], "exclude")
    with pytest.raises(TypeError, match=r"attach_to takes a name or a list of names, got int 5"):
        as_patterns(5, "attach_to")


def test_matches_any_is_a_case_sensitive_glob_over_every_name():
    assert matches_any(["Conv*"], ("Relu", "Conv2d"))
    assert not matches_any(["conv*"], ("Conv2d",))
    assert matches_any(["features.?.conv"], {"features.1.conv"})
    assert not matches_any([], ("Conv",))
    assert not matches_any(["Conv"], iter(()))


def test_preview_lists_some_names_and_counts_the_rest():
    assert preview([]) == "(none)"
    assert preview(["a", "b"]) == "a, b"
    assert preview([str(i) for i in range(12)], limit=3) == "0, 1, 2, ... (9 more)"
