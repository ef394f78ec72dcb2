"""Wildcards and dynamic prompts (dynamicprompts library): random and combinatorial modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.service.wildcards import MAX_COMBINATIONS, expand_request


@pytest.fixture()
def wildcards_dir(tmp_path) -> Path:
    (tmp_path / "colors.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    (tmp_path / "animals").mkdir()
    (tmp_path / "animals" / "cats.txt").write_text("# a comment\ntabby\nsiamese\n", encoding="utf-8")
    return tmp_path


def test_plain_prompt_is_returned_unchanged(wildcards_dir):
    request = GenerationRequest("(word:1.2) [a:b:5] [c|d] apple", seed=1, batch_size=3)
    assert expand_request(request, wildcards_dir=wildcards_dir) == [request]


def test_random_mode_one_draw_per_image_seeded_by_the_image_seed(wildcards_dir):
    request = GenerationRequest("a __colors__ {cat|dog}, (shiny:1.2), [oil:paint:5], [a|b]",
                                negative_prompt="{blurry|lowres}", seed=10, batch_size=2, batch_count=3)
    expanded = expand_request(request, wildcards_dir=wildcards_dir)
    assert [r.seed for r in expanded] == [10, 11, 12, 13, 14, 15]
    assert all(r.batch_size == 1 and r.batch_count == 1 for r in expanded)
    for r in expanded:
        color, animal = r.prompt.split(",")[0].split()[1:]
        assert color in {"red", "green", "blue"} and animal in {"cat", "dog"}
        assert r.prompt.endswith(", (shiny:1.2), [oil:paint:5], [a|b]")  # A1111 syntax untouched
        assert r.negative_prompt in {"blurry", "lowres"}
        assert dict(r.extra) == {"Template": request.prompt, "Negative Template": "{blurry|lowres}"}
    assert len({r.prompt for r in expanded}) > 1
    assert expand_request(request, wildcards_dir=wildcards_dir) == expanded  # reproducible
    alone = expand_request(request.replace(seed=13, batch_size=1, batch_count=1), wildcards_dir=wildcards_dir)
    assert alone[0].prompt == expanded[3].prompt  # an image's draw depends only on its own seed


def test_pick_several_and_nested_wildcard_folder(wildcards_dir):
    [request] = expand_request(GenerationRequest("{2$$a|b|c} __animals/cats__", seed=3), wildcards_dir=wildcards_dir)
    picks, cat = request.prompt.rsplit(" ", 1)
    assert len(set(picks.split(","))) == 2 and set(picks.split(",")) <= {"a", "b", "c"}
    assert cat in {"tabby", "siamese"}


def test_combinatorial_mode_one_request_per_combination(wildcards_dir):
    request = GenerationRequest("a __colors__ {cat|dog}", seed=5, batch_size=2)
    expanded = expand_request(request, wildcards_dir=wildcards_dir, combinatorial=True)
    assert sorted(r.prompt for r in expanded) == sorted(
        f"a {c} {a}" for c in ("red", "green", "blue") for a in ("cat", "dog")
    )
    assert all(r.seed == 5 and r.batch_size == 2 for r in expanded)
    assert all(dict(r.extra)["Template"] == "a __colors__ {cat|dog}" for r in expanded)


def test_existing_template_key_is_replaced_not_duplicated(wildcards_dir):
    request = GenerationRequest("{a|b}", seed=1, extra=(("Template", "old"), ("Foo", "bar")))
    [expanded] = expand_request(request, wildcards_dir=wildcards_dir)
    assert [k for k, _ in expanded.extra] == ["Foo", "Template"]


@pytest.mark.parametrize(
    ("prompt", "combinatorial", "expected"),
    [
        ("a __flowers__", False, "wildcards: no wildcard file for __flowers__ in {dir} (expected flowers.txt)"),
        ("a __flowers__", True, "wildcards: no wildcard file for __flowers__ in {dir}"),
        ("a {red|blue", False, "wildcards: cannot read the prompt template 'a {red|blue': "),
        ("{a|b|c|d|e|f|g|h|i|j} {a|b|c|d|e|f|g|h|i|j} {a|b|c|d|e|f|g|h|i|j} {a|b}", True,
         f"wildcards: the prompt has more than {MAX_COMBINATIONS} combinations"),
    ],
)
def test_bad_templates_are_one_line_errors(wildcards_dir, prompt, combinatorial, expected):
    with pytest.raises(HuabiError) as caught:
        expand_request(GenerationRequest(prompt, seed=1), wildcards_dir=wildcards_dir, combinatorial=combinatorial)
    assert expected.replace("{dir}", str(wildcards_dir)) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_wildcards_folder_names_the_wildcard(tmp_path):
    with pytest.raises(HuabiError, match=r"no wildcard file for __colors__ in .*nowhere"):
        expand_request(GenerationRequest("__colors__", seed=1), wildcards_dir=tmp_path / "nowhere")


def test_unresolved_seed_is_an_error(wildcards_dir):
    with pytest.raises(HuabiError, match=r"seed: resolve -1 to a concrete seed"):
        expand_request(GenerationRequest("{a|b}"), wildcards_dir=wildcards_dir)
