"""The `oar-kernels` command."""

import argparse
import sys
from pathlib import Path

# Each command: its one-line help and the function that adds its arguments. Only the
# command being run gets its arguments (the train flags import TrainConfig, and with it
# torch), so `oar-kernels --help` is quick.
COMMANDS = {
    "info": "versions, extension status and each op's backend",
    "reshape-demo": "reshape a synthetic GRPO batch and show it",
    "train": "a reference GRPO run on the embedded task",
    "demo": "GRPO vs OAR-G vs its shuffled control on the filler task, 3 seeds",
    "study": "the credit-assignment study of docs/study/DESIGN.md (filler task, controls)",
    "viz": "curves and token-weight heatmaps of finished runs",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="oar-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # The top-level parser has no option that takes a value: the first word is the command.
    chosen = next((word for word in argv if not word.startswith("-")), None)
    parsers = {}
    for name, help in COMMANDS.items():
        if name == chosen:
            parsers[name] = _ADD_ARGUMENTS[name](commands, name, help)
        else:
            commands.add_parser(name, help=help)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's usage, not the top-level one
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from oar_kernels.grpo.config import ConfigError
    from oar_kernels.grpo.viz import NotARunError

    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"interrupted{_continue_hint(args)}", file=sys.stderr)
        return 130
    # Bad config values; an out_dir in use, unwritable or not a run; a missing or unreadable
    # checkpoint.
    except (ConfigError, NotARunError) as error:
        print(f"oar-kernels {args.command}: error: {error}", file=sys.stderr)
        return 2


def _continue_hint(args) -> str:
    """How to go on after Ctrl-C, as far as the command allows."""
    if args.command == "train":
        from oar_kernels.grpo.loop import CHECKPOINT

        out_dir = getattr(args, "out_dir", "runs/train")
        if not (Path(out_dir) / CHECKPOINT).exists():
            return " before a step finished: nothing to resume"
        return f": continue with `oar-kernels train --resume --out-dir {out_dir}`"
    if args.command == "demo":
        return (
            ": `oar-kernels demo` starts every run afresh; the interrupted run's last finished "
            "step is saved in its directory, which `oar-kernels train --resume --out-dir "
            "<that directory>` continues on its own"
        )
    return ""


def _add_info_parser(commands, name, help):
    return commands.add_parser(name, help=help)


def _add_reshape_demo_parser(commands, name, help):
    reshape_demo = commands.add_parser(name, help=help)
    reshape_demo.add_argument("--batch", type=_positive_int, default=4, help="rollouts to show")
    reshape_demo.add_argument("--seed", type=int, default=0, help="of the synthetic batch")
    return reshape_demo


def _add_train_parser(commands, name, help):
    from oar_kernels.grpo.config import TrainConfig, choices_of, field_types, flag_help

    train = commands.add_parser(
        name,
        help=help,
        description=TrainConfig.__doc__,
        argument_default=argparse.SUPPRESS,  # only flags given on the line override the file
    )
    train.add_argument(
        "--config",
        default=None,
        help="a YAML file of TrainConfig keys (field or flag names: out_dir or out-dir); "
        "flags override it",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --out-dir from its checkpoint, with the config it was "
        "started with (config.yaml there); flags and --config change only what a "
        "continuation may change (steps, bookkeeping), anything else is refused",
    )
    train.add_argument(
        "--overwrite", action="store_true", default=False, help="replace a run in --out-dir"
    )
    for field, kind in field_types().items():
        flag = "--" + field.replace("_", "-")
        if kind is bool:
            action = argparse.BooleanOptionalAction
            train.add_argument(flag, dest=field, action=action, help=flag_help(field))
        else:
            # The choices are shown, not enforced here: TrainConfig's error names the flag
            # and applies to --config files alike.
            choices = choices_of(field)
            metavar = "{" + ",".join(choices) + "}" if choices else None
            train.add_argument(flag, dest=field, type=kind, metavar=metavar, help=flag_help(field))
    return train


def _add_demo_parser(commands, name, help):
    from oar_kernels.grpo import demo as defaults
    from oar_kernels.grpo.study import ARMS

    demo = commands.add_parser(name, help=help)
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument(
        "--seeds",
        type=_positive_int,
        default=defaults.SEEDS,
        help="seeds 0 to N-1 of every arm; each seed fixes a run's prompts and samples "
        f"(default {defaults.SEEDS})",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=defaults.STEPS,
        help=f"optimizer steps of every run (default {defaults.STEPS})",
    )
    demo.add_argument(
        "--arms",
        "--methods",
        type=_names(tuple(ARMS)),
        default=defaults.ARMS,
        help=f"comma-separated, from {','.join(ARMS)} (default {','.join(defaults.ARMS)})",
    )
    demo.add_argument(
        "--fillers",
        type=_non_negative_int,
        default=defaults.FILLERS,
        help="filler letters before each step; 0 is the plain addition task "
        f"(default {defaults.FILLERS})",
    )
    demo.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="runs trained at once, each in its own process (default: one per core, at most "
        "the number of runs; 1 with CUDA)",
    )
    demo.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    return demo


