"""Run an X/Y/Z plot through the engine and draw its labelled grids.

Every cell is an ordinary generation: it is saved as a numbered PNG with its own
infotext, exactly what ``huabi generate`` writes for the same parameters, so
``huabi generate --from CELL`` redoes it. Then, as A1111's script does:

- one grid per Z value, X labels on top, Y labels on the left, the Z value as
  a title above (when a Z axis is used), saved as ``xyz_grid-NNNN.png``;
- with several Z values, also a grid of those grids side by side.

A grid's infotext is its first cell's, plus the plot's axes in A1111's key
names: ``Script: X/Y/Z plot, X Type: Steps, X Values: "10, 20"`` (and
``Fixed X Values`` listing the seeds a Seed axis resolved to), placed before
``Version``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from huabi.core.infotext import format_value, quote
from huabi.core.xyz import XYZPlan
from huabi.errors import HuabiError
from huabi.service.engine import Engine, GeneratedImage, next_grid_path
from huabi.service.pngio import save_png

GRID_PREFIX = "xyz_grid-"
_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Debian/Ubuntu fonts-dejavu-core
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",  # Fedora
    "DejaVuSans.ttf",  # anywhere FreeType can find it (macOS/Windows if installed)
)
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)


@dataclass(frozen=True)
class XYZResult:
    cells: tuple[GeneratedImage, ...]  # in run order; ``plan.cells[i]`` made ``cells[i]``
    grids: tuple[Image.Image, ...]  # one per Z value, then the grid of grids when there are several
    grid_paths: tuple[Path, ...]  # empty when nothing was saved


def run_xyz(
    engine: Engine,
    plan: XYZPlan,
    *,
    out_dir: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> XYZResult:
    """Generate every cell (saved to ``out_dir`` when given), then draw and save the grids.

    ``on_progress(done, total)`` counts sampling steps across the whole plot.
    """
    # Fail on a bad checkpoint name before the first image, not half-way through.
    for model in dict.fromkeys(cell.request.model for cell in plan.cells):
        engine.resolve_model_path(model)
    totals = [cell.request.steps * cell.request.batch_count for cell in plan.cells]
    total_steps = sum(totals)
    done_before = 0
    results: list[GeneratedImage] = []
    for cell, cell_steps in zip(plan.cells, totals):
        def on_cell_progress(done: int, _total: int, _base: int = done_before) -> None:
            if on_progress is not None:
                on_progress(_base + done, total_steps)

        images = engine.generate(cell.request, out_dir=out_dir, on_progress=on_cell_progress)
        results.append(images[0])  # a cell shows its first image, as in A1111
        done_before += cell_steps

    grids = draw_plot_grids(plan, [result.image for result in results])
    grid_paths: list[Path] = []
    if out_dir is not None:
        by_position = {
            (cell.x_index, cell.y_index, cell.z_index): result for cell, result in zip(plan.cells, results)
        }
        for z_index, grid in enumerate(grids):
            # A Z grid carries its own first cell's infotext; the grid of grids the plot's first.
            first = by_position[(0, 0, z_index if z_index < len(plan.z) else 0)]
            infotext = grid_infotext(first.infotext, plan.infotext_params())
            grid_paths.append(save_png(grid, next_xyz_grid_path(out_dir), infotext))
    return XYZResult(cells=tuple(results), grids=tuple(grids), grid_paths=tuple(grid_paths))


def draw_plot_grids(plan: XYZPlan, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The labelled grid of each Z value, plus the grid of grids when there are several.

    ``images[i]`` is the image of ``plan.cells[i]``.
    """
    if len(images) != len(plan.cells):
        raise HuabiError(f"xyz: {len(images)} images for {len(plan.cells)} cells")
    by_position = {(c.x_index, c.y_index, c.z_index): image for c, image in zip(plan.cells, images)}
    # One cell size for the whole plot so the Z grids line up (a Size axis mixes sizes).
    cell_size = (max(image.width for image in images), max(image.height for image in images))
    x_labels, y_labels, z_labels = plan.x.labels(), plan.y.labels(), plan.z.labels()
    grids = []
    for z_index in range(len(plan.z)):
        rows = [[by_position[(x, y, z_index)] for x in range(len(plan.x))] for y in range(len(plan.y))]
        grids.append(draw_xyz_grid(rows, x_labels, y_labels, title=z_labels[z_index], cell_size=cell_size))
    if len(grids) > 1:
        grids.append(side_by_side(grids))
    return grids


