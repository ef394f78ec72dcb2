"""The ``huabi`` command line: parse arguments into requests, hand them to the engine, print results.

No business logic here: every decision about models, sizes and seeds lives in
the service and core layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huabi import __version__
from huabi.cli import control as control_cli
from huabi.cli.common import (  # noqa: F401 -- importable from here, as before
    ProgressBar,
    add_attention_adapter_options,
    add_model_options,
    add_output_options,
    add_refiner_options,
    add_sampling_options,
    make_studio,
    parse_size,
    request_values,
)
from huabi.cli import edit as edit_cli
from huabi.cli import lora as lora_cli
from huabi.cli import models_cli
from huabi.cli import upscale as upscale_cli
from huabi.cli import xyz as xyz_cli
from huabi.errors import HuabiError
_ProgressBar = ProgressBar  # the older name
_add_model_options = add_model_options

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="huabi", description="huabi (画笔): a local, offline AI painting studio."
    )
    parser.add_argument("--version", action="version", version=f"huabi {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="text to image")
    gen.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file / --from)")
    gen.add_argument("-n", "--negative", dest="negative_prompt", help="negative prompt")
    gen.add_argument("--prompt-file", type=Path, help="generate once per non-empty line of this file")
    gen.add_argument("--from", dest="from_image", type=Path, metavar="IMAGE",
                     help="reuse the parameters in IMAGE's infotext; other flags override them")
    add_sampling_options(gen, size_help="WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's native size)")
    gen.add_argument("--variation-seed", type=int, metavar="SEED",
                     help="A1111 variation seed, -1 for random (image i of a batch uses SEED + i)")
    gen.add_argument("--variation-strength", type=float, metavar="S",
                     help="0..1: how far the noise moves from --seed toward --variation-seed (default 0: off)")
    gen.add_argument("--seed-resize-from", metavar="WxH",
                     help="draw the seed's noise at this size and paste it centred (A1111's seed resize)")
    gen.add_argument("--hires", action="store_true", default=None,
                     help="A1111's hires fix: generate at --size, upscale, then a second img2img pass")
    gen.add_argument("--hires-scale", type=float, metavar="S", help="hires upscale factor, 1..4 (default 2)")
    gen.add_argument("--hires-resize", metavar="WxH", help="hires target size instead of --hires-scale")
    gen.add_argument("--hires-upscaler", metavar="NAME|PATH",
                     help="Latent, 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic antialiased)', "
                          "'Latent (nearest)', 'Latent (nearest-exact)', Lanczos, None, or an upscaler model file")
    gen.add_argument("--hires-steps", type=int, metavar="N", help="second-pass steps (0: same as --steps)")
    gen.add_argument("--hires-denoise", type=float, metavar="D", help="second-pass denoising strength (default 0.7)")
    add_refiner_options(gen)
    gen.add_argument("--refiner-hires-pass", choices=("first", "second", "both"),
                     help="with --hires: the pass(es) the refiner takes over in (default second, as A1111)")
    add_attention_adapter_options(gen)
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--batch-count", type=int)
    gen.add_argument("--clip-skip", type=int)
    gen.add_argument("--tile", action="store_true", default=None,
                     help="seamless tileable image (also: --tile at the end of the prompt)")
    gen.add_argument("--mj", action="store_true",
                     help="Midjourney-style output: batch of 4 and a 2x2 grid (on by itself when the prompt "
                          "ends in parameters such as --ar 3:2, --no, --chaos)")
    gen.add_argument("--style", dest="styles", action="append", default=[], metavar="NAME",
                     help="apply a style from the styles file (repeatable, applied in order)")
    gen.add_argument("--styles-file", type=Path, metavar="PATH",
                     help="A1111 styles.csv (default: $HUABI_HOME/styles.csv or ~/huabi/styles.csv)")
    gen.add_argument("--wildcards", dest="wildcards_dir", type=Path, metavar="DIR",
                     help="wildcards folder for __name__ (default: $HUABI_HOME/wildcards or ~/huabi/wildcards)")
    gen.add_argument("--combinatorial", action="store_true",
                     help="one request per combination of the prompt's {a|b} choices and wildcards")
    gen.add_argument("--embeddings", dest="embeddings_dir", type=Path, metavar="DIR",
                     help="textual-inversion embeddings folder, used by file name in prompts "
                          "(default: $HUABI_EMBEDDINGS_DIR, $HUABI_HOME/embeddings or ~/huabi/embeddings)")
    lora_cli.add_lora_flag(gen)
    control_cli.add_control_options(gen)
    add_model_options(gen)
    add_output_options(gen)

    info = commands.add_parser("info", help="print the generation parameters stored in an image")
    info.add_argument("image", type=Path)

    models = commands.add_parser("models", help="list the models huabi can find")
    models.add_argument("--models-dir", type=Path, help="models folder (default: $HUABI_MODELS_DIR or ~/huabi/models)")

    # Sub-tools with their own argument parsers: everything after the word is passed through.
    data = commands.add_parser("data", help="build the offline captioned dataset (huabi data build --help)",
                               add_help=False)
    data.add_argument("rest", nargs=argparse.REMAINDER)
    train = commands.add_parser("train", help="train models, e.g. the built-in huabi-mini (huabi train mini --help)",
                                add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)

    xyz_cli.add_parser(commands)
    edit_cli.add_parser(commands)
    upscale_cli.add_parser(commands)
    control_cli.add_parser(commands)
    lora_cli.add_parser(commands)
    models_cli.add_parsers(commands)
    return parser


def requests_from_args(args: argparse.Namespace) -> list:
    """Build one GenerationRequest per prompt from the flags (and --from / --prompt-file).

    Midjourney parameters are split off the prompt but not applied; see ``jobs_from_args``.
    """
    return [job.request for job in jobs_from_args(args)]


def jobs_from_args(args: argparse.Namespace) -> list:
    """One job per prompt (the service's :func:`huabi.service.requests.prompt_jobs` on the flags)."""
    from huabi.service.pngio import read_infotext
    from huabi.service.requests import prompt_jobs, read_prompt_file

    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
    elif args.prompt is not None:
        prompts = [args.prompt]
    elif args.from_image is not None:
        prompts = [None]
    else:
        raise HuabiError("prompt: give a prompt, --prompt-file FILE or --from IMAGE")
    return prompt_jobs(
        prompts, request_values(args),
        from_infotext=read_infotext(args.from_image) if args.from_image is not None else None,
        styles=getattr(args, "styles", None) or (), styles_file=getattr(args, "styles_file", None),
        loras=getattr(args, "loras", None) or (), mj_grid=bool(getattr(args, "mj", False)),
        control=control_cli.control_input(args),
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from huabi.service.engine import save_grid

    jobs = jobs_from_args(args)
    studio = make_studio(args)
    for job in jobs:
        requests = studio.expand(job, wildcards_dir=getattr(args, "wildcards_dir", None),
                                 combinatorial=bool(getattr(args, "combinatorial", False)))
        if job.mj.ignored:
            print(
                f"huabi: note: ignored {', '.join(job.mj.ignored)} (they pick Midjourney's own models; "
                "huabi uses the model you load)",
                file=sys.stderr,
            )
        job_results = []
        for request in requests:
            progress = ProgressBar(enabled=not args.quiet)
            try:
                results = studio.run(request, out_dir=args.out, on_event=progress.update)
            finally:
                progress.close()
            for result in results:
                print(result.path)
            job_results.extend(results)
        if job.grid and len(job_results) > 1:
            print(save_grid(job_results, args.out))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from huabi.service.pngio import read_infotext

    print(read_infotext(args.image))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from huabi.models.inspect import describe_model_file
    from huabi.models.hashes import model_short_hash
    from huabi.service.engine import Engine

    engine = Engine(device="cpu", dtype="fp32", models_dir=args.models_dir)
    entries = list(engine.iter_models())
    if not entries:
        print(f"no models in {engine.models_dir}", file=sys.stderr)
        return 0
    for entry in entries:
        try:
            family = describe_model_file(entry.path)
        except HuabiError as err:
            family = f"unrecognised ({err})"
        short_hash = model_short_hash(entry.path) if entry.path.is_file() else "-"
        print(f"{entry.name}\t{family}\t{short_hash}\t{entry.path}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from huabi.data.build import main as data_main

    rest = list(args.rest)
    if not rest or rest[0] != "build":
        raise HuabiError("data: the only data command is `huabi data build --out DIR [...]`")
    return data_main(rest[1:])


def cmd_train(args: argparse.Namespace) -> int:
    from huabi.train.__main__ import main as train_main

    return train_main(list(args.rest))


PASS_THROUGH = ("data", "train")

COMMANDS = {
    "generate": cmd_generate,
    "info": cmd_info,
    "models": cmd_models,
    "data": cmd_data,
    "train": cmd_train,
    "xyz": xyz_cli.cmd_xyz,
    "edit": edit_cli.cmd_edit,
    "upscale": upscale_cli.cmd_upscale,
    "preprocess": control_cli.cmd_preprocess,
    "merge-lora": lora_cli.cmd_merge_lora,
    **models_cli.COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in PASS_THROUGH:
        # Sub-tools parse their own arguments (argparse cannot pass a leading --help through).
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HuabiError as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"huabi: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("huabi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
