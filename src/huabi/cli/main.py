"""The ``huabi`` command line: parse arguments into requests, hand them to the engine, print results.

No business logic here: every decision about models, sizes and seeds lives in
the service and core layers.
"""

from __future__ import annotations

import argparse
import os
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
    gallery_recorder,
    keep_and_record,
    make_studio,
    parse_size,
    print_saved_paths,
    request_values,
    use_recorded_precision,
)
from huabi.cli import edit as edit_cli
from huabi.cli import eval as eval_cli
from huabi.cli import lora as lora_cli
from huabi.cli import models_cli
from huabi.cli import ray_batch
from huabi.cli import serve as serve_cli
from huabi.cli import upscale as upscale_cli
from huabi.cli import xyz as xyz_cli
from huabi.cli.flow_options import add_flow_options
from huabi.service.requests import with_flow_extras
from huabi.cli.parsing import HuabiArgumentParser, in_user_words, quiet_libraries
from huabi.errors import HuabiError

_ProgressBar = ProgressBar  # the older name
_add_model_options = add_model_options

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = HuabiArgumentParser(  # no abbreviations, nearest-flag suggestions; sub-parsers inherit it
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
    gen.add_argument("--batch-size", type=int, metavar="N",
                     help="images sampled together in one batch, 1..64 (default 1); image i gets seed + i")
    gen.add_argument("--batch-count", type=int, metavar="N",
                     help="how many batches to run one after another (default 1)")
    gen.add_argument("--clip-skip", type=int, metavar="N",
                     help="use the text encoder's N-th layer from the end, 1..12 (default 1; 2 for many anime models)")
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
                          "(default: $HUABI_EMBEDDINGS_DIR, MODELS_DIR/embeddings, $HUABI_HOME/embeddings "
                          "or ~/huabi/embeddings)")
    lora_cli.add_lora_flag(gen)
    ray_batch.add_ray_flags(gen)
    control_cli.add_control_options(gen)
    add_model_options(gen)
    add_flow_options(gen)
    add_output_options(gen)

    info = commands.add_parser("info", help="print the generation parameters stored in an image")
    info.add_argument("image", type=Path)

    system = commands.add_parser("system", help="the processor, its speed features, and the dtype/threads/backends "
                                                "huabi chooses for it")
    system.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")

    models = commands.add_parser("models", help="list the models huabi can find")
    models.add_argument("--models-dir", type=Path, help="models folder (default: $HUABI_MODELS_DIR or ~/huabi/models)")

    # Sub-tools with their own argument parsers: everything after the word is passed through.
    data = commands.add_parser("data", help="build the offline captioned dataset (huabi data build --help)",
                               add_help=False)
    data.add_argument("rest", nargs=argparse.REMAINDER)
    train = commands.add_parser("train", help="train a LoRA, DreamBooth, TI or fine-tune, or huabi-mini (huabi train lora --help)",
                                add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)

    xyz_cli.add_parser(commands)
    edit_cli.add_parser(commands)
    upscale_cli.add_parser(commands)
    control_cli.add_parser(commands)
    lora_cli.add_parser(commands)
    models_cli.add_parsers(commands)
    eval_cli.add_parser(commands)
    serve_cli.add_parser(commands)
    return parser


def requests_from_args(args: argparse.Namespace) -> list:
    """Build one GenerationRequest per prompt from the flags (and --from / --prompt-file).

    Midjourney parameters are split off the prompt but not applied; see ``jobs_from_args``.
    """
    return [job.request for job in jobs_from_args(args)]


