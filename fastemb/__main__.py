"""``python -m fastemb``: the command line."""

import argparse
import sys

import numpy as np

from . import EmbeddingBag, show_config


def run_demo(args):
    """Train-free tour: look up bags of rows and print what came out."""
    bags = EmbeddingBag(args.rows, args.dim, mode="mean", seed=0)
    indices = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    offsets = np.array([0, 3, 3, 5])
    print(f"table: {bags}")
    print(f"indices {indices.tolist()} split at offsets {offsets.tolist()}")
    print("mean of each bag (the second bag is empty, so it is zeros):")
    print(bags(indices, offsets))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastemb",
        description="fastemb: fast CPU embedding tables for NumPy.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="look up a few bags in a small table and print them")
    demo.add_argument("--rows", type=int, default=10, help="rows in the table (default 10)")
    demo.add_argument("--dim", type=int, default=4, help="columns in the table (default 4)")
    demo.set_defaults(handler=run_demo)
    config = commands.add_parser("config", help="print the version, OpenMP, threads and flags")
    config.set_defaults(handler=lambda args: show_config() or 0)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
