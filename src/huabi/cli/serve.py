"""``huabi serve``: the A1111-compatible REST API, the job queue, the gallery and the web UI.

    huabi serve                                   # http://127.0.0.1:7860, data in ~/huabi/server
    huabi serve --host 0.0.0.0 --api-auth me:secret

Only argument parsing lives here; the server is huabi.server.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

from huabi.errors import HuabiError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", help="A1111-compatible REST API, job queue, gallery and web UI")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    serve.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS...]",
                       help="HTTP basic auth on every route (A1111's --api-auth); required off loopback")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --host without --api-auth (anyone on the network can use it)")
    serve.add_argument("--models-dir", type=Path, help="models folder (default: $HUABI_MODELS_DIR or ~/huabi/models)")
    serve.add_argument("--data-dir", type=Path,
                       help="queue database, outputs, gallery (default: $HUABI_DATA_DIR, $HUABI_HOME/server or "
                            "~/huabi/server; huabi generate/edit record their images into the default one's gallery)")
    serve.add_argument("--model", help="the checkpoint used until a client picks another (name in the models folder)")
    serve.add_argument("--gallery-folder", dest="gallery_folders", type=Path, action="append", default=[],
                       metavar="DIR", help="also show the images in DIR (e.g. the CLI's outputs) in the gallery; "
                                           "indexed at start and on POST /huabi/v1/gallery/scan (repeatable)")
    serve.add_argument("--embeddings", dest="embeddings_dir", type=Path, metavar="DIR",
                       help="textual-inversion embeddings folder")
    serve.add_argument("--wildcards", dest="wildcards_dir", type=Path, metavar="DIR", help="wildcards folder")
    serve.add_argument("--styles-file", type=Path, metavar="PATH", help="A1111 styles.csv")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    serve.add_argument("--dtype", default="auto", help="auto, fp32, fp16 (CUDA), bf16")
    serve.add_argument("--backend", default="auto",
                       help="auto (OpenVINO for full-size models on a CPU where it measured faster, else torch), "
                            "torch, openvino, openvino-int8")
    scale = serve.add_argument_group("scale-out on Ray (docs/scale-out.md; needs the [ray] extra)")
    scale.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                       help="run jobs on the huabi workers of a Ray cluster (HOST:PORT of its head; "
                            "default: the cluster on this machine); models are read by path on shared storage")
    scale.add_argument("--worker-threads", type=int, metavar="N",
                       help="torch threads on the workers (default: this machine's; the same count gives "
                            "byte-identical PNGs)")
    scale.add_argument("--ray-attempts", type=int, default=3, metavar="N",
                       help="runs of a job whose worker dies before the job fails (default 3)")
    limits = serve.add_argument_group("limits (each refusal is a 4xx with a one-line reason)")
    limits.add_argument("--max-body-mb", type=float, default=50, help="request body size (default 50 MB)")
    limits.add_argument("--max-pixels", type=int, default=2048 * 2048,
                        help="width x height of outputs and of decoded input images (default 2048x2048)")
    limits.add_argument("--max-side", type=int, default=4096, help="longest side in pixels (default 4096)")
    limits.add_argument("--max-batch", type=int, default=16, help="images per request, batch x count (default 16)")
    limits.add_argument("--max-queue", type=int, default=100, help="queued jobs before 503 (default 100)")
    limits.add_argument("--max-prompt", type=int, default=10_000, help="prompt length in characters (default 10000)")
    return serve


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_data_dir() -> Path:
    from huabi.service.gallery import default_data_dir as data_dir

    return data_dir()


def config_from_args(args: argparse.Namespace):
    from huabi.server.a1111 import Limits
    from huabi.server.app import ServerConfig, parse_credentials
    from huabi.server.runner import RunnerConfig

    credentials = parse_credentials(args.api_auth) if args.api_auth else ()
    if not is_loopback(args.host) and not credentials and not args.insecure:
        raise HuabiError(f"serve: listening on {args.host} lets other machines in; add --api-auth USER:PASS "
                         "(or --insecure if you mean it)")
    if args.worker_threads is not None and args.worker_threads < 1:
        raise HuabiError(f"worker-threads: must be >= 1, got {args.worker_threads}")
    if not 0 < args.port < 65536:
        raise HuabiError(f"port: must be from 1 to 65535, got {args.port}")
    from huabi.service.cpu_backend import parse_backend

    parse_backend(args.backend)  # a wrong name fails now, not at the first job
    runner = RunnerConfig(models_dir=args.models_dir, device=args.device, dtype=args.dtype, backend=args.backend,
                          embeddings_dir=args.embeddings_dir, wildcards_dir=args.wildcards_dir,
                          styles_file=args.styles_file)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                    max_side_px=args.max_side, max_batch_images=args.max_batch, max_prompt_chars=args.max_prompt,
                    max_queued=args.max_queue)
    return ServerConfig(data_dir=(args.data_dir or default_data_dir()).expanduser(), runner=runner, limits=limits,
                        credentials=credentials, default_model=args.model, ray=args.ray,
                        ray_threads=args.worker_threads, ray_attempts=args.ray_attempts,
                        gallery_folders=tuple(folder.expanduser().resolve() for folder in args.gallery_folders))


def cmd_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    import uvicorn

    from huabi.server.app import create_app

    app = create_app(config)
    if args.model:
        app.state.server.catalog.checkpoint(args.model, "model")  # an unknown --model fails before listening
    try:  # fail early with one line when the port is taken
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as err:
        raise HuabiError(f"serve: cannot listen on {args.host}:{args.port} ({err.strerror or err})") from None
    shown = f"[{args.host}]" if ":" in args.host else args.host
    pool = getattr(app.state.server.queue.executor, "pool", None)
    if pool is not None:
        print(f"huabi: jobs run on the Ray cluster's huabi workers ({pool.capacity()} ready now; "
              f"dashboard: {pool.dashboard_url or 'none'})", file=sys.stderr, flush=True)
    print(f"huabi: serving the web UI and API on http://{shown}:{args.port}/ (data in {config.data_dir})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
