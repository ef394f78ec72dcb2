"""``huabi eval compare``: the same prompts x seeds under two or more settings, measured side by side.

The images come from one X/Y/Z plot (``huabi.core.xyz``): X = the seeds, Y = the prompts
(a Prompt S/R axis whose first value is the base prompt, so every row is exactly one
prompt), Z = what is compared (any X/Y/Z axis: ``Checkpoint name: a, b``, ``Steps: 4, 20``,
``Sampler: Euler, DPM++ 2M``, ``CFG scale: 3, 7``, or ``Prompt S/R`` on a LoRA tag). Each Z
value gets its own labelled grid and a row of numbers: CLIP score against the prompts,
Inception Score, and with ``--real DIR`` FID and KID against that reference set.

Generation goes through ONE function, ``generate_plot``, so that it can be rewired when the
engine changes; everything else reads saved PNGs, like ``huabi eval fid`` does.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from huabi.core.request import GenerationRequest
from huabi.core.xyz import Axis, XYZPlan, parse_axis_spec, plan_xyz
from huabi.errors import HuabiError

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red apple", "a cat face", "a rocket", "a yellow star",
    "a house", "a smiling sun", "a green tree", "a blue car",
)
DEFAULT_SEEDS: tuple[int, ...] = (1, 2, 3, 4)
SETTINGS_SHOWN = ("model", "steps", "sampler", "schedule", "cfg_scale", "width_px", "height_px", "negative_prompt")


@dataclass(frozen=True)
class CompareSpec:
    vary: str  # an X/Y/Z axis spec: "Steps: 4, 20"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    base: GenerationRequest | None = None  # sampling settings shared by every variant

    def __post_init__(self) -> None:
        if not self.prompts:
            raise HuabiError("compare: no prompts")
        if len(set(self.prompts)) != len(self.prompts):
            raise HuabiError("compare: prompts must be distinct")
        if not self.seeds:
            raise HuabiError("compare: no seeds")

    def plan(self) -> XYZPlan:
        variants = parse_axis_spec(self.vary, name="Z")
        if len(variants) < 2 or not variants.used:
            raise HuabiError(f"compare: --vary needs at least two values to compare, got {self.vary!r}")
        if variants.type == "Seed":
            raise HuabiError("compare: the seeds are already an axis; vary something else")
        if variants.type == "Prompt S/R" and any(variants.values[0] not in p for p in self.prompts):
            raise HuabiError(f"compare: Prompt S/R searches for {variants.values[0]!r}, which must appear in every prompt")
        base = replace(self.base or GenerationRequest(prompt=self.prompts[0]), prompt=self.prompts[0])
        seeds = Axis("Seed", ", ".join(str(s) for s in self.seeds), tuple(int(s) for s in self.seeds), "X")
        prompts = Axis("Prompt S/R", ", ".join(self.prompts), tuple(self.prompts), "Y")
        return plan_xyz(base, seeds, prompts, variants)


def generate_plot(plan: XYZPlan, *, out_dir: Path, engine_options: dict, on_progress: Callable[[int, int], None] | None = None):
    """The one place that calls the engine: today's ``Engine`` + ``run_xyz``."""
    from huabi.service.engine import Engine
    from huabi.service.xyz import run_xyz

    engine = Engine(**engine_options)
    return run_xyz(engine, plan, out_dir=out_dir, on_progress=on_progress)


def measure_variants(session, plan: XYZPlan, cell_paths: Sequence[Path], *, real: Path | None = None) -> list[dict]:
    """Numbers for each Z value, from the saved cell images."""
    rows = []
    real_vectors = None
    real_count = 0
    if real is not None:
        real_paths, real_vectors = session.folder(real, "real")
        real_count = len(real_paths)
    from huabi.eval.extractors import ClipExtractor

    is_clip = isinstance(session.extractor, ClipExtractor)
    labels = list(plan.y.values)
    for z_index, label in enumerate(plan.z.labels()):
        indices = [i for i, cell in enumerate(plan.cells) if cell.z_index == z_index]
        paths = [cell_paths[i] for i in indices]
        vectors = session.vectors(paths, f"variant {label}")
        prompts = [plan.cells[i].request.prompt for i in indices]
        sets = {"generated": {"folder": f"variant {label}", "images": len(paths)}}
        row = {"variant": label, "images": len(paths), "metrics": {}}
        reports = []
        if is_clip:
            reports.append(session.clip_score_from_vectors(vectors, prompts, sets))
        if len(paths) >= session.options.is_splits:
            reports.append(session.is_from_vectors(vectors, sets, labels if is_clip else None))
        if real_vectors is not None:
            both = {"real": {"folder": str(real), "images": real_count}, **sets}
            reports.append(session.fid_from_vectors(real_vectors, vectors, both))
            reports.append(session.kid_from_vectors(real_vectors, vectors, both))
        for report in reports:
            row["metrics"][report.metric] = {"value": report.value, "std": report.std, "warnings": list(report.warnings), **report.details}
        rows.append(row)
    return rows


