"""``python -m fastemb``: the command line."""

import argparse
import sys

import numpy as np

from . import bench, get_num_threads, set_num_threads, show_config
from . import train as training

DEFAULT_BENCH_REPEAT = 10
DEFAULT_LR = {"lazyadam": 0.01, "sgd": 3.0, "adagrad": 0.1, "rowwise-adagrad": 0.1}


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def run_train(args):
    """Train the rating model and print, per epoch, its RMSE next to the mean predictor's."""
    from tqdm import tqdm

    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.compare_torch and (args.model != "dot" or args.optimizer == "rowwise-adagrad"):
        raise ValueError("--compare-torch needs --model dot and an optimizer torch has "
                         "(lazyadam, sgd or adagrad)")
    if args.compare_torch and args.resume:
        raise ValueError("--compare-torch compares whole runs; it cannot be combined with --resume")
    set_num_threads(args.threads)
    if args.data:
        data = training.read_ratings(args.data)
        source = args.data
    else:
        data = training.synthetic_ratings(args.users, args.items, args.ratings, seed=args.seed)
        source = "synthetic (built in)"
    train, test = data.split(args.holdout, args.seed)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"{len(data)} ratings are too few to split into a training and a "
                         f"held-out set with --holdout {args.holdout}")
    global_mean = float(train.ratings.mean())
    print(f"data: {source}: {len(data):,} ratings, {data.num_users:,} users, "
          f"{data.num_items:,} items; {len(train):,} to train, {len(test):,} held out")
    bags = training.UserBags(train, args.seed) if args.model == "bag" else None
    model = training.RatingModel(data.num_users, data.num_items, args.dim, args.seed,
                                 global_mean, kind=args.model, bags=bags)
    optimizer = training.make_optimizer(args.optimizer, model.modules, args.lr)
    initial_weights = [module.weight.copy() for module in model.modules]
    first_epoch = 0
    if args.resume:
        first_epoch = training.resume_checkpoint(args.resume, model, optimizer, args)
        print(f"resumed from {args.resume} after epoch {first_epoch}")
        if first_epoch >= args.epochs:
            print(f"nothing to train: the checkpoint has done {first_epoch} epoch(s) and "
                  f"--epochs is {args.epochs}")
    mean_rmse = float(np.sqrt(np.mean((test.ratings.astype(np.float64) - global_mean) ** 2)))
    print(f"model: {args.model}, dim {args.dim}, {args.optimizer} lr {args.lr}, batch "
          f"{args.batch_size}, {get_num_threads()} thread(s); held-out RMSE of predicting the mean: "
          f"{mean_rmse:.4f}")
    epoch_seconds = []
    for epoch in range(first_epoch, args.epochs):
        with tqdm(total=len(train), unit=" ratings", unit_scale=True, leave=False,
                  desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.quiet) as progress:
            train_rmse, seconds = training.train_epoch(model, optimizer, train, args.batch_size,
                                                       args.seed, epoch, progress)
        epoch_seconds.append(seconds)
        print(f"epoch {epoch + 1}/{args.epochs}: train RMSE {train_rmse:.4f}, held-out RMSE "
              f"{training.rmse(model, test):.4f} (mean predictor {mean_rmse:.4f}), "
              f"{len(train) / seconds:,.0f} ratings/s, {seconds:.1f} s")
        if args.save:
            training.save_checkpoint(args.save, model, optimizer, args, epoch + 1)
    if args.save:
        print(f"saved tables and optimizer state to {args.save}")
    if args.compare_torch:
        compare_with_torch(args, initial_weights, model, train, test, global_mean, epoch_seconds)
    return 0


def compare_with_torch(args, initial_weights, model, train, test, global_mean, epoch_seconds):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("--compare-torch needs torch: pip install torch==2.13.0") from None
    print("training the same model with torch (same initial weights and batches) ...")
    torch_seconds, torch_rmse, torch_tables = training.train_with_torch(
        initial_weights, train, test, args, global_mean)
    for epoch, (ours, theirs) in enumerate(zip(epoch_seconds, torch_seconds), start=1):
        print(f"epoch {epoch}: fastemb {ours:.2f} s, torch {theirs:.2f} s, "
              f"fastemb is {theirs / ours:.1f}x faster")
    difference = max(float(np.max(np.abs(ours.weight - theirs), initial=0.0))
                     for ours, theirs in zip(model.modules, torch_tables))
    print(f"final held-out RMSE: fastemb {training.rmse(model, test):.4f}, torch "
          f"{torch_rmse:.4f}; largest weight difference {difference:.2e}")


