"""``python -m fastemb``: the command line."""

import argparse
import math
import os
import sys

import numpy as np

from . import __version__, bench, get_num_threads, optim, set_num_threads, show_config
from . import train as training
from ._dtypes import TRAINABLE_TABLES
from .data import DATASETS, load_ratings, synthetic_ratings

DEFAULT_LR = {name: info.train_lr for name, info in optim.OPTIMIZERS.items()}
# the train command's --dtype: the tables this installation can train, with their module
# options (dtype, split)
TABLE_CHOICES = TRAINABLE_TABLES
DTYPE_HELP = ("the tables' dtype (default float32). 16-bit tables take half the memory and are "
              "updated in float32, then rounded; split tables are float32 tables whose forward "
              "reads only their bfloat16 top halves. bfloat16 and split need ml_dtypes.")
DEFAULT_WEIGHT_DECAY = 4e-4


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


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
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
    """Train the rating model; print, per epoch, its RMSE next to the mean predictor's, then
    the best epoch (kept in --save)."""
    from tqdm import tqdm

    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.compare_torch and (args.model != "dot"
                               or optim.OPTIMIZERS[args.optimizer].torch_name is None):
        twins = ", ".join(name for name, info in optim.OPTIMIZERS.items() if info.torch_name)
        raise ValueError(f"--compare-torch needs --model dot and an optimizer torch has "
                         f"({twins})")
    if args.compare_torch and args.resume:
        raise ValueError("--compare-torch compares whole runs; it cannot be combined with --resume")
    if args.shards and (args.compare_torch or args.dtype != "float32"):
        raise ValueError("--shards trains float32 tables, without --compare-torch")
    if args.stochastic_rounding and TABLE_CHOICES[args.dtype][0].itemsize != 2:
        raise ValueError("--stochastic-rounding rounds the updates of 16-bit tables; use it "
                         "with --dtype bfloat16 or float16")
    if args.save:
        training.check_writable(args.save)
    cores = os.cpu_count() or 1
    if args.threads is not None and args.threads > cores:
        print(f"warning: --threads {args.threads} is more than this machine's {cores} cores; "
              f"the extra threads only wait for a core", file=sys.stderr)
    set_num_threads(args.threads)
    if args.data:
        data = load_ratings(args.data, args.columns)
        source = args.data
        check_model_fits(args, data.num_users, data.num_items)
    else:
        check_model_fits(args, args.users, args.items,
                         extra=training.synthetic_bytes(args.users, args.items, args.ratings))
        data = synthetic_ratings(args.users, args.items, args.ratings, seed=args.seed)
        source = "synthetic (built in)"
    train, test = data.split(args.holdout, args.seed)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"{len(data)} ratings are too few to split into a training and a "
                         f"held-out set with --holdout {args.holdout}")
    global_mean = float(train.ratings.mean())
    if args.y_range is None:
        args.y_range = training.default_y_range(data.ratings)
    print(f"data: {source}: {len(data):,} ratings, {data.num_users:,} users, "
          f"{data.num_items:,} items; {len(train):,} to train, {len(test):,} held out")
    bags = training.UserBags(train, args.seed) if args.model == "bag" else None
    model = training.RatingModel(data.num_users, data.num_items, args.dim, args.seed,
                                 global_mean, kind=args.model, bags=bags, y_range=args.y_range,
                                 dtype=TABLE_CHOICES[args.dtype][0],
                                 split=TABLE_CHOICES[args.dtype][1])
    initial_weights = [module.weight.astype(np.float32) for module in model.modules]
    if args.shards:
        model.shard(args.shards, engine_factory(args), args.optimizer, lr=args.lr,
                    weight_decay=args.weight_decay, seed=args.seed)
        optimizer = None
    else:
        optimizer = training.make_optimizer(args.optimizer, model.modules, args.lr,
                                            args.weight_decay, args.stochastic_rounding,
                                            args.seed)
    mean_rmse = float(np.sqrt(np.mean((test.ratings.astype(np.float64) - global_mean) ** 2)))
    print(f"model: {args.model}, dim {args.dim}, {args.dtype} tables"
          + (" (stochastic rounding)" if args.stochastic_rounding else "")
          + f", output range {args.y_range[0]:g}..",
          f"{args.y_range[1]:g}, {args.optimizer} lr {args.lr} weight decay {args.weight_decay}, "
          f"batch {args.batch_size}, {get_num_threads()} thread(s)"
          + (f", every table on {args.shards} {args.engine} shards" if args.shards else "")
          + f"; held-out RMSE of predicting the mean: {mean_rmse:.4f}", sep="")
    first_epoch, best = 0, (math.inf, 0)
    if args.resume:
        first_epoch = training.resume_checkpoint(args.resume, model, optimizer, args)
        best = (training.rmse(model, test), first_epoch)
        print(f"resumed from {args.resume} after epoch {first_epoch} (held-out RMSE "
              f"{best[0]:.4f})")
        if args.save:
            training.save_checkpoint(args.save, model, optimizer, args, first_epoch)
        if first_epoch >= args.epochs:
            print(f"nothing to train: the checkpoint has done {first_epoch} epoch(s) and "
                  f"--epochs is {args.epochs}")
    epoch_seconds = []
    for epoch in range(first_epoch, args.epochs):
        with tqdm(total=len(train), unit=" ratings", unit_scale=True, leave=False,
                  desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.quiet) as progress:
            train_rmse, seconds = training.train_epoch(model, optimizer, train, args.batch_size,
                                                       args.seed, epoch, progress)
        epoch_seconds.append(seconds)
        held_out = training.rmse(model, test)
        improved = held_out < best[0]
        if improved:
            best = (held_out, epoch + 1)
            if args.save:
                training.save_checkpoint(args.save, model, optimizer, args, epoch + 1)
        print(f"epoch {epoch + 1}/{args.epochs}: train RMSE {train_rmse:.4f}, held-out RMSE "
              f"{held_out:.4f} (mean predictor {mean_rmse:.4f}), "
              f"{len(train) / seconds:,.0f} ratings/s, {seconds:.2f} s"
              + (" *" if improved else ""))
    if epoch_seconds:
        print(f"best: epoch {best[1]}, held-out RMSE {best[0]:.4f} (mean predictor "
              f"{mean_rmse:.4f}); {len(epoch_seconds)} epoch(s) of training took "
              f"{sum(epoch_seconds):.2f} s")
    if args.save:
        print(f"saved the tables and optimizer state of epoch {best[1]} (the best) to {args.save}")
    if args.compare_torch:
        compare_with_torch(args, initial_weights, model, train, test, global_mean, epoch_seconds)
    return 0