def run_compare(spec: CompareSpec, *, out_dir: Path, engine_options: dict, session, real: Path | None = None,
                on_progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    plan = spec.plan()  # bad axes fail before any model loads
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    log(f"compare: {len(plan.z)} variants x {len(spec.prompts)} prompts x {len(spec.seeds)} seeds = {len(plan.cells)} images")
    result = generate_plot(plan, out_dir=images_dir, engine_options=engine_options, on_progress=on_progress)
    cell_paths = [cell.path for cell in result.cells]
    if any(p is None for p in cell_paths):
        raise HuabiError("compare: the engine did not save every image")
    rows = measure_variants(session, plan, cell_paths, real=real)
    report = {
        "vary": spec.vary,
        "prompts": list(spec.prompts),
        "seeds": list(spec.seeds),
        "settings": {name: getattr(plan.base, name) for name in SETTINGS_SHOWN},
        "real": str(real) if real is not None else None,
        "extractor": session.extractor.describe(),
        "note": session.extractor.note,
        "variants": rows,
        "grids": [str(p.relative_to(out_dir)) for p in result.grid_paths],
        "images": [str(p.relative_to(out_dir)) for p in cell_paths],
    }
    # one grid per variant, side by side (run_xyz's last grid, the grid of grids, repeats them)
    write_report(report, out_dir, [Path(p) for p in result.grid_paths[: len(plan.z)]])
    return report


def _atomic_write(path: Path, text: str) -> None:
    from huabi.models.files import atomic_write_text

    atomic_write_text(path, text)


def _data_uri(path: Path, max_side_px: int = 2048) -> str:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if max(image.size) > max_side_px:
            scale = max_side_px / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(report: dict, grid_uris: Sequence[str]) -> str:
    """A self-contained page (images inline): opens offline, mails as one file."""
    metric_names = list(dict.fromkeys(name for row in report["variants"] for name in row["metrics"]))
    head = "".join(f"<th>{html.escape(name)}</th>" for name in metric_names)
    body = []
    for row in report["variants"]:
        cells = []
        for name in metric_names:
            metric = row["metrics"].get(name)
            if metric is None:
                cells.append("<td>-</td>")
                continue
            text = f"{metric['value']:.4g}" + (f" ± {metric['std']:.2g}" if metric.get("std") is not None else "")
            title = html.escape("; ".join(metric.get("warnings", [])))
            cells.append(f'<td title="{title}">{html.escape(text)}{" ⚠" if title else ""}</td>')
        body.append(f"<tr><th>{html.escape(row['variant'])}</th><td>{row['images']}</td>{''.join(cells)}</tr>")
    warnings = sorted({w for row in report["variants"] for m in row["metrics"].values() for w in m.get("warnings", [])})
    grids = "".join(f'<figure><img src="{uri}" alt="grid {i + 1}"><figcaption>{html.escape(report["grids"][i] if i < len(report["grids"]) else "")}</figcaption></figure>'
                    for i, uri in enumerate(grid_uris))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>huabi eval compare: {html.escape(report['vary'])}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #bbb; padding: 4px 10px; text-align: right; }}
th {{ background: #f2f2f2; }} .note {{ background: #fff6d6; border: 1px solid #e0c060; padding: 8px 12px; max-width: 60em; }}
.grids {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }} figure {{ margin: 0; }} img {{ max-width: 100%; image-rendering: pixelated; }}
code {{ background: #f4f4f4; padding: 1px 4px; }}
</style></head><body>
<h1>Compare: <code>{html.escape(report['vary'])}</code></h1>
<p>{len(report['prompts'])} prompts × {len(report['seeds'])} seeds (seeds {html.escape(', '.join(map(str, report['seeds'])))}) per variant;
features: {html.escape(report['extractor']['name'])}{'; reference set: ' + html.escape(report['real']) if report['real'] else ''}.</p>
<p class="note">{html.escape(report['note'])}</p>
<table><tr><th>variant</th><th>images</th>{head}</tr>{''.join(body)}</table>
{''.join(f'<p>⚠ {html.escape(w)}</p>' for w in warnings)}
<h2>Grids (rows: prompts, columns: seeds)</h2>
<div class="grids">{grids}</div>
<h2>Shared settings</h2><pre>{html.escape(json.dumps(report['settings'], indent=1))}</pre>
</body></html>
"""


def write_report(report: dict, out_dir: Path, grid_paths: Sequence[Path]) -> tuple[Path, Path]:
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    _atomic_write(json_path, json.dumps(report, indent=1) + "\n")
    _atomic_write(html_path, render_html(report, [_data_uri(p) for p in grid_paths]))
    return json_path, html_path
