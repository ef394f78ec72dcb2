"""A1111 prompt syntax: expected values are A1111's documented results (its
modules/prompt_parser.py docstrings and wiki) and its behaviour on edge cases."""

from __future__ import annotations

import random

import pytest

from huabi.core.prompt_parser import (
    ExtraNetworkTag,
    extract_extra_networks,
    is_break,
    parse_prompt_attention,
    prompt_schedule,
    schedule_entry_index,
    split_composable,
)
from huabi.errors import HuabiError

# ---------------------------------------------------------------- attention

ATTENTION_CASES = {
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0),
        ("house", 1.3 * 1.1 * 1.1),  # weights multiply in the order brackets close
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.1 * 1.1 * 1.1 * 1.1),
        (".", 1.1),
    ],
    "": [("", 1.0)],
    "((word))": [("word", 1.1 * 1.1)],
    "[word]": [("word", 1 / 1.1)],
    "[[word]]": [("word", (1 / 1.1) * (1 / 1.1))],
    "(word:1.4)": [("word", 1.4)],
    "(word: 1.4 )": [("word", 1.4)],
    "((a:1.2):1.5)": [("a", 1.2 * 1.5)],
    "(a:1.2) (b:0.8)": [("a", 1.2), (" ", 1.0), ("b", 0.8)],
    "(a [b] c)": [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)],
    "unmatched) close] here": [("unmatched) close] here", 1.0)],
    "[unclosed square": [("unclosed square", 1 / 1.1)],
    "a:b": [("a:b", 1.0)],
    "x :1.5) y": [("x :1.5) y", 1.0)],  # a weight with no open bracket is text
    "\\\\ and \\)": [("\\ and )", 1.0)],
    "a\\b": [("ab", 1.0)],  # a backslash before an ordinary character is dropped
    "(a:0)": [("a", 0.0)],
    "a BREAK b": [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)],
    "a BREAK": [("a", 1.0), ("BREAK", -1.0), ("", 1.0)],
    "BREAKFAST": [("BREAKFAST", 1.0)],
    "(a BREAK b)": [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)],  # weighted BREAK is no break
}


@pytest.mark.parametrize("text", list(ATTENTION_CASES))
def test_attention_matches_a1111(text):
    got = parse_prompt_attention(text)
    expected = ATTENTION_CASES[text]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_attention_exact_float_of_a1111_docstring():
    runs = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert runs["house"] == 1.5730000000000004  # A1111's printed value, bit for bit
    assert runs["sky"] == 1.4641000000000006


def test_break_run_only_when_unweighted():
    assert is_break(("BREAK", -1.0))
    assert not is_break(("BREAK", -1.1))
    assert not is_break(("BREAK", 1.0))


def test_malformed_weight_is_text_not_a_crash():
    # A1111 raises ValueError on these; huabi keeps the text.
    assert parse_prompt_attention("(a:1.2.3)") == [("a:1.2.3)", 1.1)]
    assert parse_prompt_attention("(a:.)") == [("a:.)", 1.1)]


# ---------------------------------------------------------------- scheduling

SCHEDULE_CASES_10 = {
    "test": [(10, "test")],
    "a [b:3]": [(3, "a "), (10, "a b")],
    "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
    "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")],
    "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)],
    "[fe|]male": [(s, "female" if s % 2 else "male") for s in range(1, 11)],
    "[fe|||]male": [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)],
    # the brief's example and the three editing forms
    "a [b:c:5] d": [(5, "a b d"), (10, "a c d")],
    "a [b::5] d": [(5, "a b d"), (10, "a  d")],
    "[b:c:0.25]": [(2, "b"), (10, "c")],  # 0.25 * 10 = 2.5 -> step 2 (truncated, as A1111)
    "[b:c:1.0]": [(10, "b")],  # a fraction of 1 never switches
    "[b:c:0]": [(10, "c")],
    "[b:c:-3]": [(10, "c")],
    "[b:c:99]": [(10, "b")],
    "[b:c:1e1]": [(10, "b")],  # no decimal point: a step number (10)
    "(x [b:c:4]:1.2)": [(4, "(x b:1.2)"), (10, "(x c:1.2)")],
    "[a:[b|c]:0.5]": [(s, "a" if s <= 5 else ("b" if s % 2 else "c")) for s in range(1, 11)],
    # the "|" outside alternation makes the whole prompt unschedulable, as in A1111
    "a | b [c:3]": [(10, "a | b [c:3]")],
    "[a|b:0.5]": [(10, "[a|b:0.5]")],
    "(a|b) [c:3]": [(10, "(a|b) [c:3]")],
    "[a:b]": [(10, "[a:b]")],
    "[a:b:c:3]": [(10, "[a:b:c:3]")],
    "trailing \\": [(10, "trailing \\")],
    "esc \\[a:3\\] [b:3]": [(3, "esc \\[a:3\\] "), (10, "esc \\[a:3\\] b")],
}