def engine_factory(args):
    """What makes each sharded table's engine for ``--engine``: in this process, or Ray actors
    (Ray started here, as ``ray.init()`` starts it, unless it already runs), each reserving an
    equal part of the Ray cluster's CPUs."""
    from .distributed import LocalEngine, RayEngine
    from .distributed.engine import import_ray

    if args.engine == "local":
        return LocalEngine
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # (asked for by --engine ray)
    # (the model has 4 tables: their shards share the cluster's CPUs)
    cpus_per_shard = ray.cluster_resources().get("CPU", 1) / (4 * args.shards)
    return lambda: RayEngine(num_cpus_per_shard=cpus_per_shard)


def check_model_fits(args, num_users, num_items, extra=0):
    """Refuse, before allocating, a model (and synthetic data) that memory cannot hold."""
    training.check_fits_in_memory(
        training.bytes_needed(num_users, num_items, args.dim, args.optimizer, args.model,
                              TABLE_CHOICES[args.dtype][0]) + extra,
        f"tables of {args.dim} columns for {num_users:,} users and {num_items:,} items, with "
        f"{args.optimizer}'s state" + (" and the synthetic ratings," if extra else ","))


def compare_with_torch(args, initial_weights, model, train, test, global_mean, epoch_seconds):
    from tqdm import tqdm

    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("--compare-torch needs torch: pip install torch==2.13.0") from None
    print("training the same model with torch (same initial weights and batches) ...")
    with tqdm(total=len(train) * args.epochs, unit=" ratings", unit_scale=True, leave=False,
              desc="torch", disable=args.quiet) as progress:
        torch_seconds, torch_rmse, torch_tables = training.train_with_torch(
            initial_weights, train, test, args, global_mean, progress)
    for epoch, (ours, theirs) in enumerate(zip(epoch_seconds, torch_seconds), start=1):
        verdict = (f"fastemb is {theirs / ours:.1f}x faster" if theirs >= ours
                   else f"fastemb is {ours / theirs:.1f}x slower")
        print(f"epoch {epoch}: fastemb {ours:.2f} s, torch {theirs:.2f} s, {verdict}")
    difference = max(float(np.max(np.abs(ours.weight.astype(np.float32) - theirs),
                                  initial=0.0))
                     for ours, theirs in zip(model.modules, torch_tables))
    print(f"final held-out RMSE: fastemb {training.rmse(model, test):.4f}, torch "
          f"{torch_rmse:.4f}; largest weight difference {difference:.2e}")