def add_train_command(commands):
    train = commands.add_parser(
        "train",
        help="train a recommender (users x items embeddings) end to end and report its RMSE",
        description="Train mean + dot(user, item) + biases on ratings with a lazy optimizer. "
                    "Default data: a built-in synthetic set (100,000 users, 50,000 items, "
                    "5,000,000 ratings, Zipf-skewed item popularity).",
    )
    train.add_argument("--data", metavar="PATH",
                       help="ratings file: MovieLens u.data (tab-separated) or a CSV with a "
                            "user,item,rating header (default: the synthetic set)")
    train.add_argument("--model", choices=["dot", "bag"], default="dot",
                       help="dot: a user is a row of a table; bag: a user is the rating-weighted "
                            "mean of the items they rated (EmbeddingBag) (default dot)")
    train.add_argument("--epochs", type=positive_int, default=3, help="passes over the data (default 3)")
    train.add_argument("--dim", type=positive_int, default=32, help="embedding size (default 32)")
    train.add_argument("--batch-size", type=positive_int, default=4096,
                       help="ratings per step (default 4096)")
    train.add_argument("--optimizer", choices=list(training.OPTIMIZERS), default="lazyadam",
                       help="lazy optimizer (default lazyadam)")
    train.add_argument("--lr", type=positive_float, default=None,
                       help="learning rate (default: " + ", ".join(
                           f"{name} {lr}" for name, lr in DEFAULT_LR.items()) + ")")
    train.add_argument("--threads", type=positive_int, default=None,
                       help="OpenMP threads (default: all cores, or OMP_NUM_THREADS)")
    train.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed for data, init and shuffling (default 0)")
    train.add_argument("--holdout", type=fraction, default=0.1,
                       help="fraction of ratings held out to measure RMSE (default 0.1)")
    train.add_argument("--users", type=positive_int, default=100_000, help="synthetic users (default 100000)")
    train.add_argument("--items", type=positive_int, default=50_000, help="synthetic items (default 50000)")
    train.add_argument("--ratings", type=positive_int, default=5_000_000,
                       help="synthetic ratings (default 5000000)")
    train.add_argument("--save", metavar="PATH", help="write tables + optimizer state here after each epoch")
    train.add_argument("--resume", metavar="PATH", help="continue from a checkpoint written by --save")
    train.add_argument("--compare-torch", action="store_true",
                       help="also train the same model with torch from the same initial weights "
                            "and batches, and print both times and RMSEs (needs torch)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=run_train)


def run_bench(args):
    """Benchmark fastemb against torch, NumPy and the speed of light (``fastemb.bench``)."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install matplotlib "
                             "(or pip install 'fastemb[plot]')") from None
        if not bench.torch_is_available():
            raise SystemExit("--plot draws the speedups over torch: pip install torch==2.13.0")
    bench.report(bench.select_workloads(args.sizes), args.ops, sorted(set(args.threads)),
                 args.repeat, json_path=args.json, plot_path=args.plot)
    return 0


def add_bench_command(commands):
    """The ``bench`` subcommand: its options; the work is ``fastemb.bench.report``."""
    sizes = bench.workload_names()
    threads = bench.default_thread_counts()
    command = commands.add_parser(
        "bench",
        help="time fastemb against torch, NumPy and the speed of light, and print the speedups",
        description="Check, then time every operation of fastemb.bench on each workload and "
                    "thread count: the median of --repeat calls after a warm-up, for fastemb, "
                    "torch (if installed), NumPy and a speed-of-light reference (plain C loops "
                    "that only move the table bytes the operation needs; needs gcc), taking "
                    "turns call by call. All of it takes about 8 minutes on 2 cores.",
    )
    command.add_argument("--sizes", nargs="+", choices=sizes, default=list(sizes), metavar="SIZE",
                         help=f"workloads: {', '.join(sizes)} (default: all)")
    command.add_argument("--ops", nargs="+", choices=bench.OPERATIONS,
                         default=list(bench.OPERATIONS), metavar="OP",
                         help=f"operations: {', '.join(bench.OPERATIONS)} (default: all)")
    command.add_argument("--threads", nargs="+", type=positive_int, default=threads, metavar="N",
                         help=f"thread counts (default: {' '.join(map(str, threads))})")
    command.add_argument("--repeat", type=positive_int, default=DEFAULT_BENCH_REPEAT,
                         help=f"timed calls per implementation, after 0.1 s of warm-up "
                              f"calls; the median is reported (default {DEFAULT_BENCH_REPEAT})")
    command.add_argument("--json", metavar="PATH",
                         help="also write the times, ratios and machine description as JSON")
    command.add_argument("--plot", metavar="PATH.png",
                         help="also draw the speedups over torch as a bar chart (needs matplotlib)")
    command.set_defaults(handler=run_bench)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastemb",
        description="fastemb: fast CPU embedding tables for NumPy.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_command(commands)
    add_bench_command(commands)
    config = commands.add_parser("config", help="print the version, OpenMP, threads and flags")
    config.set_defaults(handler=lambda args: show_config() or 0)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (OSError, ValueError) as error:  # bad files or options: a message, not a traceback
        raise SystemExit(f"python -m fastemb {args.command}: error: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
