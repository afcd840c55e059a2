"""Command line: ``video-infinity generate [--config FILE] [--prompt ... --num-frames ...] [--set key=value ...]``.

``generate``'s flags are generated from the schemas (:func:`video_infinity.run.config.run_flags`):
one per field of the generation request, one per key of the run. The config is validated, and the
GPU ids checked, before anything heavy is imported or any process starts: a wrong config or flag
fails in well under a second of our own work, with one line naming the field.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, RunInterrupted, UserError, VideoInfinityError
from .run.config import REQUEST_KEYS, RunFlag, check_devices_available, load_run_config, run_flags
from .run.contract import ContractError, ErrorReport, RunRequest, StatusFolder
from .ui.form import Limits

PROG = "video-infinity"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``generate``, ``plan``, ``serve`` and ``inspect``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Training-free distributed long video generation (Video-Infinity): "
        "the frames of one video are split over several devices that denoise together.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate = commands.add_parser(
        "generate",
        help="generate a video (from flags, a JSON config, or both)",
        description="Generate a video. Every setting is a flag (the embedded demo model unless --model says "
        "otherwise), e.g. video-infinity generate --prompt 'a red circle moving right' --num-frames 64 --devices 2; "
        "or a JSON config (the original Video-Infinity format is accepted), which the flags override. Without "
        "--config and --model, the run starts from the demo model's settings (64x64, 20 steps, one CPU process, "
        "outputs in ./outputs).",
    )
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="JSON run config, e.g. examples/config.json (flags and "
                        "--set override its values)")
    source.add_argument("--request", metavar="FILE",
                        help="a run request written by a front-end (the web UI: DIR/request.json); the run reports its "
                        "progress, then its result or error, as JSON files in DIR")
    _add_overrides(generate)
    generate.add_argument("--overwrite", action="store_true",
                          help="replace an existing output file (or start over despite an unfinished run's checkpoint)")
    generate.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue an interrupted run from its checkpoint (<base_path>/<file_name>.ckpt, written every "
        "pipe_configs.checkpoint_every steps); the config must be the one it was made with, the devices may differ",
    )
    generate.add_argument("--progress-dir", metavar="DIR",
                          help="keep each rank's progress in DIR/rank<r>.json (phase, step, timing), then the run's "
                          "result (DIR/result.json) or error (DIR/error.json), for front-ends")
    # Test only (hidden): explicit on the command line, so it never reaches a user's run from an
    # exported variable; a --request carries it as a field instead.
    generate.add_argument("--test-step-sleep", type=float, default=0.0, metavar="S", help=argparse.SUPPRESS)
    generate.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_run_flags(generate)
    serve = commands.add_parser(
        "serve",
        help="start the web UI (needs: pip install 'video-infinity[ui]')",
        description="A web UI (Gradio) on the same launcher: a prompt timeline, live progress, cancel and resume, "
        "the result and past runs. Listens on 127.0.0.1 unless --host says otherwise.",
    )
    serve.add_argument("--config", metavar="FILE", help="a run config whose values fill the form (and give base_path)")
    serve.add_argument("--base-path", metavar="DIR", help="where runs are written and read back (default: the "
                       "config's base_path, else ./outputs); the only folder the UI lists or serves")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    limits = Limits()
    serve.add_argument("--max-frames", type=int, default=limits.max_frames, metavar="N",
                       help=f"the most frames a form may ask for (default {limits.max_frames})")
    serve.add_argument("--max-side", type=int, default=limits.max_side, metavar="PX",
                       help=f"the largest height or width a form may ask for (default {limits.max_side})")
    serve.add_argument("--max-steps", type=int, default=limits.max_steps, metavar="N",
                       help=f"the most denoising steps a form may ask for (default {limits.max_steps})")
    serve.add_argument("--max-cpu-processes", type=int, default=limits.max_cpu_processes, metavar="N",
                       help=f"the most CPU processes a form may ask for (default {limits.max_cpu_processes}: this "
                       "machine's cores, at least 2)")
    serve.add_argument("--test-step-sleep", type=float, default=0.0, metavar="S", help=argparse.SUPPRESS)
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    plan = commands.add_parser(
        "plan",
        help="what a run needs per GPU (memory per stage, FLOPs), from the model's config files alone",
        description="Plan a run before loading anything: per rank, the peak memory of prompt encoding, one "
        "denoising step and the VAE decode, and the FLOPs, computed by running this package's own code on meta "
        "tensors built from the model folder's config files (no weights read; a folder of configs only works), "
        "then a verdict: fits, needs N ranks, or needs offload. Wan folders.",
    )
    plan.add_argument("--config", metavar="FILE", help="JSON run config (flags and --set override its values)")
    _add_overrides(plan)
    plan.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU, e.g. 24GiB (default: the run's "
                      "GPUs' when visible, else no verdict)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_run_flags(plan)
    inspect = commands.add_parser(
        "inspect",
        help="probe a demo video: object colour, motion, jumps at clip borders",
        description="Track the coloured object of a demo video (wrap-around aware) and report its colour, "
        "direction of motion, the median step inside clips and the position jump at each clip border.",
    )
    inspect.add_argument("video", metavar="VIDEO", help="the MP4 to probe")
    borders = inspect.add_mutually_exclusive_group()
    borders.add_argument("--clip-frames", type=int, metavar="N", help="clip borders every N frames")
    borders.add_argument("--ranks", type=int, metavar="N", help="clip borders as the frames split over N ranks")
    inspect.add_argument("--temporal-compression", type=int, metavar="N",
                         help="with --ranks: video frames per latent frame, as the model split them (Wan: 4, "
                         "clips start at latent frames); default: from the video's sidecar (VIDEO's .json), else 1")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--contact-sheet", metavar="PNG", help="also write a grid of 32 evenly spaced frames here")
    inspect.add_argument("--overwrite", action="store_true", help="replace an existing contact sheet")
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value by dotted path, e.g. pipe_configs.steps=10 or plugin_configs.attn.padding=4 "
        "(VALUE is parsed as JSON when it parses, else taken as a string); repeatable",
    )


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of the request and of the run, its help the field's docstring."""
    groups = {"request": parser.add_argument_group("what to generate (the request; the original's key in brackets)"),
              "run": parser.add_argument_group("the run")}
    for flag in run_flags():
        group = groups["request" if flag.name in REQUEST_KEYS else "run"]
        default = "" if flag.default is None else f" (default: {flag.default})"
        key = f" [{flag.path}]"
        help_text = (flag.help + default + key).replace("%", "%%")
        if flag.is_bool:
            group.add_argument(flag.option, *flag.aliases, dest=_dest(flag), default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag.option, *flag.aliases, dest=_dest(flag), default=None,
                               metavar=flag.name.upper(), help=help_text)


