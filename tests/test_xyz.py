"""The X/Y/Z plot: axis parsing, the job grid, and ``huabi xyz`` end to end on a tiny SD1 model."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run
from huabi.core.infotext import parse_infotext
from huabi.core.request import GenerationRequest
from huabi.core.xyz import MAX_XYZ_CELLS, parse_axis, parse_axis_spec, plan_xyz, split_values
from huabi.errors import HuabiError
from huabi.service.engine import Engine
from huabi.service.pngio import read_infotext
from huabi.service.xyz import (
    draw_xyz_grid,
    grid_infotext,
    grid_layout,
    label_font_px,
    load_label_font,
    run_xyz,
)


def values(spec: str) -> tuple:
    return parse_axis_spec(spec).values


# --------------------------------------------------------------------------- axis values


def test_lists_and_quoted_values():
    assert values("Steps: 10, 20,30") == (10, 20, 30)
    assert split_values('a, "b, c",  d ,, ') == ["a", "b, c", "d"]
    assert values('Prompt S/R: apple, "pear, ripe", dog') == ("apple", "pear, ripe", "dog")
    assert values("Sampler: euler a, DPM++ 2M, k_lms") == ("Euler a", "DPM++ 2M", "LMS")
    assert values("Schedule type: karras, sgm_uniform") == ("Karras", "SGM Uniform")
    assert values("Size: 64x64, 128 x 64") == ((64, 64), (128, 64))
    assert values("Checkpoint name: models/a.safetensors, b") == ("models/a.safetensors", "b")
    assert parse_axis_spec("Checkpoint name: models/a.safetensors, b").labels() == ["a", "b"]
    assert parse_axis_spec("cfg: 7, 7.5").labels() == ["CFG scale: 7", "CFG scale: 7.5"]
    assert parse_axis_spec("Nothing").labels() == [""] and parse_axis_spec(None).type == "Nothing"


def test_integer_ranges():
    assert values("Steps: 1-5") == (1, 2, 3, 4, 5)
    assert values("Steps: 1-10 (+2)") == (1, 3, 5, 7, 9)
    assert values("Steps: 10-1 (-3)") == (10, 7, 4, 1)
    assert values("Steps: 1-10 [4]") == (1, 4, 7, 10)
    assert values("Steps: 1-10 [3]") == (1, 5, 10)  # 5.5 rounds down, as A1111's int(linspace)
    assert values("Steps: 1-3, 8, 20-30 [2]") == (1, 2, 3, 8, 20, 30)
    assert values("Seed: -1, 5") == (-1, 5)  # a lone -1 is a number, not a range


def test_float_ranges():
    assert values("CFG scale: 3-9 (+3)") == (3.0, 6.0, 9.0)
    assert values("CFG scale: 3-9 (+1.5)") == (3.0, 4.5, 6.0, 7.5, 9.0)
    assert values("CFG scale: 1-2 [3]") == (1.0, 1.5, 2.0)
    assert values("CFG scale: 1-2 (+0.1)")[-1] == 2.0 and len(values("CFG scale: 1-2 (+0.1)")) == 11
    assert values("CFG scale: 7, 7.5") == (7.0, 7.5)


def test_prompt_search_replace():
    axis = parse_axis("Prompt S/R", "apple, pear, dog", name="X")
    base = GenerationRequest("a red apple, apple tree", negative_prompt="rotten apple", seed=3)
    plan = plan_xyz(base, axis)
    prompts = [(c.request.prompt, c.request.negative_prompt) for c in plan.cells]
    assert prompts == [
        ("a red apple, apple tree", "rotten apple"),  # the first value is the search string: unchanged
        ("a red pear, pear tree", "rotten pear"),
        ("a red dog, dog tree", "rotten dog"),
    ]
    # Found only in the negative prompt is enough.
    plan_xyz(GenerationRequest("x", negative_prompt="blurry"), parse_axis("Prompt S/R", "blurry, sharp"))


def test_job_grid_order_and_seed():
    base = GenerationRequest("a red apple", seed=-1)
    plan = plan_xyz(base, parse_axis_spec("Steps: 1, 2"), parse_axis_spec("CFG scale: 3, 5", name="Y"),
                    parse_axis_spec("Sampler: Euler, Heun", name="Z"), rng=random.Random(0))
    # Z outermost, then Y, then X.
    positions = [(c.x_index, c.y_index, c.z_index) for c in plan.cells]
    assert positions == [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
    assert len({c.request.seed for c in plan.cells}) == 1 and plan.base.seed != -1  # -1 resolved once
    cell = plan.cell_at(1, 0, 1)
    assert (cell.request.steps, cell.request.cfg_scale, cell.request.sampler) == (2, 3.0, "Heun")
    # A Checkpoint axis goes outermost so each model loads once.
    plan = plan_xyz(base, parse_axis_spec("Checkpoint name: a, b"), parse_axis_spec("Steps: 1, 2", name="Y"))
    assert [(c.request.model, c.request.steps) for c in plan.cells] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert [(c.x_index, c.y_index) for c in plan.cells] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Seed axis: each -1 gets its own random seed, recorded for the grid.
    plan = plan_xyz(base, parse_axis_spec("Seed: -1, 7, -1"), rng=random.Random(1))
    seeds = [c.request.seed for c in plan.cells]
    assert seeds[1] == 7 and -1 not in seeds and seeds[0] != seeds[2]
    assert dict(plan.infotext_params())["Fixed X Values"] == ", ".join(map(str, seeds))


def test_grid_infotext_adds_axes_before_version():
    text = "a cat\nNegative prompt: dog\nSteps: 2, Seed: 1, Version: huabi 0.1"
    params = [("Script", "X/Y/Z plot"), ("X Type", "Steps"), ("X Values", "1, 2")]
    out = grid_infotext(text, params)
    assert out == 'a cat\nNegative prompt: dog\nSteps: 2, Seed: 1, Script: X/Y/Z plot, X Type: Steps, X Values: "1, 2", Version: huabi 0.1'
    assert parse_infotext(out).params["X Values"] == "1, 2"


def test_grid_without_labels_is_just_the_cells():
    red, blue = Image.new("RGB", (16, 8), "red"), Image.new("RGB", (16, 8), "blue")
    grid = draw_xyz_grid([[red, blue]], ["", ""], [""])
    assert grid.size == (32, 8)
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((31, 7)) == (0, 0, 255)


def test_label_size_follows_the_cell_unless_given():
    narrow, wide = Image.new("RGB", (128, 128)), Image.new("RGB", (512, 128))
    default_bands = [draw_xyz_grid([[image]], ["Seed: 1"], [""]).height - 128 for image in (narrow, wide)]
    assert default_bands[0] < default_bands[1]  # A1111: the label grows with the cell
    fixed_bands = [draw_xyz_grid([[image]], ["Seed: 1"], [""], font_px=18).height - 128 for image in (narrow, wide)]
    assert fixed_bands[0] == fixed_bands[1] == grid_layout((128, 128), 1, ["Seed: 1"], [""], "", load_label_font(18), 18).top_px


# --------------------------------------------------------------------------- end to end


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def xyz(capsys, model: Path, out: Path, *extra) -> list[Path]:
    code, stdout, stderr = run(capsys, "xyz", "a red apple", "--model", model, "--size", "64x64", "--steps", "1",
                               "--seed", "11", "--sampler", "Euler", "--out", out, "--quiet", *extra)
    assert code == 0, stderr
    return [Path(line) for line in stdout.splitlines()]


def test_two_by_two_plot(capsys, tiny_sd1_file, tmp_path):
    paths = xyz(capsys, tiny_sd1_file, tmp_path / "plot", "--x", "Steps: 1, 2", "--y", "CFG scale: 3, 5",
                "-n", "blurry")
    assert [p.name for p in paths] == ["00000-11.png", "00001-11.png", "00002-11.png", "00003-11.png",
                                       "xyz_grid-0000.png"]
    cells = [parse_infotext(read_infotext(p)) for p in paths[:4]]
    assert [(c.params["Steps"], c.params["CFG scale"]) for c in cells] == [("1", "3"), ("2", "3"), ("1", "5"), ("2", "5")]
    assert all(c.params["Seed"] == "11" and c.negative_prompt == "blurry" for c in cells)
    assert all("X Type" not in c.params for c in cells)  # cells carry a plain, reproducible infotext

    grid = Image.open(paths[-1])
    layout = grid_layout((64, 64), 2, ["Steps: 1", "Steps: 2"], ["CFG scale: 3", "CFG scale: 5"], "",
                         load_label_font(label_font_px(64, 64)))
    assert layout.left_px > 0 and layout.top_px > 0
    assert grid.size == (2 * 64 + layout.left_px, 2 * 64 + layout.top_px)
    # The cell at column 1, row 0 is pasted unchanged below the labels.
    cell = pixels(paths[1])
    placed = np.asarray(grid.convert("RGB"), dtype=np.int16)[layout.top_px:layout.top_px + 64,
                                                                layout.left_px + 64:layout.left_px + 128]
    assert np.array_equal(cell, placed)
    grid_info = parse_infotext(read_infotext(paths[-1]))
    assert grid_info.params["Script"] == "X/Y/Z plot"
    assert (grid_info.params["X Type"], grid_info.params["X Values"]) == ("Steps", "1, 2")
    assert (grid_info.params["Y Type"], grid_info.params["Y Values"]) == ("CFG scale", "3, 5")
    assert {k: v for k, v in grid_info.params.items() if k not in ("Script", "X Type", "X Values", "Y Type",
                                                                    "Y Values")} == cells[0].params

    # Each cell is exactly the image `huabi generate` makes alone with its parameters.
    code, stdout, stderr = run(capsys, "generate", "a red apple", "-n", "blurry", "--model", tiny_sd1_file,
                               "--size", "64x64", "--steps", "2", "--cfg", "5", "--seed", "11",
                               "--sampler", "Euler", "--out", tmp_path / "alone", "--quiet")
    assert code == 0, stderr
    alone = Path(stdout.strip())
    assert np.array_equal(pixels(alone), pixels(paths[3]))
    assert read_infotext(alone) == read_infotext(paths[3])


def test_z_axis_gives_one_grid_per_value_and_a_grid_of_grids(capsys, tiny_sd1_file, tmp_path):
    paths = xyz(capsys, tiny_sd1_file, tmp_path, "--x", "Seed: 1, 2", "--z", "Prompt S/R: red, green")
    assert [p.name for p in paths][4:] == ["xyz_grid-0000.png", "xyz_grid-0001.png", "xyz_grid-0002.png"]
    prompts = [parse_infotext(read_infotext(p)).prompt for p in paths[:4]]
    assert prompts == ["a red apple", "a red apple", "a green apple", "a green apple"]
    z_grids = [Image.open(p) for p in paths[4:6]]
    layout = grid_layout((64, 64), 2, ["Seed: 1", "Seed: 2"], [""], "red", load_label_font(label_font_px(64, 64)))
    assert layout.left_px == 0 and layout.title_px > 0  # no Y axis: no label column; Z value as a title
    assert all(g.size == (128, 64 + layout.top_px) for g in z_grids)
    assert Image.open(paths[6]).size == (256, 64 + layout.top_px)
    assert parse_infotext(read_infotext(paths[5])).prompt == "a green apple"  # its own first cell
    info = parse_infotext(read_infotext(paths[6])).params
    assert (info["Z Type"], info["Z Values"], info["Fixed X Values"]) == ("Prompt S/R", "red, green", "1, 2")


class CountingEngine(Engine):
    """A real engine that records which model file each load call asked for."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.loaded: list[str] = []

    def load(self, model, vae=None, extra=()):
        bundle = super().load(model, vae, extra)
        if not self.loaded or self.loaded[-1] != str(model):
            self.loaded.append(str(model))
        return bundle