def _add_viz_parser(commands, name, help):
    viz = commands.add_parser(name, help=help)
    viz.add_argument("runs", nargs="+", help="run directories (as written by train or demo)")
    viz.add_argument("--out", help="where to write the pictures (default: the first run's)")
    return viz


def _add_study_parser(commands, name, help):
    from oar_kernels.grpo.study import ARMS, PRESETS

    study = commands.add_parser(name, help=help)
    study.add_argument("--preset", choices=tuple(PRESETS), default="pilot")
    study.add_argument("--out", default=None, help="output directory (default runs/<preset>)")
    study.add_argument("--seeds", type=_positive_int, help="seeds (default: the preset's)")
    study.add_argument("--first-seed", type=int, default=0)
    study.add_argument("--steps", type=_positive_int, default=30)
    study.add_argument(
        "--arms", type=_names(tuple(ARMS)), help=f"comma-separated, from {','.join(ARMS)}"
    )
    study.add_argument(
        "--fillers", type=_counts, help="comma-separated filler counts F (default: the preset's)"
    )
    study.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="runs trained at once, each in its own process on an equal share of the cores "
        "(2 on 2 cores: one torch thread each, as docs/study/DESIGN.md runs them)",
    )
    study.add_argument("--no-progress", dest="progress", action="store_false")
    study.add_argument(
        "--tabulate-only",
        action="store_true",
        help="train nothing: tabulate and draw the runs already finished in --out",
    )
    return study


_ADD_ARGUMENTS = {
    "info": _add_info_parser,
    "reshape-demo": _add_reshape_demo_parser,
    "train": _add_train_parser,
    "demo": _add_demo_parser,
    "study": _add_study_parser,
    "viz": _add_viz_parser,
}


def _dispatch(args) -> int:

    if args.command == "info":
        from oar_kernels._info import info

        info()
    elif args.command == "reshape-demo":
        from oar_kernels import reshape_demo

        reshape_demo.run(batch=args.batch, seed=args.seed)
    elif args.command == "train":
        from oar_kernels.grpo.config import TrainConfig, read_yaml
        from oar_kernels.grpo.loop import train

        special = ("command", "config", "resume", "overwrite")
        flags = {k: v for k, v in vars(args).items() if k not in special}
        if args.config:
            flags = {**read_yaml(args.config), **flags}
        if args.resume:
            out_dir = flags.pop("out_dir", TrainConfig.out_dir)
            config = TrainConfig.of_run(out_dir, **flags)
        else:
            config = TrainConfig.from_dict(flags)
        args.out_dir = config.out_dir  # for the hint after Ctrl-C
        result = train(config, resume=args.resume, overwrite=args.overwrite)
        print(
            f"held-out pass@1 {result.start_accuracy:.3f} -> {result.final_accuracy:.3f} "
            f"after {result.steps} steps; metrics in {result.out_dir}"
        )
    elif args.command == "demo":
        from oar_kernels.grpo import demo

        demo.run(
            args.out,
            arms=args.arms,
            fillers=args.fillers,
            seeds=args.seeds,
            steps=args.steps,
            workers=args.workers,
            progress=args.progress,
        )
    elif args.command == "study":
        from oar_kernels.grpo import study

        preset = study.PRESETS[args.preset]
        study.run(
            args.out or f"runs/{args.preset}",
            arms=args.arms or preset["arms"],
            fillers=args.fillers or preset["fillers"],
            seeds=args.seeds or preset["seeds"],
            first_seed=args.first_seed,
            steps=args.steps,
            progress=args.progress,
            train_missing=not args.tabulate_only,
            workers=args.workers,
        )
    elif args.command == "viz":
        from oar_kernels.grpo import viz

        written = viz.render(args.runs, args.out or args.runs[0])
        print("wrote " + (", ".join(map(str, written)) or "nothing"))
    return 0


def _names(allowed: tuple[str, ...]):
    """A parser of comma-separated names from `allowed`."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(m.strip() for m in text.split(",") if m.strip())
        if not names or any(m not in allowed for m in names):
            raise argparse.ArgumentTypeError(f"must come from {', '.join(allowed)}")
        return names

    return parse


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated counts >= 0, got {text!r}")
    return counts


def _positive_int(text: str) -> int:
    return _int_from(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_from(text, 0)


def _int_from(text: str, low: int) -> int:
    value = int(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
