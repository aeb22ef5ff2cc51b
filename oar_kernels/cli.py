"""The `oar-kernels` command."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oar-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, extension status and each op's backend")
    demo = commands.add_parser("reshape-demo", help="reshape a synthetic GRPO batch and show it")
    demo.add_argument("--batch", type=_positive_int, default=4, help="rollouts to show")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "info":
        from oar_kernels._info import info

        info()
    elif args.command == "reshape-demo":
        from oar_kernels import demo

        demo.run(batch=args.batch, seed=args.seed)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