def _demo_run(model: str | None) -> dict | None:
    """The run defaults of the embedded model ``--model`` names (none: the default one); None for a
    folder or hub id."""
    from .demo import embedded_run  # no torch: the demo package imports it only to build a model

    return embedded_run(model)


def _dest(flag: RunFlag) -> str:
    return f"flag_{flag.name}"


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo.probe import inspect_video  # numpy and PyAV only

    if args.contact_sheet is not None and Path(args.contact_sheet).exists() and not args.overwrite:
        return _error(f"--contact-sheet: {args.contact_sheet} exists (pass --overwrite to replace it)")
    if args.contact_sheet is not None and Path(args.contact_sheet).resolve() == Path(args.video).resolve():
        return _error(f"--contact-sheet: {args.contact_sheet} is the video being inspected")
    try:
        print(inspect_video(args.video, clip_frames=args.clip_frames, ranks=args.ranks, as_json=args.json,
                            contact_sheet_path=args.contact_sheet, temporal_compression=args.temporal_compression))
    except (OSError, ValueError) as exc:
        return _error(f"{args.video}: {exc}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .ui import require_gradio, serve

    for name in ("max_frames", "max_side", "max_steps", "max_cpu_processes", "port"):
        if getattr(args, name) < 1:
            return _error(f"--{name.replace('_', '-')}: must be a positive number, got {getattr(args, name)}")
    try:
        template = load_run_config(args.config) if args.config is not None else None
        require_gradio()
    except UserError as exc:
        return _error(str(exc))
    base_path = args.base_path or (template.base_path if template is not None else "./outputs")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(max_frames=args.max_frames, max_side=args.max_side, max_steps=args.max_steps,
                    max_cpu_processes=args.max_cpu_processes)
    try:
        serve(base_path=base_path, host=args.host, port=args.port, limits=limits, template=template,
              step_sleep_s=args.test_step_sleep)
    except OSError as exc:  # e.g. the port is taken
        return _error(f"--port: cannot serve on {args.host}:{args.port} ({exc})")
    except KeyboardInterrupt:
        pass
    return 0


def _memory_size(text: str) -> int:
    """``24GiB``, ``24GB``, ``80G``, ``512MiB`` or bytes -> bytes (GB and G read as GiB, as cards are sold)."""
    units = {"tib": 2**40, "tb": 2**40, "t": 2**40, "gib": 2**30, "gb": 2**30, "g": 2**30, "mib": 2**20,
             "mb": 2**20, "m": 2**20, "": 1}
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        return int(float(number) * units[value[len(number):]])
    except (KeyError, ValueError):
        raise ConfigError(f"--gpu-memory: {text!r} is not a size (e.g. 24GiB or 80GB)") from None


def _plan(args: argparse.Namespace) -> int:
    try:
        flags = {flag.name: getattr(args, _dest(flag)) for flag in run_flags()}
        config = load_run_config(args.config, args.overrides, flags)
        gpu_memory = _memory_size(args.gpu_memory) if args.gpu_memory else None
    except UserError as exc:
        return _error(str(exc))
    from .plan import gpu_memory_of, plan_run  # torch from here on

    try:
        plan = plan_run(config, gpu_memory if gpu_memory is not None else gpu_memory_of(config))
    except ValueError as exc:
        return _error(str(exc))
    if args.json:
        import json

        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(plan.describe())
    return 0 if plan.fits is not False else 1


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _status_folder(args: argparse.Namespace) -> StatusFolder | None:
    """Where the run reports to a front-end: the folder of ``--request``, else ``--progress-dir``."""
    if args.request is not None:
        return StatusFolder(Path(args.request).resolve().parent)
    return StatusFolder(Path(args.progress_dir).resolve()) if args.progress_dir is not None else None


def _request(args: argparse.Namespace, folder: StatusFolder | None) -> RunRequest:
    """The run asked for: a front-end's request file, or the config file and flags with the command's options."""
    flags = {flag.name: getattr(args, _dest(flag)) for flag in run_flags()}
    if args.request is None:
        if args.config is None and flags["prompt"] is None and not any(o.startswith("pipe_configs") for o in args.overrides):
            raise ConfigError("--prompt: give a prompt (e.g. --prompt 'a red circle moving right') or a --config file")
        # Without a config file, an embedded model (none named: "demo") starts from its own run defaults.
        demo = args.config is None and not any(flags[name] for name in ("base_model", "motion_adapter"))
        defaults = _demo_run(flags["model"]) if demo else None  # type: ignore[arg-type]
        config = load_run_config(args.config, args.overrides, flags, defaults=defaults)
        return RunRequest(config=config, config_path=args.config, resume=args.resume, overwrite=args.overwrite,
                          step_sleep_s=args.test_step_sleep)
    if args.overrides or args.resume or args.overwrite or args.test_step_sleep or args.progress_dir or \
            any(value is not None for value in flags.values()):
        raise ConfigError("--request: the request holds the whole run and reports to its own folder (give flags, "
                          "--set, --resume, --overwrite, --progress-dir and --test-step-sleep without --request)")
    assert folder is not None
    try:
        return folder.read_request()
    except ContractError as exc:
        raise ConfigError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for usage and config errors)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and usage errors; return its status instead
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "plan":
        return _plan(args)
    folder = _status_folder(args)
    try:
        request = _request(args, folder)
        check_devices_available(request.config)
    except UserError as exc:
        if folder is not None:
            folder.write_error(ErrorReport.from_exception(exc))
        return _error(str(exc))

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .run import run_request  # lazily: the ranks pull in torch, diffusers and the models

    try:  # a status folder gets the result or the error from run_request itself
        run_request(request, folder)
    except UserError as exc:  # found in the pre-flight checks: outputs, disk, model, checkpoint
        return _error(str(exc))
    except VideoInfinityError as exc:  # a rank failed (the launcher stopped the others), or Ctrl-C
        # On a line of its own: a rank's progress bar may have been cut off mid-line.
        start = "\r\x1b[K" if sys.stderr.isatty() else "\n"
        what = "" if isinstance(exc, RunInterrupted) else "error: "
        print(f"{start}{PROG}: {what}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before the ranks started
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