def jobs_from_args(args: argparse.Namespace, recorded_text: str | None = None) -> list:
    """One job per prompt (the service's :func:`huabi.service.requests.prompt_jobs` on the flags);
    ``recorded_text``: ``--from``'s infotext when the caller has read it already."""
    from huabi.service.pngio import read_infotext
    from huabi.service.requests import prompt_jobs
    from huabi.service.textfiles import read_prompt_lines

    if args.prompt_file is not None:
        prompts = read_prompt_lines(args.prompt_file)  # bounded read, UTF-8 or a one-line error
    elif args.prompt is not None:
        prompts = [args.prompt]
    elif args.from_image is not None:
        prompts = [None]
    else:
        raise HuabiError("prompt: give a prompt, --prompt-file FILE or --from IMAGE")
    if args.from_image is not None:
        recorded_text = recorded_text if recorded_text is not None else read_infotext(args.from_image)
        _note_unimplemented(recorded_text, args.from_image)
    return prompt_jobs(
        prompts, request_values(args),
        from_infotext=recorded_text,
        styles=getattr(args, "styles", None) or (), styles_file=getattr(args, "styles_file", None),
        loras=getattr(args, "loras", None) or (), mj_grid=bool(getattr(args, "mj", False)),
        control=control_cli.control_input(args),
    )


def _note_unimplemented(text: str, image) -> None:
    from huabi.core.infotext import unimplemented_keys

    skipped = unimplemented_keys(text)
    if skipped:
        print(f"huabi: note: {image}: {', '.join(skipped)} not applied (huabi does not implement "
              f"{'it' if len(skipped) == 1 else 'them'}) and not copied into the new infotext", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from huabi.service.outputs import check_output_folder
    from huabi.service.pngio import read_infotext

    check_output_folder(args.out)  # fail before any model loads, not after the run
    recorded_text = read_infotext(args.from_image) if args.from_image is not None else None
    if recorded_text is not None:
        use_recorded_precision(args, recorded_text, args.from_image)
    if getattr(args, "ray", None):  # scale-out (docs/scale-out.md): imports ray, only here
        return ray_batch.generate_on_ray(args, jobs_from_args(args, recorded_text))
    jobs = jobs_from_args(args, recorded_text)
    studio = make_studio(args)
    recorder = gallery_recorder()
    try:
        return _generate_jobs(args, jobs, studio, recorder)
    finally:
        recorder.close()


def _generate_jobs(args: argparse.Namespace, jobs: list, studio, recorder) -> int:
    from huabi.service.engine import save_grid

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
            saved: list = []
            try:
                results = studio.run(with_flow_extras(request, args), out_dir=args.out, on_event=progress.update,
                                     on_saved=keep_and_record(saved, recorder))
            except KeyboardInterrupt:
                progress.close()
                print_saved_paths(saved)  # Ctrl-C: say what was kept before main says "interrupted"
                raise
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

    print(printable_text(read_infotext(args.image)))
    return 0


# Bidirectional overrides and isolates can make text read differently from what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable_text(text: str) -> str:
    """``text`` safe for a terminal: control characters (ESC, BEL, CR, ...) and bidi overrides shown
    as ``\\x1b``-style escapes, so a crafted image cannot drive the terminal; newlines and tabs stay."""
    out = []
    for char in text:
        if char in "\n\t":
            out.append(char)
        elif char in _BIDI_CONTROLS or (not char.isprintable() and char != " " and ord(char) < 0x100 or char == "\x7f"):
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)


def cmd_system(args: argparse.Namespace) -> int:
    from huabi.service.backend_choice import system_report_with_backend
    from huabi.service.devices import resolve_device

    for line in system_report_with_backend(resolve_device(args.device)):
        print(line)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from huabi.models.hashes import model_short_hash
    from huabi.service.engine import Engine

    engine = Engine(device="cpu", dtype="fp32", models_dir=args.models_dir)
    entries = list(engine.iter_models())
    if not entries:
        print(f"no models in {engine.models_dir}", file=sys.stderr)
        return 0
    for entry in entries:
        # One broken file must not hide the others: it is listed as unreadable, with the reason.
        family = _describe_for_listing(entry.path)
        try:
            short_hash = model_short_hash(entry.path) if entry.path.is_file() else "-"
        except (HuabiError, OSError):
            short_hash = "-"
        print(printable_text(f"{entry.name}\t{family}\t{short_hash}\t{entry.path}"))
    return 0


