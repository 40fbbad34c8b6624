"""`weather-restore`: one subcommand per pipeline stage. Parses arguments, loads params once, calls the library.

Every error the project raises on purpose (`WeatherRestoreError`) is printed as one message without a
traceback, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from weather_restore import __version__
from weather_restore.config import DEFAULT_PARAMS, Params, load_params
from weather_restore.errors import WeatherRestoreError

log = logging.getLogger("weather_restore")

Command = Callable[[argparse.Namespace, Params], int | None]


def cmd_params(args: argparse.Namespace, params: Params) -> None:
    print(json.dumps(params.model_dump(mode="json"), indent=2))


def cmd_assemble(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.data.assemble import assemble

    out = args.out or params.data.root / "videos"
    records = assemble(params.data, out)
    print(f"assembled {len(records)} source videos into {out}")


def cmd_split(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.data.assemble import read_index, worker_count
    from weather_restore.data.clips import write_clips

    videos = args.videos or params.data.root / "videos"
    out = args.out or params.data.root / "mwvd"
    clips = write_clips(read_index(videos), params.data.clips, out, worker_count(params.data.workers))
    print(f"wrote {len(clips)} clips to {out}")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="weather-restore",
        description="Train, evaluate, export and promote models that remove rain, haze and snow from video.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Command] = {}

    def add(name: str, func: Command, help: str, description: str) -> argparse.ArgumentParser:
        commands[name] = func
        return sub.add_parser(name, help=help, description=description)

    add(
        "params",
        cmd_params,
        "validate params.yaml and print it with every default filled in",
        "Reads params.yaml (or --params), validates every section and prints the full configuration as JSON.",
    )
    p = add(
        "assemble",
        cmd_assemble,
        "build the source videos (built-in generator or imported datasets)",
        "Reads params.yaml section data (data.sources; with none, data.synthetic renders weather over "
        "photographs shipped by scikit-image). Writes <data.root>/videos/: index.json listing every source "
        "video, and for generated videos their frames ({input,gt}/NNNN.png) and physics.npz (t, A, layer).",
    )
    p.add_argument("--out", type=Path, help="output folder (default: <data.root>/videos)")
    p = add(
        "split",
        cmd_split,
        "cut the source videos into clips and split them by source video (MWVD layout)",
        "Reads <data.root>/videos/index.json and the frames it lists, and params data.clips. Writes "
        "<data.root>/mwvd/{train,test}/{input,gt}/<clip>/NNNN.png, {train,test}/physics/<clip>.npz, "
        "manifest.json (per clip: weather, split, source video, frame range, parameters, checksum) and "
        "meta_info_{train,test}.txt (the published loader's annotation files).",
    )
    p.add_argument("--videos", type=Path, help="assembled videos (default: <data.root>/videos)")
    p.add_argument("--out", type=Path, help="output folder (default: <data.root>/mwvd)")
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        params = load_params(args.params)
        return commands[args.command](args, params) or 0
    except WeatherRestoreError as error:
        print(f"weather-restore {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"weather-restore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
