"""A1111 styles.csv: parsing and applying styles to prompts."""

from __future__ import annotations

import pytest

from huabi.core.styles import PromptStyle, apply_style_text, apply_styles, parse_styles_csv
from huabi.errors import HuabiError

# As A1111 writes it: quoted fields with commas, an empty separator row, an extra column.
STYLES_CSV = (
    "name,prompt,negative_prompt,description\n"
    '"Cinematic","cinematic still of {prompt}, film grain","cartoon, drawing",""\n'
    ',,,\n'
    'Sharp,"highly detailed, sharp focus",blurry,\n'
    'NegOnly,,"lowres, bad anatomy",\n'
)


def test_parse_a1111_file():
    styles = parse_styles_csv("\ufeff" + STYLES_CSV)
    assert list(styles) == ["Cinematic", "Sharp", "NegOnly"]
    assert styles["Cinematic"] == PromptStyle("Cinematic", "cinematic still of {prompt}, film grain", "cartoon, drawing")
    assert styles["NegOnly"].prompt == ""


def test_placeholder_and_append_rules():
    assert apply_style_text("a cat", "photo of {prompt}, 35mm") == "photo of a cat, 35mm"
    assert apply_style_text("a cat", "sharp focus") == "a cat, sharp focus"
    assert apply_style_text("", "sharp focus") == "sharp focus"
    assert apply_style_text("a cat", "") == "a cat"
    assert apply_style_text("", "photo of {prompt}") == "photo of "


def test_styles_apply_in_order_to_prompt_and_negative():
    styles = parse_styles_csv(STYLES_CSV)
    prompt, negative = apply_styles("a cat", "ugly", styles, ["Cinematic", "Sharp"])
    assert prompt == "cinematic still of a cat, film grain, highly detailed, sharp focus"
    assert negative == "ugly, cartoon, drawing, blurry"
    assert apply_styles("a cat", "", styles, ["NegOnly"]) == ("a cat", "lowres, bad anatomy")
    assert apply_styles("a cat", "", styles, []) == ("a cat", "")


def test_unknown_style_names_it_and_lists_the_available():
    styles = parse_styles_csv(STYLES_CSV)
    with pytest.raises(HuabiError) as caught:
        apply_styles("x", "", styles, ["Sharp", "Noir"], source="/home/u/styles.csv")
    assert str(caught.value) == (
        "style: unknown style 'Noir' in /home/u/styles.csv; available: Cinematic, Sharp, NegOnly"
    )
    with pytest.raises(HuabiError, match=r"unknown style 'Noir' in styles.csv; available: none"):
        apply_styles("x", "", {}, ["Noir"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("title,prompt\nA,b\n", "styles: s.csv: missing column name, negative_prompt (the first row must name"),
        ("", "styles: s.csv: missing column name, prompt, negative_prompt"),
        ("name,prompt,negative_prompt\nA,x,y\nA,z,w\n", "styles: s.csv: style 'A' is defined twice (line 3)"),
        ('name,prompt,negative_prompt\nA,"x"y,z\n', "styles: s.csv: line 2: ',' expected after"),
        ('name,prompt,negative_prompt\nA,x,y\n"B', "styles: s.csv: line 3: unexpected end of data"),
    ],
)
def test_bad_styles_files(text, expected):
    with pytest.raises(HuabiError) as caught:
        parse_styles_csv(text, source="s.csv")
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)
