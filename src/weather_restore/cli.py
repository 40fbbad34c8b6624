"""`weather-restore`: one subcommand per pipeline stage. Parses arguments, loads params once, calls the library.

Every error the project raises on purpose (`WeatherRestoreError`) is printed as one message without a
traceback, and the command exits with status 2; a promotion refused by the gate exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from weather_restore import __version__
from weather_restore.config import DEFAULT_PARAMS, Params, load_params
from weather_restore.errors import ConfigError, PromotionRefused, WeatherRestoreError
from weather_restore.models.facts import MODEL_NAMES, PRECISIONS
from weather_restore.progress import show_progress

log = logging.getLogger("weather_restore")

Command = Callable[[argparse.Namespace, Params], int | None]
RUNS_WITHOUT_PARAMS = {"restore", "score"}
PROMOTION_REFUSED = 3
H264_CRF = (0, 51)  # libx264's quality scale: 0 lossless, 51 worst


class Parser(argparse.ArgumentParser):
    """argparse, with its errors one line like every other error of the tool (status 2), not usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


# Argument types: every value is checked while parsing, before anything runs or is written.
def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` (to `high`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number {allowed}")
        return value

    return parse


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a number above 0")
    return value


def _existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: no such folder")
    return path


FORCE_FOLDER_HELP = (
    "replace --out even when weather-restore did not write it (a folder without its .weather-restore-output.json); "
    "still refused: a folder holding the input, the current folder or the home folder"
)


def cmd_params(args: argparse.Namespace, params: Params) -> None:
    print(json.dumps(params.model_dump(mode="json"), indent=2))


def cmd_assemble(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.data.assemble import assemble

    out = args.out or params.data.root / "videos"
    records = assemble(params.data, out, force=args.force)
    print(f"assembled {len(records)} source videos into {out}")


def cmd_split(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.data.assemble import read_index, worker_count
    from weather_restore.data.clips import write_clips

    videos = args.videos or params.data.root / "videos"
    out = args.out or params.data.root / "mwvd"
    workers = worker_count(params.data.workers)
    clips = write_clips(read_index(videos), params.data.clips, out, workers, force=args.force, inputs=(videos,))
    print(f"wrote {len(clips)} clips to {out}")


def cmd_train(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.train import train

    summary = train(
        args.model,
        params,
        data_root=args.data or params.data.root / "mwvd",
        out_dir=args.out or Path("models") / args.model,
        reports_dir=args.reports or Path("reports") / args.model,
        project_root=Path.cwd(),
        restart=args.restart,
    )
    if summary.main:
        gain = (
            f", validation PSNR {summary.val_psnr:.2f} dB (input {summary.val_input_psnr:.2f} dB; best "
            f"{summary.best_val_psnr:.2f} dB at iteration {summary.best_iteration})"
            if summary.val_psnr is not None
            else ""
        )
        print(
            f"trained {summary.model} to iteration {summary.iterations} in {summary.seconds:.0f} s{gain}; "
            f"data wait {100 * summary.data_wait_fraction:.1f}% of step time; checkpoint {summary.checkpoint}"
            + (f"; MLflow run {summary.run_id}" if summary.run_id else "")
        )


def _options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The parsed options `names`, as keyword arguments of the stage function of the same names."""
    return {name: getattr(args, name) for name in names}


def cmd_evaluate(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.evaluate import evaluate_stage

    result = evaluate_stage(args.model, params, Path("."), **_options(args, "checkpoint", "model_uri", "data", "out"))
    metrics, overall = result.metrics, result.metrics["overall"]
    print(
        f"{args.model}: test PSNR {overall['psnr']:.2f} dB (input {overall['input_psnr']:.2f}), SSIM "
        f"{overall['ssim']:.4f} (input {overall['input_ssim']:.4f}) over {metrics['clips']} clips; "
        f"{metrics['fps']:.1f} frames/s on {metrics['device']}; wrote {result.reports_dir}/metrics.json; "
        f"{result.logged}"
    )


def cmd_export(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.export import export_stage

    options = _options(args, "checkpoint", "data", "out", "report", "force")
    result = export_stage(args.model, params, Path("."), **options)
    report, latency = result.report, result.report["latency"]
    print(
        f"exported {args.model} ({result.weights['weights']}) to {result.onnx_path} ({report['exporter']}, opset "
        f"{report['opset']}, {report['export_seconds']:.0f} s); parity on test clip {report['clip']}: max "
        f"|difference| {report['max_abs_diff']:.2e}, PSNR difference {report['psnr_diff_db']:.5f} dB; latency per "
        f"input {tuple(latency['input'])}: PyTorch {latency['pytorch_s']:.3f} s, ONNX Runtime "
        f"{latency['onnxruntime_s']:.3f} s; {result.logged}"
    )


def cmd_card(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.model_card import from_files, write_pipeline_card

    reports = Path("reports") / args.model
    facts = from_files(
        args.model,
        reports,
        params.data.root / "mwvd",
        Path("models") / args.model / "run.json",
        training=getattr(params.training, args.model).model_dump(mode="json"),
        architecture=getattr(params.models, args.model).model_dump(mode="json"),
    )
    print(f"wrote {write_pipeline_card(facts, reports / 'model_card.md')}")


def cmd_compare(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.evaluate import write_comparison

    path = write_comparison(args.reports, args.models)
    print(path.read_text())


def cmd_restore(args: argparse.Namespace, params: Params) -> None:
    import torch

    from weather_restore.model_loading import load_restorer
    from weather_restore.restore import restore
    from weather_restore.tracking import tracking_uri

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    uri = tracking_uri(params.tracking, Path.cwd())
    model = load_restorer(args.model, args.checkpoint, device, uri, args.threads, args.precision)
    from weather_restore.quality import check_report_path

    report = args.report and check_report_path(args.report, [args.input, args.output], args.force)
    summary = restore(
        args.input,
        args.output,
        model,
        tile=args.tile,
        overlap=args.tile_overlap,
        stride=args.stride,
        compare=args.compare,
        fps=args.fps,
        crf=args.crf,
        force=args.force,
    )
    notes = "".join(f"; {note}" for note in summary.notes)
    precision = f", {model.precision}" if model.precision != "float32" else ""
    print(
        f"restored {summary.frames} frames ({summary.width}x{summary.height}) with {summary.model} "
        f"({summary.backend}{precision}) in {summary.seconds:.1f} s ({summary.fps:.2f} frames/s) -> "
        f"{summary.output}{notes}"
    )
    if report:
        _score(args.input, args.output, report, args.report_every)


def _score(input_path: Path, output_path: Path, report: Path | None, every: int) -> None:
    from weather_restore.quality import report_line, score_footage, write_report

    scores = score_footage(input_path, output_path, every)
    if report:
        write_report(scores, report)
    print(report_line(scores) + (f"; wrote {report}" if report else ""))


def cmd_score(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.quality import check_report_path

    report = args.report and check_report_path(args.report, [args.input, args.output], args.force)
    _score(args.input, args.output, report, args.report_every)


def _registry_client(params: Params):
    from weather_restore.registry import connect
    from weather_restore.tracking import tracking_uri

    return connect(tracking_uri(params.tracking, Path.cwd()))


def cmd_register(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.registry import register
    from weather_restore.tracking import RUN_INFO_NAME, read_run_info

    run_info = read_run_info(Path("models") / args.model / RUN_INFO_NAME)
    print(register(args.model, run_info, _registry_client(params), data_root=params.data.root / "mwvd").summary())


def cmd_promote(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.registry import promote

    result = promote(
        args.model,
        _registry_client(params),
        args.version,
        min_delta=params.registry.min_delta,
        weather_tolerance=params.registry.weather_tolerance,
        temporal_tolerance=params.registry.temporal_tolerance,
        force=args.force,
        reason=args.reason,
    )
    if result.gate is not None:
        print(result.gate.table())
    print(result.summary())


def cmd_rollback(args: argparse.Namespace, params: Params) -> None:
    from weather_restore.registry import rollback

    print(rollback(args.model, _registry_client(params)).summary())


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = Parser(
        prog="weather-restore",
        description="Train, evaluate, export and promote models that remove rain, haze and snow from video.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--params", type=Path, help="params file (default: params.yaml; `restore` runs without one, on defaults)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The same two options after the command (`weather-restore train --params x`); given there, they win.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", type=Path, default=argparse.SUPPRESS, help="params file (default: params.yaml)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Command] = {}

    def add(name: str, func: Command, help: str, description: str, model: str = "") -> argparse.ArgumentParser:
        """A subcommand; with `model`, its required --model option ("which model to <model>") and the stages'
        --data option."""
        commands[name] = func
        parser = sub.add_parser(name, help=help, description=description, parents=[common])
        if model:
            parser.add_argument("--model", required=True, choices=MODEL_NAMES, help=f"which model to {model}")
        if model in ("train", "evaluate", "export"):
            parser.add_argument("--data", type=Path, help="MWVD folder (default: <data.root>/mwvd)")
        return parser

    def add_report(parser: argparse.ArgumentParser, help: str) -> None:
        """restore's and score's no-reference report options."""
        parser.add_argument("--report", type=Path, help=help)
        parser.add_argument("--report-every", type=_whole_number(1), default=1, help="NIQE of every N-th frame only")

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
    p.add_argument("--force", action="store_true", help=FORCE_FOLDER_HELP)
    p = add(
        "split",
        cmd_split,
        "cut the source videos into clips and split them into train, val and test by source video (MWVD layout)",
        "Reads <data.root>/videos/index.json and the frames it lists, and params data.clips. Writes "
        "<data.root>/mwvd/{train,val,test}/{input,gt}/<clip>/NNNN.png, {train,val,test}/physics/<clip>.npz, "
        "manifest.json (per clip: weather, split, source video, frame range, parameters, checksum) and "
        "meta_info_{train,val,test}.txt (the published loader's annotation files).",
    )
    p.add_argument("--videos", type=Path, help="assembled videos (default: <data.root>/videos)")
    p.add_argument("--out", type=Path, help="output folder (default: <data.root>/mwvd)")
    p.add_argument("--force", action="store_true", help=FORCE_FOLDER_HELP)
    p = add(
        "train",
        cmd_train,
        "train one model on the MWVD training clips (resumable; runs under torchrun too)",
        "Reads params training.<model> and models.<model>, params tracking, and <data.root>/mwvd (manifest.json, "
        "the train clips and a few val clips for validation; never the test clips). Writes "
        "models/<model>/checkpoint.pt (every checkpoint_every iterations and at the end; a re-run resumes an "
        "unfinished one of the same config), models/<model>/best.pt (the weights of the best validation PSNR, the "
        "EMA's when training.<model>.ema_decay > 0), "
        "models/<model>/run.json (the MLflow run id), reports/<model>/train.csv and validation.csv, and an MLflow "
        "run (params, git commit, data checksum, loss, lr, validation PSNR, the model) in the store named by "
        "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db with artifacts in mlartifacts/. Under "
        "`torchrun --nproc_per_node N` it trains with DistributedDataParallel (training.<model>.batch_size is the "
        "global batch).",
        model="train",
    )
    p.add_argument("--out", type=Path, help="checkpoint and run.json folder (default: models/<model>)")
    p.add_argument("--reports", type=Path, help="train.csv and validation.csv folder (default: reports/<model>)")
    p.add_argument("--restart", action="store_true", help="ignore an unfinished checkpoint and start afresh")
    p = add(
        "evaluate",
        cmd_evaluate,
        "measure a trained model on the test clips (PSNR, SSIM, LPIPS per clip, weather and overall)",
        "Reads the weights training.<model>.use names (models/<model>/best.pt or checkpoint.pt; or --checkpoint, or "
        "a registry --model-uri), <data.root>/mwvd (the "
        "test clips) and params evaluation. Writes reports/<model>/metrics.json (overall and per weather, for the "
        "restored and the degraded input; params, GFLOPs of 10 frames at evaluation.flops_size, frames/s), "
        "clips.csv and samples.png (input | output | ground truth, one clip per weather). Logs them to the "
        "training's MLflow run named in models/<model>/run.json only when it evaluated those weights on the default "
        "test set; any other evaluation goes into a new MLflow run tagged with what it evaluated (it says which). "
        "LPIPS needs AlexNet's weights in the local torch "
        "cache; without them it is reported as unavailable, never downloaded.",
        model="evaluate",
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint (default: the weights training.<model>.use names)")
    p.add_argument("--model-uri", help="evaluate an MLflow model instead, e.g. models:/DwGN@champion")
    p.add_argument("--out", type=Path, help="reports folder (default: reports/<model>)")
    p = add(
        "export",
        cmd_export,
        "export a trained model to ONNX and prove it matches PyTorch on a real test clip",
        "Reads the weights training.<model>.use names (models/<model>/best.pt or checkpoint.pt; or --checkpoint), "
        "the first test clip of <data.root>/mwvd and params "
        "export. Writes models/<model>/model.onnx (opset export.opset; batch, height and width dynamic, and frames "
        "for DynStaticNet; onnx.checker passes) only when ONNX Runtime matches PyTorch on that clip at its size and "
        "at a second, ragged size (max |difference| <= export.atol, PSNR within export.psnr_tolerance_db), else "
        "fails saying by how much; reports/<model>/export.json (parity, both runtimes' latency on this machine). "
        "Logs the ONNX model (mlflow.onnx, with its signature) and the figures into the training's MLflow run "
        "named in models/<model>/run.json.",
        model="export",
    )
    p.add_argument(
        "--checkpoint", type=Path, help="checkpoint (default: what training.<model>.use names; others: not logged)"
    )
    p.add_argument("--out", type=Path, help="ONNX file (default: models/<model>/model.onnx)")
    p.add_argument("--report", type=Path, help="report (default: reports/<model>/export.json)")
    p.add_argument("--force", action="store_true", help="replace an --out file that holds no ONNX graph")
    p = add(
        "compare",
        cmd_compare,
        "gather the evaluated models into one table per weather",
        "Reads reports/<model>/metrics.json of each model. Writes reports/compare.md.",
    )
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES), help="models to compare")
    p.add_argument(
        "--reports", type=_existing_folder, default=Path("reports"), help="reports folder (default: reports)"
    )
    p = add(
        "card",
        cmd_card,
        "write the model card of the current model (reports/<model>/model_card.md)",
        "Reads reports/<model>/metrics.json, reports/<model>/export.json (when exported), models/<model>/run.json, "
        "<data.root>/mwvd/manifest.json and params training.<model> and models.<model>. Writes "
        "reports/<model>/model_card.md: the model, its training data and recipe, test results per weather against "
        "the degraded input, ONNX parity and latency, intended use and limits, how to load it.",
        model="describe",
    )
    p = add(
        "restore",
        cmd_restore,
        "restore a video file, a folder of frames or an image with a trained model",
        "Reads INPUT: a video file (.mp4 .mov .m4v .mkv .avi .webm, decoded by the FFmpeg inside PyAV), a folder "
        "of frames (.png .jpg .jpeg .bmp .tif .tiff, all one size, natural order) or one image; and the model: "
        "--model a .pt checkpoint, an .onnx file, a model name (dynstaticnet, dwgn) with --checkpoint PATH, or a "
        "registry URI models:/DynStaticNet@champion (from MLFLOW_TRACKING_URI, else sqlite:///mlflow.db). "
        "DynStaticNet restores sliding 10-frame windows blended over time, DwGN each frame; both in overlapping "
        "tiles blended in space, so any resolution fits in memory. Frames are decoded, restored and encoded as "
        "they go. Writes OUTPUT, its kind named by its suffix: a video (.mp4 .mov .m4v .mkv .avi; H.264 yuv420p, "
        "the input's frame rate and time stamps, its audio stream copied when the container takes it), one image, "
        "or with no suffix a folder of PNG frames (the input frames' names, or 000000.png ... for a video). "
        "OUTPUT appears under its name only when complete.",
    )
    p.add_argument("input", type=Path, help="video file, folder of frames or image")
    p.add_argument("-o", "--output", type=Path, required=True, help="video file, image, or folder (no suffix)")
    p.add_argument("--model", required=True, help="a .pt or .onnx file, a model name, or models:/NAME@ALIAS")
    p.add_argument("--checkpoint", type=Path, help="the .pt or .onnx file of --model NAME")
    p.add_argument("--device", default="auto", help="PyTorch device: auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument(
        "--tile", type=_whole_number(0), default=256, help="tile side in pixels; 0: whole frames (default: 256)"
    )
    p.add_argument(
        "--tile-overlap", type=_whole_number(0), default=32, help="pixels tiles overlap and blend over (default: 32)"
    )
    p.add_argument(
        "--stride", type=_whole_number(1), default=5, help="frames between DynStaticNet's 10-frame windows (default: 5)"
    )
    p.add_argument(
        "--threads", type=_whole_number(1), help="CPU threads for PyTorch and ONNX Runtime (default: one per core)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="a .pt checkpoint's arithmetic: bfloat16 runs its convolutions, matmuls and attention under autocast, "
        "faster where the CPU has AMX or AVX512-BF16 (README: speed and PSNR measured); ONNX graphs run in float32 "
        "(default: float32)",
    )
    p.add_argument("--compare", action="store_true", help="write input | restored side by side")
    p.add_argument(
        "--fps", type=_positive_number, default=25.0, help="frame rate of a video made from frames (default: 25)"
    )
    p.add_argument(
        "--crf", type=_whole_number(*H264_CRF), default=18, help="H.264 quality 0-51, lower is better (default: 18)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing OUTPUT weather-restore did not write (a folder of other files, a file that is not "
        "a video or image); still refused: the input itself, a folder holding the input, the current or home "
        "folder, a folder under a file's name",
    )
    report_help = (
        "also write a JSON report of no-reference quality: NIQE per frame of the input and the output, and the mean "
        "change between frames (flicker); lower is better for both"
    )
    add_report(p, report_help)
    p = add(
        "score",
        cmd_score,
        "no-reference quality of a restored video against its input (NIQE, flicker), without ground truth",
        "Reads INPUT and OUTPUT (a video, folder of frames or image each; OUTPUT may be a --compare video) and prints "
        "NIQE (Mittal et al. 2013, pristine model fitted on the built-in clean footage) and the mean frame-to-frame "
        "change of both; --report writes them per frame as JSON.",
    )
    p.add_argument("input", type=Path, help="the footage as it was")
    p.add_argument("output", type=Path, help="the footage restored from it")
    add_report(p, "the JSON report to write")
    p.add_argument("--force", action="store_true", help="replace a --report file weather-restore did not write")
    store = "the store named by MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    p = add(
        "register",
        cmd_register,
        "register a trained and evaluated model as a new version in the MLflow model registry",
        "Reads models/<model>/run.json (the training's MLflow run, which `evaluate` must have given test metrics) "
        f"from {store}. Creates a version of the registered model DynStaticNet or DwGN from the run's logged model, "
        "tagged with the git commit, data manifest checksum, config hash, model format, test metrics overall and "
        "per weather, the test set's manifest checksum and, when `export` logged them, the ONNX parity and latency "
        "figures; its description says what it is, what it was trained on and its test PSNR against the input's. "
        "A run registered before gives back its version.",
        model="register",
    )
    p = add(
        "promote",
        cmd_promote,
        "move the alias champion to a registered version when it beats the current champion",
        f"Reads the registered versions of DynStaticNet or DwGN from {store}, and params registry. The gate: the "
        "candidate's test PSNR beats the champion's by at least registry.min_delta dB on the same test set (same "
        "test manifest checksum), and no weather's PSNR drops by more than registry.weather_tolerance dB; with no "
        "champion yet the candidate passes. On a pass, alias champion moves to the candidate and the old champion "
        "gets alias previous; prints the comparison table. A refusal prints the table and the reasons and exits "
        "with status 3. Every decision (time, user, deltas, reasons) is written into the candidate's tags "
        "(promotion.*, history). Load the champion as models:/DynStaticNet@champion.",
        model="promote",
    )
    p.add_argument("--version", type=_whole_number(1), help="registered version to promote (default: the newest)")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses (needs --reason)")
    p.add_argument("--reason", help="why: required with --force, recorded with your user name")
    p = add(
        "rollback",
        cmd_rollback,
        "make the previous champion the champion again",
        f"Reads the aliases of DynStaticNet or DwGN from {store}. Swaps champion and previous, so a second "
        "rollback undoes the first; records the time and user in both versions' tags (rollback.*, history). Fails "
        "when there is no previous version.",
        model="roll back",
    )
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if args.command == "promote" and args.reason is not None and not args.force:
        parser.exit(2, "weather-restore promote: --reason is recorded only with --force: add --force or leave it out\n")
    if args.command == "promote" and args.force and not (args.reason or "").strip():
        parser.exit(2, "weather-restore promote: --force needs --reason TEXT (it is recorded with your user name)\n")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    show_progress(os.environ.get("WEATHER_RESTORE_PROGRESS", "1") != "0")  # read here only: DVC's logs, CI
    try:
        if args.params is None and args.command in RUNS_WITHOUT_PARAMS and not DEFAULT_PARAMS.is_file():
            params = Params()  # restoring a user's video outside the repository needs no pipeline settings
        else:
            params = load_params(args.params or DEFAULT_PARAMS)
        return commands[args.command](args, params) or 0
    except PromotionRefused as error:  # the gate said no: an answer, not a failure of the tool
        print(f"weather-restore {args.command}: {error}", file=sys.stderr)
        return PROMOTION_REFUSED
    except ConfigError as error:  # a setting judged by a stage: named in the params file actually read
        print(f"weather-restore {args.command}: {error.in_file(args.params or DEFAULT_PARAMS)}", file=sys.stderr)
        return 2
    except WeatherRestoreError as error:
        print(f"weather-restore {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"weather-restore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