def label_font_px(cell_w: int, cell_h: int) -> int:
    """Label text size: A1111's (width + height) / 25, but never below a readable 12 px."""
    return max(12, (cell_w + cell_h) // 25)


def load_label_font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans when installed, else Pillow's built-in font (scalable in Pillow >= 10.1)."""
    for path in _FONT_FILES:
        try:
            return ImageFont.truetype(path, size_px)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size_px)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes in one labelled grid (all in pixels)."""

    cell_w: int
    cell_h: int
    left_px: int  # Y label column
    title_px: int  # title band height (0 without a title)
    x_band_px: int  # X label band height (0 without X labels)
    line_px: int
    pad_px: int
    x_lines: tuple[tuple[str, ...], ...]
    y_lines: tuple[tuple[str, ...], ...]
    title_lines: tuple[str, ...]

    @property
    def top_px(self) -> int:
        return self.title_px + self.x_band_px


def grid_layout(
    cell_size: tuple[int, int],
    columns: int,
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    title: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    font_px: int | None = None,
) -> GridLayout:
    """Margins and wrapped label lines; labels are wrapped to fit their cell's width.

    ``font_px`` is the size ``font`` was loaded at (default: ``label_font_px`` of the cell).
    """
    cell_w, cell_h = cell_size
    font_px = font_px or label_font_px(cell_w, cell_h)
    pad = font_px // 2
    line_px = font_px + font_px // 4
    has_y = any(label for label in y_labels)
    left = max(cell_w * 3 // 4, 8 * font_px) if has_y else 0
    x_lines = tuple(tuple(wrap_text(label, cell_w - 2 * pad, font)) for label in x_labels)
    y_lines = tuple(tuple(wrap_text(label, left - 2 * pad, font)) for label in y_labels) if has_y else ()
    x_band = max(len(lines) for lines in x_lines) * line_px + 2 * pad if any(x_labels) else 0
    title_lines = tuple(wrap_text(title, left + columns * cell_w - 2 * pad, font)) if title else ()
    title_band = len(title_lines) * line_px + 2 * pad if title_lines else 0
    return GridLayout(cell_w, cell_h, left, title_band, x_band, line_px, pad, x_lines, y_lines, title_lines)


def draw_xyz_grid(
    rows: Sequence[Sequence[Image.Image]],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    *,
    title: str = "",
    cell_size: tuple[int, int] | None = None,
    font_px: int | None = None,
) -> Image.Image:
    """Images in rows (``rows[y][x]``) with X labels above, Y labels to the left, a title on top.

    Empty labels (a Nothing axis) take no room. Labels are sized from the cell as A1111 does
    unless ``font_px`` is given (to keep one size across grids of different cell sizes).
    """
    if not rows or not rows[0]:
        raise HuabiError("grid: no images to put in a grid")
    columns = len(rows[0])
    if cell_size is None:
        cell_size = (max(i.width for row in rows for i in row), max(i.height for row in rows for i in row))
    font_px = font_px or label_font_px(*cell_size)
    font = load_label_font(font_px)
    layout = grid_layout(cell_size, columns, x_labels, y_labels, title, font, font_px)
    width_px = layout.left_px + columns * layout.cell_w
    height_px = layout.top_px + len(rows) * layout.cell_h
    grid = Image.new("RGB", (width_px, height_px), _BACKGROUND)
    draw = ImageDraw.Draw(grid)

    for y_index, row in enumerate(rows):
        for x_index, image in enumerate(row):
            # Centre smaller images in their cell (a Size axis mixes sizes).
            left = layout.left_px + x_index * layout.cell_w + (layout.cell_w - image.width) // 2
            top = layout.top_px + y_index * layout.cell_h + (layout.cell_h - image.height) // 2
            grid.paste(image.convert("RGB"), (left, top))

    def draw_lines(lines: Sequence[str], centre_x: float, top_px: float) -> None:
        for number, line in enumerate(lines):
            width = draw.textlength(line, font=font)
            draw.text((centre_x - width / 2, top_px + number * layout.line_px), line, fill=_INK, font=font)

    if layout.title_lines:
        draw_lines(layout.title_lines, width_px / 2, layout.pad_px)
    if layout.x_band_px:
        for x_index, lines in enumerate(layout.x_lines):
            band_top = layout.title_px + layout.x_band_px - layout.pad_px - len(lines) * layout.line_px
            draw_lines(lines, layout.left_px + (x_index + 0.5) * layout.cell_w, band_top)
    if layout.left_px:
        for y_index, lines in enumerate(layout.y_lines):
            centre_y = layout.top_px + (y_index + 0.5) * layout.cell_h
            draw_lines(lines, layout.left_px / 2, centre_y - len(lines) * layout.line_px / 2)
    return grid


def wrap_text(text: str, max_width_px: int, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> list[str]:
    """Greedy word wrap to ``max_width_px``; a word longer than a line is split between characters."""
    max_width_px = max(max_width_px, 1)
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= max_width_px:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if current and font.getlength(current + char) > max_width_px:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current)
    return lines or [""]


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Images in one row on a white background, top-aligned (A1111's grid of Z grids)."""
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), _BACKGROUND)
    left = 0
    for image in images:
        canvas.paste(image.convert("RGB"), (left, 0))
        left += image.width
    return canvas


def grid_infotext(first_infotext: str, params: Sequence[tuple[str, str]]) -> str:
    """``first_infotext`` with ``params`` added to its parameters line, before "Version"."""
    head, _, last = first_infotext.rpartition("\n")
    added = ", ".join(f"{key}: {quote(format_value(value))}" for key, value in params)
    marker = ", Version: "
    if marker in last:
        before, _, after = last.rpartition(marker)
        last = f"{before}, {added}{marker}{after}"
    else:
        last = f"{last}, {added}" if last else added
    return f"{head}\n{last}" if head else last


def next_xyz_grid_path(out_dir: Path) -> Path:
    """The next free ``xyz_grid-NNNN.png`` in ``out_dir``, after the highest number there."""
    return next_grid_path(out_dir, GRID_PREFIX)
