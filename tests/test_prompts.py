"""parse_weighted: optimizedSD's "text:weight" sub-prompts."""

import math

import pytest

from optimizedSD.sampling.prompts import parse_weighted


def assert_parts(got, expected):
    assert [text for text, _ in got] == [text for text, _ in expected]
    for (_, w_got), (_, w_expected) in zip(got, expected):
        assert math.isclose(w_got, w_expected, rel_tol=1e-12)


def test_readme_example():
    assert_parts(
        parse_weighted("a tabby cat:0.25 a white duck:0.75"),
        [("a tabby cat", 0.25), ("a white duck", 0.75)],
    )


def test_weights_are_normalised():
    got = parse_weighted("a cat:1 a dog:3")
    assert_parts(got, [("a cat", 0.25), ("a dog", 0.75)])
    got = parse_weighted("a:2 b:2 c:4")
    assert_parts(got, [("a", 0.25), ("b", 0.25), ("c", 0.5)])
    assert math.isclose(sum(w for _, w in got), 1.0)


def test_trailing_part_gets_weight_one():
    assert_parts(parse_weighted("a cat:3 a dog"), [("a cat", 0.75), ("a dog", 0.25)])


def test_blank_trailing_part_is_dropped():
    assert_parts(parse_weighted("a cat:1 a dog:1   \n"), [("a cat", 0.5), ("a dog", 0.5)])


def test_no_colon_is_one_prompt_unchanged():
    assert parse_weighted("a photo of a cat") == [("a photo of a cat", 1.0)]
    assert parse_weighted("  spaced  ") == [("  spaced  ", 1.0)]
    assert parse_weighted("") == [("", 1.0)]


def test_single_weighted_prompt_drops_the_weight_text():
    assert parse_weighted("a cat:0.3") == [("a cat", 1.0)]


@pytest.mark.parametrize(
    "number, value",
    [("2", 2.0), ("0.75", 0.75), (".5", 0.5), ("5.", 5.0), ("+1.5", 1.5), ("1e-1", 0.1), ("2E1", 20.0)],
)
def test_number_forms(number, value):
    assert_parts(parse_weighted(f"a:{number} b:{value}"), [("a", 0.5), ("b", 0.5)])


def test_negative_weight_allowed_when_total_positive():
    assert_parts(parse_weighted("a cat:2 a dog:-1"), [("a cat", 2.0), ("a dog", -1.0)])


def test_whitespace_around_parts_is_stripped():
    assert_parts(parse_weighted("  a cat :1\t\ta dog:1 "), [("a cat", 0.5), ("a dog", 0.5)])


def test_any_whitespace_ends_a_weight():
    assert_parts(parse_weighted("a cat:1\na dog:1"), [("a cat", 0.5), ("a dog", 0.5)])


@pytest.mark.parametrize(
    "prompt",
    [
        "time: 10:30",
        "a poster, 16:9, cinematic",
        "John 3:16",
        "at 10:30:15",
        "https://example.com/cat.png",
        "http://localhost:8080/x a cat",
        "a cat: fluffy, cute",
        "a cat:",
        "a cat:0.5,",  # weight must end at whitespace
        "ratio 4:3",
        "a cat:nan a dog:inf",  # only decimal numbers are weights
        "a cat:1_000",
    ],
)
def test_colons_that_are_text(prompt):
    assert parse_weighted(prompt) == [(prompt, 1.0)]


def test_text_colons_mixed_with_weights():
    assert_parts(
        parse_weighted("time: 10:30, a clock:2 https://x.org/y a dog:1"),
        [("time: 10:30, a clock", 2 / 3), ("https://x.org/y a dog", 1 / 3)],
    )


def test_digit_before_colon_with_decimal_weight_is_a_weight():
    assert_parts(
        parse_weighted("a photo from 1990:0.5 a painting:0.5"),
        [("a photo from 1990", 0.5), ("a painting", 0.5)],
    )
    # ...but a bare integer after a digit reads as a time or ratio.
    assert parse_weighted("from 1990:2") == [("from 1990:2", 1.0)]


def test_empty_sub_prompt_is_kept():
    # An empty sub-prompt is the unconditional text; its weight is explicit, so keep it.
    assert_parts(parse_weighted(":1 a cat:3"), [("", 0.25), ("a cat", 0.75)])


def test_zero_weight_is_kept():
    assert_parts(parse_weighted("a cat:0 a dog:1"), [("a cat", 0.0), ("a dog", 1.0)])


@pytest.mark.parametrize("prompt", ["a cat:0", "a cat:0 a dog:0.0", "a cat:1 a dog:-1", "a cat:-1", "a:-2 b"])
def test_non_positive_total_raises(prompt):
    with pytest.raises(ValueError, match="sum to a positive number"):
        parse_weighted(prompt)
