"""The `oar-kernels` command."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oar-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, extension status and each op's backend")
    reshape_demo = commands.add_parser(
        "reshape-demo", help="reshape a synthetic GRPO batch and show it"
    )
    reshape_demo.add_argument("--batch", type=_positive_int, default=4, help="rollouts to show")
    reshape_demo.add_argument("--seed", type=int, default=0)
    _add_train_parser(commands)
    _add_demo_parser(commands)
    _add_study_parser(commands)
    viz = commands.add_parser("viz", help="curves and token-weight heatmaps of finished runs")
    viz.add_argument("runs", nargs="+", help="run directories (as written by train or demo)")
    viz.add_argument("--out", help="where to write the pictures (default: the first run's)")
    args = parser.parse_args(argv)
    from oar_kernels.grpo.config import ConfigError

    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    # Bad config values; an out_dir in use, unwritable or not a run; a missing or unreadable
    # checkpoint.
    except ConfigError as error:
        print(f"oar-kernels {args.command}: error: {error}", file=sys.stderr)
        return 2


def _add_train_parser(commands) -> None:
    from oar_kernels.grpo.config import TrainConfig, field_types

    train = commands.add_parser(
        "train",
        help="a reference GRPO run on the embedded task",
        description=TrainConfig.__doc__,
        argument_default=argparse.SUPPRESS,  # only flags given on the line override the file
    )
    train.add_argument(
        "--config", default=None, help="a YAML file of TrainConfig keys; flags override it"
    )
    train.add_argument(
        "--resume", action="store_true", default=False, help="continue from out_dir's checkpoint"
    )
    train.add_argument(
        "--overwrite", action="store_true", default=False, help="replace a run in out_dir"
    )
    defaults = TrainConfig()
    for name, kind in field_types().items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if kind is bool:
            train.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, help=f"(default {default})"
            )
        else:
            train.add_argument(flag, dest=name, type=kind, help=f"(default {default})")


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="GRPO vs OAR-G on the embedded task, 3 seeds")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--seeds", type=_positive_int, default=3)
    demo.add_argument("--steps", type=_positive_int, default=30)
    demo.add_argument(
        "--methods",
        type=_methods,
        default=("grpo", "oar-g"),
        help="comma-separated, from grpo,oar-g,oar-p (default grpo,oar-g)",
    )
    demo.add_argument("--no-progress", dest="progress", action="store_false")


def _add_study_parser(commands) -> None:
    from oar_kernels.grpo.study import ARMS, PRESETS

    study = commands.add_parser(
        "study",
        help="the credit-assignment study of docs/study/DESIGN.md (filler task, controls)",
    )
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
    study.add_argument("--no-progress", dest="progress", action="store_false")
    study.add_argument(
        "--tabulate-only",
        action="store_true",
        help="train nothing: tabulate and draw the runs already finished in --out",
    )


def _dispatch(args) -> int:

    if args.command == "info":
        from oar_kernels._info import info

        info()
    elif args.command == "reshape-demo":
        from oar_kernels import reshape_demo

        reshape_demo.run(batch=args.batch, seed=args.seed)
    elif args.command == "train":
        from oar_kernels.grpo.config import TrainConfig
        from oar_kernels.grpo.loop import train

        special = ("command", "config", "resume", "overwrite")
        flags = {k: v for k, v in vars(args).items() if k not in special}
        if args.config:
            config = TrainConfig.from_yaml(args.config, **flags)
        else:
            config = TrainConfig.from_dict(flags)
        result = train(config, resume=args.resume, overwrite=args.overwrite)
        print(
            f"held-out pass@1 {result.start_accuracy:.3f} -> {result.final_accuracy:.3f} "
            f"after {result.steps} steps; metrics in {result.out_dir}"
        )
    elif args.command == "demo":
        from oar_kernels.grpo import demo

        demo.run(
            args.out,
            methods=args.methods,
            seeds=args.seeds,
            steps=args.steps,
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


def _methods(text: str) -> tuple[str, ...]:
    from oar_kernels.grpo.config import METHODS

    return _names(METHODS)(text)


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated counts >= 0, got {text!r}")
    return counts


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
