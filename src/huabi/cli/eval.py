"""``huabi eval``: FID, KID, Inception Score, CLIP score and side-by-side comparisons.

    huabi eval fid REAL GEN [--features pt_inception-2015-12-05-6726825d.pth]
    huabi eval kid REAL GEN
    huabi eval is GEN [--labels FILE]
    huabi eval clip-score GEN [--prompts FILE]
    huabi eval compare --vary "Steps: 4, 20" [--real DIR] --out DIR

Only argument parsing and printing live here (the work is in ``huabi.eval``); nothing
heavy is imported when the parser is built. The result is the last line of stdout;
progress bars and warnings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FEATURES_HELP = ("feature extractor weights: the FID Inception-v3 file (pt_inception-2015-12-05-6726825d.pth, as pytorch-fid / "
                 "torch-fidelity / clean-fid use) or an OpenAI CLIP model in transformers layout (folder or file). "
                 "Default: huabi-mini's own image/text towers (numbers comparable between runs only)")


def _common(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    parser.add_argument("--features", metavar="PATH", help=FEATURES_HELP)
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--resize", default="tf1", choices=("tf1", "torch", "clean"),
                        help="Inception input resize: tf1 = torch-fidelity/TF FID (default), torch = pytorch-fid, clean = clean-fid")
    parser.add_argument("--cache-dir", type=Path, help="feature cache folder (default ~/.cache/huabi/eval)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    parser.add_argument("--recursive", action="store_true", help="also read images in sub-folders")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _kid_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets averaged (default 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (default 1000, reduced to the smaller set)")


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval`` and its sub-commands on the ``huabi`` parser."""
    evaluate = commands.add_parser("eval", help="FID, KID, Inception Score, CLIP score, side-by-side comparisons (huabi eval --help)")
    metrics = evaluate.add_subparsers(dest="eval_command", metavar="METRIC", required=True)

    fid = metrics.add_parser("fid", help="Fréchet Inception Distance between two folders")
    fid.add_argument("real", type=Path, help="reference images")
    fid.add_argument("generated", type=Path, help="generated images")
    _common(fid)

    kid = metrics.add_parser("kid", help="Kernel Inception Distance (unbiased, subsets) between two folders")
    kid.add_argument("real", type=Path)
    kid.add_argument("generated", type=Path)
    _common(kid)
    _kid_options(kid)

    inception = metrics.add_parser("is", help="Inception Score of a folder (10 splits)")
    inception.add_argument("generated", type=Path)
    inception.add_argument("--labels", type=Path, metavar="FILE",
                           help="class names, one a line (CLIP extractors; default: the distinct prompts in the images)")
    inception.add_argument("--splits", type=int, default=10)
    _common(inception)

    clip = metrics.add_parser("clip-score", help="CLIP score of a folder against each image's prompt")
    clip.add_argument("generated", type=Path)
    clip.add_argument("--prompts", type=Path, metavar="FILE",
                      help="one prompt a line in file-name order (default: each PNG's own infotext)")
    _common(clip)

    compare = metrics.add_parser("compare", help="generate prompts x seeds under 2+ settings; write an HTML+JSON report")
    compare.add_argument("--vary", required=True, metavar="'TYPE: VALUES'",
                         help="what is compared, as an X/Y/Z axis: 'Checkpoint name: a, b', 'Steps: 4, 20', "
                              "'Sampler: Euler, DPM++ 2M', 'CFG scale: 3, 7', 'Prompt S/R: <lora:x:0>, <lora:x:1>'")
    compare.add_argument("--prompts", type=Path, metavar="FILE", help="prompts, one a line (default: 8 built-in prompts)")
    compare.add_argument("--seeds", default="1-4", help="seeds: '1-4' or '1, 5, 9' (default 1-4)")
    compare.add_argument("--real", type=Path, metavar="DIR", help="reference images: adds FID and KID per variant")
    compare.add_argument("--out", type=Path, default=Path("outputs/eval-compare"), help="report folder (default outputs/eval-compare)")
    from huabi.cli.common import add_model_options as _add_model_options, add_sampling_options

    add_sampling_options(compare, size_help="WIDTHxHEIGHT (default: the model's native size)")
    _add_model_options(compare)  # includes --device
    _common(compare, device=False)
    _kid_options(compare)
    return evaluate


def _options(args: argparse.Namespace):
    from huabi.eval.api import EvalOptions

    return EvalOptions(
        features=args.features, device=args.device, batch_size=args.batch_size, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, resize=args.resize, progress=not args.quiet, recursive=args.recursive,
        kid_subsets=getattr(args, "kid_subsets", 100), kid_subset_size=getattr(args, "kid_subset_size", 1000),
        is_splits=getattr(args, "splits", 10),
    )


def _print_report(report, json_path: Path | None) -> None:
    for note in report.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(report.note)
    if json_path is not None:
        _write_json(json_path, report.to_dict())
    print(report.summary())


def _write_json(path: Path, data: dict) -> None:
    from huabi.models.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _seeds(text: str) -> tuple[int, ...]:
    from huabi.core.xyz import parse_axis

    return tuple(parse_axis("Seed", text, name="--seeds").values)


def cmd_eval(args: argparse.Namespace) -> int:
    from huabi.eval import api

    if args.eval_command == "compare":
        return cmd_compare(args)
    options = _options(args)
    if args.eval_command == "fid":
        report = api.fid(args.real, args.generated, options)
    elif args.eval_command == "kid":
        report = api.kid(args.real, args.generated, options)
    elif args.eval_command == "is":
        report = api.inception_score(args.generated, options, labels=args.labels)
    else:
        report = api.clip_score(args.generated, options, prompts=args.prompts)
    _print_report(report, args.json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from huabi.cli.common import ProgressBar as _ProgressBar, parse_size
    from huabi.core.request import GenerationRequest
    from huabi.eval.api import Session
    from huabi.eval.compare import DEFAULT_PROMPTS, CompareSpec, run_compare
    from huabi.eval.folders import labels_from_file

    prompts = tuple(labels_from_file(args.prompts)) if args.prompts else DEFAULT_PROMPTS
    fields = {name: getattr(args, name) for name in ("steps", "cfg_scale", "sampler", "schedule", "model", "vae")
              if getattr(args, name, None) is not None}
    if args.size is not None:
        fields["width_px"], fields["height_px"] = parse_size(args.size)
    spec = CompareSpec(vary=args.vary, prompts=prompts, seeds=_seeds(args.seeds), base=GenerationRequest(prompt=prompts[0], **fields))
    spec.plan()  # a bad --vary fails before the extractor or any model loads
    engine_options = {"device": args.device, "dtype": args.dtype, "models_dir": args.models_dir,
                      "base_model": args.base, "gguf_on_the_fly": args.gguf_on_the_fly}
    progress = _ProgressBar(enabled=not args.quiet)
    with Session(_options(args)) as session:
        try:
            report = run_compare(spec, out_dir=args.out, engine_options=engine_options, session=session, real=args.real,
                                 on_progress=progress.update, log=lambda m: print(m, file=sys.stderr))
        finally:
            progress.close()
    print(report["note"])
    for row in report["variants"]:
        numbers = ", ".join(f"{name} {m['value']:.4g}" + (f" ± {m['std']:.2g}" if m.get("std") is not None else "")
                            for name, m in row["metrics"].items())
        print(f"{row['variant']} | {numbers}")
    if args.json is not None:
        _write_json(args.json, report)
    print(args.out / "report.html")
    return 0