@pytest.mark.parametrize("prompt", list(SCHEDULE_CASES_10))
def test_schedule_matches_a1111(prompt):
    assert prompt_schedule(prompt, 10) == SCHEDULE_CASES_10[prompt]


def test_a1111_wiki_example_100_steps():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_hires_schedule():
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:13] c", 10, hires_steps=10) == [(3, "a  c"), (10, "a b c")]


@pytest.mark.parametrize(
    ("steps", "hires", "message"),
    [
        (0, None, "steps must be an integer >= 1, got 0"),
        (2.5, None, "steps must be an integer >= 1, got 2.5"),
        (10, 0, "hires_steps must be an integer >= 1, got 0"),
    ],
)
def test_schedule_bad_steps(steps, hires, message):
    with pytest.raises(HuabiError, match=message):
        prompt_schedule("a", steps, hires_steps=hires)


def test_schedule_entry_index_follows_a1111_counter():
    # A1111's denoiser counts calls from 0; an entry holds while count <= its last step.
    last_steps = [5, 10]
    assert [schedule_entry_index(last_steps, s) for s in range(12)] == [0] * 6 + [1] * 6


def test_deep_nesting_does_not_crash():
    deep = "[" * 5000 + "a:3" + "]" * 5000
    schedule = prompt_schedule(deep, 10)
    assert schedule[-1][0] == 10
    assert parse_prompt_attention("(" * 5000 + "a")[0][0] == "a"


# ---------------------------------------------------------------- AND


def test_split_composable():
    assert split_composable("a cat :1.2 AND a dog :0.8") == [("a cat", 1.2), (" a dog", 0.8)]
    assert split_composable("a cat") == [("a cat", 1.0)]
    assert split_composable("(word:1.2)") == [("(word:1.2)", 1.0)]  # weight syntax, not an AND weight
    assert split_composable("word:1.2") == [("word", 1.2)]  # A1111 reads this as an AND weight too
    assert split_composable("BRAND AND x: -0.5") == [("BRAND", 1.0), (" x", -0.5)]
    assert split_composable("a AND") == [("a", 1.0), ("", 1.0)]
    assert split_composable("a :.5") == [("a", 0.5)]


# ---------------------------------------------------------------- extra networks


def test_extract_extra_networks():
    text, tags = extract_extra_networks("a <lora:foo:0.8> cat, <lora:bar:0.5:0.7><hypernet:h:1> <lyco:l:te=1:unet=0.5> x")
    assert text == "a  cat,   x"
    assert tags == [
        ExtraNetworkTag("lora", "foo", (0.8,)),
        ExtraNetworkTag("lora", "bar", (0.5, 0.7)),
        ExtraNetworkTag("hypernet", "h", (1.0,)),
        ExtraNetworkTag("lyco", "l", (), (("te", "1"), ("unet", "0.5"))),
    ]
    assert extract_extra_networks("<lora:only-name>") == ("", [ExtraNetworkTag("lora", "only-name")])
    assert extract_extra_networks("a <3 b> c") == ("a <3 b> c", [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<lora:name:abc>", r"prompt: extra-network tag <lora:name:abc> has 'abc' where a number belongs"),
        ("<lora:name:>", r"prompt: extra-network tag <lora:name:> has '' where a number belongs"),
        ("<lora::1>", r"prompt: extra-network tag <lora::1> has no name"),
    ],
)
def test_extra_network_errors(text, message):
    with pytest.raises(HuabiError, match=message):
        extract_extra_networks(text)


# ---------------------------------------------------------------- fuzz

FUZZ_ALPHABET = list("[]()|:\\ ab") + ["1", "0.5", "BREAK", " AND ", ":1.2)", "<lora:x:1>", "\n"]


def test_fuzz_never_crashes():
    rng = random.Random(1234)
    for _ in range(400):
        text = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 30)))
        stripped, _tags = extract_extra_networks(text)
        for sub, _weight in split_composable(stripped):
            schedule = prompt_schedule(sub, 7)
            assert schedule[-1][0] == 7
            assert [s for s, _ in schedule] == sorted({s for s, _ in schedule})
            for _end, scheduled_text in schedule:
                runs = parse_prompt_attention(scheduled_text)
                assert runs and all(isinstance(t, str) and isinstance(w, float) for t, w in runs)