def add_train_command(commands):
    train = commands.add_parser(
        "train",
        help="train a recommender (users x items embeddings) end to end and report its RMSE",
        description="Train the fastai book's DotProductBias model (mean + dot(user, item) + "
                    "biases, squashed into the rating range) on ratings with a lazy optimizer "
                    "and L2 weight decay, report each epoch's held-out RMSE and the best "
                    "epoch. Data: MovieLens 100k (--data ml-100k), a ratings file, or by "
                    "default a built-in synthetic set (100,000 users, 50,000 items, 5,000,000 "
                    "ratings, Zipf-skewed item popularity).",
    )
    train.add_argument("--data", metavar="PATH",
                       help="ratings: " + ", ".join(DATASETS) + " (MovieLens 100k from "
                            "recbole's wheel: pip install --no-deps recbole==1.2.1), or a "
                            "file: MovieLens u.data, ratings.dat, ratings.csv, or any CSV "
                            "(default: the synthetic set)")
    train.add_argument("--columns", metavar="USER,ITEM,RATING",
                       help="which columns of --data hold the user, the item and the rating: "
                            "three header names (e.g. userId,movieId,rating) or 0-based "
                            "positions (e.g. 0,1,2) (default: found by header name, else the "
                            "first three)")
    train.add_argument("--model", choices=["dot", "bag"], default="dot",
                       help="dot: a user is a row of a table; bag: a user is the rating-weighted "
                            "mean of the items they rated (EmbeddingBag) (default dot)")
    train.add_argument("--epochs", type=positive_int, default=10,
                       help="passes over the data (default 10)")
    train.add_argument("--dim", type=positive_int, default=32, help="embedding size (default 32)")
    train.add_argument("--dtype", choices=list(TABLE_CHOICES), default="float32",
                       help=DTYPE_HELP)
    train.add_argument("--stochastic-rounding", action="store_true",
                       help="round 16-bit tables' updates stochastically (unbiased) rather "
                            "than to nearest")
    train.add_argument("--batch-size", type=positive_int, default=1024,
                       help="ratings per step (default 1024)")
    train.add_argument("--optimizer", choices=list(optim.OPTIMIZERS), default="lazyadam",
                       help="lazy optimizer (default lazyadam)")
    train.add_argument("--lr", type=positive_float, default=None,
                       help="learning rate (default: " + ", ".join(
                           f"{name} {lr}" for name, lr in DEFAULT_LR.items()) + ")")
    train.add_argument("--weight-decay", type=non_negative_float, default=DEFAULT_WEIGHT_DECAY,
                       help="L2 weight decay on the rows each step updates "
                            f"(default {DEFAULT_WEIGHT_DECAY})")
    train.add_argument("--y-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="output range of the sigmoid (default: from the lowest rating - "
                            "span/4 to the highest + span/8, 0..5.5 for ratings 1..5)")
    train.add_argument("--threads", type=positive_int, default=None,
                       help="OpenMP threads (default: all cores, or OMP_NUM_THREADS)")
    train.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed for data, init and shuffling (default 0)")
    train.add_argument("--holdout", type=fraction, default=0.1,
                       help="fraction of ratings held out to measure RMSE (default 0.1)")
    train.add_argument("--users", type=positive_int, default=100_000,
                       help="synthetic users (default 100000)")
    train.add_argument("--items", type=positive_int, default=50_000,
                       help="synthetic items (default 50000)")
    train.add_argument("--ratings", type=positive_int, default=5_000_000,
                       help="synthetic ratings (default 5000000)")
    train.add_argument("--save", metavar="PATH",
                       help="keep the tables + optimizer state of the best epoch (lowest "
                            "held-out RMSE) here")
    train.add_argument("--resume", metavar="PATH",
                       help="continue from a checkpoint written by --save")
    train.add_argument("--compare-torch", action="store_true",
                       help="also train the same model with torch from the same initial weights "
                            "and batches, and print both times and RMSEs (needs torch)")
    train.add_argument("--shards", type=positive_int, default=None, metavar="N",
                       help="split every table's rows over N shards that update their own rows "
                            "(fastemb.distributed); float32 tables")
    train.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="where the shards run with --shards: in this process (default), or "
                            "as Ray actors (pip install 'fastemb[ray]'; starts Ray unless it "
                            "runs already)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=run_train)


QUICK_BENCH = {"sizes": ["large-uniform"], "repeat": 5}
FULL_BENCH = {"sizes": None, "repeat": 10}  # None: every workload


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
    preset = FULL_BENCH if args.full else QUICK_BENCH
    sizes = args.sizes or preset["sizes"] or list(bench.workload_names())
    repeat = args.repeat or preset["repeat"]
    bench.report(bench.select_workloads(sizes), args.ops, sorted(set(args.threads)), repeat,
                 json_path=args.json, plot_path=args.plot, progress=not args.quiet)
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
                    "turns call by call. By default one workload (a 1,000,000 x 64 table, "
                    "uniform indices), about a minute on 2 cores; --full runs every workload "
                    "(about 8 minutes).",
    )
    command.add_argument("--full", action="store_true",
                         help=f"every workload ({', '.join(sizes)}), {FULL_BENCH['repeat']} "
                              f"timed calls each")
    command.add_argument("--sizes", nargs="+", choices=sizes, default=None, metavar="SIZE",
                         help=f"workloads: {', '.join(sizes)} (default: "
                              f"{' '.join(QUICK_BENCH['sizes'])}; all with --full)")
    command.add_argument("--ops", nargs="+", choices=bench.OPERATIONS,
                         default=list(bench.OPERATIONS), metavar="OP",
                         help=f"operations: {', '.join(bench.OPERATIONS)} (default: all)")
    command.add_argument("--threads", nargs="+", type=positive_int, default=threads, metavar="N",
                         help=f"thread counts (default: {' '.join(map(str, threads))})")
    command.add_argument("--repeat", type=positive_int, default=None,
                         help=f"timed calls per implementation, after 0.1 s of warm-up "
                              f"calls; the median is reported (default {QUICK_BENCH['repeat']}, "
                              f"{FULL_BENCH['repeat']} with --full)")
    command.add_argument("--json", metavar="PATH",
                         help="also write the times, ratios and machine description as JSON")
    command.add_argument("--plot", metavar="PATH.png",
                         help="also draw the speedups over torch as a bar chart (needs matplotlib)")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    command.set_defaults(handler=run_bench)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastemb",
        description="fastemb: fast CPU embedding tables for NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"fastemb {__version__}")
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
    except (OSError, ValueError, MemoryError) as error:  # a message, not a traceback
        raise SystemExit(f"python -m fastemb {args.command}: error: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