def _describe_for_listing(path: Path) -> str:
    """The family line of ``huabi models``; a file that cannot be read is ``unreadable (reason)``,
    one that reads but is no known model is ``unrecognised (reason)``."""
    from huabi.models.detect import detect
    from huabi.models.flow_load import is_flow_model
    from huabi.models.formats import read_state_dict_shapes
    from huabi.models.inspect import describe_model_file

    def first_line(err: BaseException) -> str:
        text = str(err).strip()
        return text.splitlines()[0] if text else type(err).__name__

    if path.suffix.lower() == ".gguf" or is_flow_model(path):  # described from the header: any failure is a read failure
        try:
            return describe_model_file(path)
        except Exception as err:  # noqa: BLE001  (a listing survives any one broken file)
            return f"unreadable ({first_line(err)})"
    try:
        tensors, metadata = read_state_dict_shapes(path)
    except Exception as err:  # noqa: BLE001
        return f"unreadable ({first_line(err)})"
    try:
        found = detect(tensors, metadata=metadata, source=path.name)
    except Exception as err:  # noqa: BLE001
        return f"unrecognised ({first_line(err)})"
    prediction = found.prediction.value if found.prediction_known else "prediction decided at load"
    return f"{found.family.value} {found.variant.value} {prediction}"


def cmd_data(args: argparse.Namespace) -> int:
    from huabi.data.build import main as data_main

    rest = list(args.rest)
    if rest[:1] in (["-h"], ["--help"]):
        print("usage: huabi data build --out DIR [...]  (huabi data build --help: every option)")
        return 0
    if not rest or rest[0] != "build":
        raise HuabiError("data: the only data command is `huabi data build --out DIR [...]`")
    return data_main(rest[1:], prog="huabi data build")


def cmd_train(args: argparse.Namespace) -> int:
    from huabi.train.__main__ import main as train_main

    return train_main(list(args.rest), prog="huabi train")


PASS_THROUGH = ("data", "train")

COMMANDS = {
    "generate": cmd_generate,
    "info": cmd_info,
    "system": cmd_system,
    "models": cmd_models,
    "data": cmd_data,
    "train": cmd_train,
    "xyz": xyz_cli.cmd_xyz,
    "edit": edit_cli.cmd_edit,
    "upscale": upscale_cli.cmd_upscale,
    "preprocess": control_cli.cmd_preprocess,
    "merge-lora": lora_cli.cmd_merge_lora,
    **models_cli.COMMANDS,
    "eval": eval_cli.cmd_eval,
    "serve": serve_cli.cmd_serve,
}


def check_argv_encoding(argv: list[str]) -> None:
    """Python hands undecodable argv bytes over as lone surrogates; name the argument instead
    of failing later inside the tokenizer (``huabi generate $'caf\\xe9'``)."""
    for index, arg in enumerate(argv, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            raise HuabiError(f"argument {index} ('{shown}') is not valid UTF-8; "
                             "check the terminal's encoding (e.g. LANG=C.UTF-8)") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_argv_encoding(argv)
    except HuabiError as err:
        print(f"huabi: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    parser = build_parser()
    if argv and argv[0] in PASS_THROUGH:
        # Sub-tools parse their own arguments (argparse cannot pass a leading --help through).
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        from huabi.service.device_choice import configure_threads

        configure_threads()  # physical cores, not hyper-threads (OMP_NUM_THREADS / HUABI_THREADS win)
        return COMMANDS[args.command](args)
    except HuabiError as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"huabi: error: {in_user_words(message)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("huabi: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _quiet_broken_pipe() -> int:
    """``huabi info x.png | head``: the reader left; stop quietly with SIGPIPE's status, as git does.
    stdout is pointed at /dev/null so the interpreter's final flush does not complain again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