def test_checkpoint_axis_loads_each_model_once(tiny_sd1_file, tmp_path):
    other = tmp_path / "other.safetensors"
    shutil.copyfile(tiny_sd1_file, other)
    base = GenerationRequest("a red apple", steps=1, seed=4, width_px=64, height_px=64, sampler="Euler")
    plan = plan_xyz(base, parse_axis_spec("Steps: 1, 2"), parse_axis_spec(f"Checkpoint name: {tiny_sd1_file}, {other}", name="Y"),
                    parse_axis_spec("CFG scale: 1, 4", name="Z"))
    engine = CountingEngine(device="cpu", dtype="fp32")
    result = run_xyz(engine, plan, out_dir=None)
    assert engine.loaded == [str(tiny_sd1_file), str(other)]
    assert len(result.cells) == 8 and len(result.grids) == 3 and result.grid_paths == ()
    names = [parse_infotext(c.infotext).params["Model"] for c in result.cells]
    assert names == [tiny_sd1_file.stem] * 4 + ["other"] * 4


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    return {
        "unknown axis": (["--x", "Stepz: 1, 2"], "xyz: unknown X axis type 'Stepz'; valid: Nothing, Seed, Steps"),
        "no values": (["--x", "Seed: 1", "--y", "Steps:  ,"], "xyz: Y axis Steps: no values given"),
        "not TYPE: VALUES": (["--x", "Steps 1 2"], "xyz: --x expects 'TYPE: VALUES'"),
        "bad sampler": (["--x", "Sampler: Euler, Eular"], "xyz: X axis Sampler: unknown sampler 'Eular'; valid: Euler"),
        "bad schedule": (["--x", "Schedule type: Fancy"], "xyz: X axis Schedule type: unknown schedule type 'Fancy'"),
        "bad number": (["--x", "Steps: ten"], "xyz: X axis Steps: 'ten' is not a whole number"),
        "bad float": (["--x", "CFG scale: high"], "xyz: X axis CFG scale: 'high' is not a number"),
        "bad size": (["--x", "Size: 64 by 64"], "xyz: X axis Size: expected WIDTHxHEIGHT"),
        "size not multiple of 8": (["--x", "Size: 60x64"], "xyz: X axis Size: width_px: must be a multiple of 8, got 60"),
        "steps out of range": (["--x", "Steps: 0, 1"], "xyz: X axis Steps: steps: must be from 1 to 1000, got 0"),
        "step zero": (["--x", "Steps: 1-5 (+0)"], "xyz: X axis Steps: range '1-5 (+0)' has step 0"),
        "empty range": (["--x", "Steps: 5-1"], "xyz: X axis Steps: range '5-1' gives no values"),
        "huge range": (["--x", "Seed: 1-100000"], f"gives 100000 values; at most {MAX_XYZ_CELLS} images per plot"),
        "too many cells": (["--x", "Seed: 1-20", "--y", "Steps: 1-20"],
                           f"xyz: the plot has 400 images (20 x 20 x 1); at most {MAX_XYZ_CELLS} per plot"),
        "same type twice": (["--x", "Steps: 1, 2", "--y", "Steps: 3"], "xyz: the X and Y axes both vary Steps"),
        "S/R not found": (["--x", "Prompt S/R: banana, pear"], "xyz: X axis Prompt S/R: 'banana' is not in the prompt"),
        "missing checkpoint": (["--x", f"Checkpoint name: {tmp_path / 'nope.safetensors'}"], "nope.safetensors: no such file"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("/x"))))
def test_bad_input_is_one_line_error(capsys, tiny_sd1_file, tmp_path, case):
    extra, expected = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "xyz", "a red apple", "--model", tiny_sd1_file, "--size", "64x64",
                               "--steps", "1", "--out", out, "--quiet", *extra)
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("huabi: error: ")
    assert expected in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_axis_errors_name_the_axis():
    with pytest.raises(HuabiError, match="Z axis Clip skip: clip_skip: must be from 1 to 12, got 13"):
        plan_xyz(GenerationRequest("x"), parse_axis_spec("Steps: 1"), None, parse_axis_spec("Clip skip: 1, 13", name="Z"))
