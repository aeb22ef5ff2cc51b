"""The `oar-kernels` command."""
import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oar-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, extension status and each op's backend")
    args = parser.parse_args(argv)

    if args.command == "info":
        from oar_kernels._info import info

        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
