"""A DLRM-style click model trained on synthetic Criteo-like data: ``python -m fastemb.torch.dlrm``.

The model (Naumov et al., 2019): a bottom MLP maps the 13 dense features to a vector of the
embedding dimension; each of the 26 categorical features (``--tables``) is looked up in its own
table (a sum bag of one index); the dot products of every pair of the 27 vectors, next to the
bottom MLP's output, go through a top MLP to one logit, trained with the binary cross-entropy.
The dense layers train with ``torch.optim.Adagrad``.

The sparse part is one pluggable module mapping a ``(B, T)`` index tensor to the ``(B, T, dim)``
embeddings. ``--embeddings fastemb`` is a ``fastemb.torch.EmbeddingBagCollection`` (every table
in one kernel call) whose fastemb optimizer steps every table inside the backward, in one call;
``fastemb-per-table`` is one ``fastemb.torch.EmbeddingBag`` per table, each with the optimizer
fused; ``torch`` is one ``nn.EmbeddingBag(sparse=True)`` per table and the torch optimizer with
the same update, stepped after the backward. All start from the same weights.

The data: Criteo's table sizes, capped (``--max-rows``) so that 26 float32 tables of dim 64
take about 2 GB; each index drawn from a Zipf law (a few rows are hot, most are rare) and
scattered over its table; a label drawn from a logistic model of the dense features and a
hidden effect of each categorical value, so the loss can go down.

>>> losses = main(["--steps", "4", "--batch-size", "64", "--tables", "3", "--dim", "4",
...                "--max-rows", "50", "--quiet"])
>>> len(losses)
4
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

import fastemb

from .. import optim
from ..bench.dlrm import CRITEO_TABLE_SIZES
from .collection import EmbeddingBagCollection
from .modules import EmbeddingBag

NUM_DENSE = 13
DEFAULT_MAX_ROWS = 1_500_000  # 26 capped tables: 8.07M rows, 2.07 GB in float32 at dim 64
ZIPF_EXPONENT = 1.1           # P(rank k) ~ k^-1.1: a tenth of the lookups hit the top row
SCATTER = 2_654_435_761       # rank r is row (r * SCATTER) % size: hot rows lie apart
BOTTOM_MLP = (512, 256)       # hidden sizes, as in DLRM's Criteo Kaggle configuration
TOP_MLP = (512, 256)
DENSE_LR = 0.01               # the dense part's torch.optim.Adagrad


def table_sizes(num_tables, max_rows=DEFAULT_MAX_ROWS):
    """Criteo's table sizes (repeated past 26 tables), each capped at ``max_rows``.

    >>> table_sizes(4, max_rows=1000)
    [1000, 583, 1000, 1000]
    """
    return [min(CRITEO_TABLE_SIZES[t % len(CRITEO_TABLE_SIZES)], max_rows)
            for t in range(num_tables)]


def hidden_effect(table, rows):
    """The label's hidden effect of ``rows`` of ``table``: a hash of both, uniform in [-1, 1).

    >>> hidden_effect(0, np.array([1, 1, 2])).round(2)
    array([0.22, 0.22, 0.65], dtype=float32)
    """
    x = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(table)
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):  # (MurmurHash3's finaliser)
        x ^= x >> np.uint64(33)
        x *= np.uint64(multiplier)
    x ^= x >> np.uint64(33)
    return (x >> np.uint64(40)).astype(np.float32) / np.float32(2 ** 23) - np.float32(1)


@dataclass(frozen=True)
class SyntheticCriteo:
    """Criteo-like batches: 13 dense features, one index per table, a 0/1 label; batch
    ``step`` is the same for every run with the same ``seed``.

    >>> data = SyntheticCriteo([10, 1000], seed=0)
    >>> dense, categorical, labels = data.batch(0, 4)
    >>> dense.shape, categorical.shape, categorical.dtype, labels.shape
    (torch.Size([4, 13]), torch.Size([4, 2]), torch.int64, torch.Size([4]))
    """

    sizes: list
    seed: int = 0

    def batch(self, step, batch_size):
        """(dense (B, 13) float32, categorical (B, T) int64, labels (B,) float32) tensors."""
        rng = np.random.default_rng([self.seed, step])
        dense = np.log1p(rng.exponential(4.0, (batch_size, NUM_DENSE))).astype(np.float32)
        sizes = np.array(self.sizes, dtype=np.int64)
        ranks = (rng.zipf(ZIPF_EXPONENT, (batch_size, sizes.size)) - 1) % sizes
        categorical = ranks * SCATTER % sizes
        dense_weights = np.random.default_rng(self.seed).normal(0, 0.5, NUM_DENSE)
        logits = (dense - 1.5) @ dense_weights.astype(np.float32)
        for table in range(sizes.size):
            logits += 3 / math.sqrt(sizes.size) * hidden_effect(table, categorical[:, table])
        labels = (rng.random(batch_size) < 1 / (1 + np.exp(-logits))).astype(np.float32)
        return torch.from_numpy(dense), torch.from_numpy(categorical), torch.from_numpy(labels)


def initial_tables(sizes, dim, seed=0):
    """The tables' starting weights: ``(size, dim)`` float32 arrays, N(0, 1/dim), the same for
    every run with the same ``seed``.

    >>> [table.shape for table in initial_tables([3, 5], 2)]
    [(3, 2), (5, 2)]
    """
    tables = []
    for number, size in enumerate(sizes):
        table = np.random.default_rng([seed, number]).standard_normal((size, dim), np.float32)
        table *= np.float32(1 / math.sqrt(dim))
        tables.append(table)
    return tables


class EmbeddingBags(torch.nn.Module):
    """A sparse part of one bag module per categorical feature (``nn.EmbeddingBag`` or
    ``fastemb.torch.EmbeddingBag``, mode "sum"): maps a ``(B, T)`` index tensor to the
    ``(B, T, dim)`` embeddings.

    >>> sparse = EmbeddingBags([torch.nn.EmbeddingBag(10, 4, mode="sum") for _ in range(3)])
    >>> sparse(torch.zeros(2, 3, dtype=torch.int64)).shape
    torch.Size([2, 3, 4])
    """

    def __init__(self, bags):
        super().__init__()
        self.bags = torch.nn.ModuleList(bags)

    def forward(self, categorical):
        """The ``(B, T, dim)`` embeddings of a ``(B, T)`` index tensor."""
        columns = categorical.t().contiguous()  # (each table's indices contiguous: no copies)
        return torch.stack([bag(column.view(-1, 1)) for bag, column in zip(self.bags, columns)],
                           dim=1)


class CollectionBags(torch.nn.Module):
    """A sparse part of one ``fastemb.torch.EmbeddingBagCollection`` whose table t (mode
    "sum") is read by feature t: maps a ``(B, T)`` index tensor to the ``(B, T, dim)``
    embeddings, every table in one call.

    >>> sparse, _ = collection_sparse_part(initial_tables([5, 7], 3), "sgd", 0.1)
    >>> sparse(torch.tensor([[4, 6], [0, 0]])).shape
    torch.Size([2, 2, 3])
    """

    def __init__(self, collection):
        super().__init__()
        self.collection = collection

    def forward(self, categorical):
        """The ``(B, T, dim)`` embeddings of a ``(B, T)`` index tensor."""
        batch, num_tables = categorical.shape
        # feature-major values (TorchRec's KeyedJaggedTensor layout), one value per bag
        features = fastemb.KeyedJaggedArray(
            self.collection.feature_names, categorical.t().contiguous().view(-1).numpy(),
            offsets=np.arange(batch * num_tables + 1))
        return self.collection(features).values.view(batch, num_tables, -1)


def collection_sparse_part(tables, optimizer, lr):
    """``CollectionBags`` on ``tables`` (shared, not copied: table t is named "t<t>"), with the
    fastemb ``optimizer`` (an ``optim.OPTIMIZERS`` name) fused into the backward: one call
    steps every table. Returns (sparse part, []): no optimizer is left to step after the
    backward.

    >>> sparse, to_step = collection_sparse_part(initial_tables([5], 2), "rowwise-adagrad", 0.1)
    >>> sparse.collection.fused_optimizer, to_step  # doctest: +ELLIPSIS
    (RowWiseAdagrad(1 modules, lr=0.1, ...), [])
    """
    collection = fastemb.EmbeddingBagCollection(
        [fastemb.EmbeddingBagConfig(f"t{t}", *table.shape, pooling="sum")
         for t, table in enumerate(tables)])
    for module, table in zip(collection.tables, tables):
        module.weight = table  # (the starting weights, shared)
    module = EmbeddingBagCollection.from_numpy(collection)
    module.fuse_optimizer(optim.OPTIMIZERS[optimizer].cls, lr=lr)
    return CollectionBags(module), []


def per_table_sparse_part(tables, optimizer, lr):
    """``EmbeddingBags`` of ``fastemb.torch.EmbeddingBag`` modules on ``tables`` (shared, not
    copied), each with the fastemb ``optimizer`` fused into its backward; returns (sparse
    part, []).

    >>> sparse, to_step = per_table_sparse_part(initial_tables([5], 2), "rowwise-adagrad", 0.1)
    >>> sparse.bags[0].fused_optimizer, to_step  # doctest: +ELLIPSIS
    (RowWiseAdagrad(1 modules, lr=0.1, ...), [])
    """
    bags = [EmbeddingBag.from_pretrained(table, freeze=False, mode="sum") for table in tables]
    for bag in bags:
        bag.fuse_optimizer(optim.OPTIMIZERS[optimizer].cls, lr=lr)
    return EmbeddingBags(bags), []


def torch_sparse_part(tables, optimizer, lr):
    """``EmbeddingBags`` of ``nn.EmbeddingBag(sparse=True)`` modules on ``tables`` (shared,
    not copied); returns (sparse part, [the torch optimizer with the same update as fastemb's
    ``optimizer``]), which steps after the backward.

    >>> sparse, to_step = torch_sparse_part(initial_tables([5], 2), "lazyadam", 0.01)
    >>> type(to_step[0]).__name__
    'SparseAdam'
    """
    torch_name = optim.OPTIMIZERS[optimizer].torch_name
    if torch_name is None:
        raise ValueError(f"torch has no optimizer with {optimizer}'s update; use --embeddings "
                         f"fastemb, or another --optimizer")
    sparse = EmbeddingBags([
        torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(table), freeze=False,
                                              mode="sum", sparse=True) for table in tables])
    return sparse, [getattr(torch.optim, torch_name)(sparse.parameters(), lr=lr)]


SPARSE_PARTS = {"fastemb": collection_sparse_part, "fastemb-per-table": per_table_sparse_part,
                "torch": torch_sparse_part}


def mlp(sizes, last_relu):
    """Linear layers of ``sizes`` with a ReLU after each (but the last, unless ``last_relu``).

    >>> mlp([13, 8, 4], last_relu=False)
    Sequential(
      (0): Linear(in_features=13, out_features=8, bias=True)
      (1): ReLU()
      (2): Linear(in_features=8, out_features=4, bias=True)
    )
    """
    layers = []
    for inputs, outputs in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(inputs, outputs), torch.nn.ReLU()]
    return torch.nn.Sequential(*(layers if last_relu else layers[:-1]))


class DLRM(torch.nn.Module):
    """DLRM: bottom MLP, a sparse part, pairwise dot interaction, top MLP to one logit.

    ``sparse`` maps a ``(B, T)`` index tensor to the ``(B, T, dim)`` embeddings; the dense layers
    are drawn from torch's generator seeded with ``seed``.

    >>> sparse, _ = torch_sparse_part(initial_tables([10, 20], 4), "sgd", 0.1)
    >>> model = DLRM(sparse, num_tables=2, dim=4, bottom=(8,), top=(8,))
    >>> dense, categorical, _ = SyntheticCriteo([10, 20]).batch(0, 5)
    >>> model(dense, categorical).shape
    torch.Size([5])
    """

    def __init__(self, sparse, num_tables, dim, bottom=BOTTOM_MLP, top=TOP_MLP, seed=0):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.bottom = mlp([NUM_DENSE, *bottom, dim], last_relu=True)
        vectors = num_tables + 1
        self.top = mlp([dim + vectors * (vectors - 1) // 2, *top, 1], last_relu=False)
        torch.random.set_rng_state(generator_state)
        self.sparse = sparse
        above, beside = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pairs", above * vectors + beside)  # flat (i, j), i < j

    def forward(self, dense, categorical):
        """The ``(B,)`` logits of ``(B, 13)`` dense features and ``(B, T)`` indices."""
        bottom = self.bottom(dense)
        vectors = torch.cat([bottom[:, None], self.sparse(categorical)], dim=1)  # (B, T + 1, dim)
        dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)
        return self.top(torch.cat([bottom, dots.index_select(1, self.pairs)], dim=1))[:, 0]

    def dense_parameters(self):
        """The parameters of the MLPs (the sparse part's tables excluded), for the dense
        optimizer."""
        return [*self.bottom.parameters(), *self.top.parameters()]


def training_step(model, optimizers, dense, categorical, labels):
    """One step: forward, the binary cross-entropy, backward (where a fused fastemb optimizer
    steps the tables), then every optimizer's step; returns the loss (a 0-d tensor, detached
    from the graph the step has used: ``float(loss)`` of an attached one warns).

    >>> model, to_step, data = build("fastemb", 2, 4, 10, "sgd", 0.1, (8,), (8,))
    >>> float(training_step(model, to_step, *data.batch(0, 16))) > 0
    True
    """
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, categorical),
                                                                labels)
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return loss.detach()


def train(model, optimizers, data, steps, batch_size, report=None):
    """Run ``steps`` training steps (forward, BCE loss, backward, every optimizer's step);
    returns the losses and the seconds each step took (batches made outside the timing).
    ``report(step, loss, seconds)`` is called after each step if given.

    >>> sparse, to_step = torch_sparse_part(initial_tables([10], 4), "sgd", 0.1)
    >>> model = DLRM(sparse, num_tables=1, dim=4, bottom=(8,), top=(8,))
    >>> losses, seconds = train(model, to_step, SyntheticCriteo([10]), 3, 16)
    >>> len(losses), len(seconds)
    (3, 3)
    """
    losses, seconds = [], []
    for step in range(steps):
        batch = data.batch(step, batch_size)
        start = time.perf_counter()
        loss = training_step(model, optimizers, *batch)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if report is not None:
            report(step, losses[-1], seconds[-1])
    return losses, seconds


def build(embeddings, num_tables, dim, max_rows, optimizer, lr, bottom=BOTTOM_MLP,
          top=TOP_MLP, seed=0):
    """(model, optimizers to step after each backward, data): the DLRM with the sparse part
    ``embeddings`` (a ``SPARSE_PARTS`` name), the same starting weights and data for all.

    >>> model, to_step, data = build("fastemb", 2, 4, 100, "adagrad", 0.1, (8,), (8,))
    >>> [type(o).__name__ for o in to_step]
    ['Adagrad']
    """
    sizes = table_sizes(num_tables, max_rows)
    sparse, sparse_optimizers = SPARSE_PARTS[embeddings](initial_tables(sizes, dim, seed),
                                                         optimizer, lr)
    model = DLRM(sparse, num_tables, dim, bottom, top, seed)
    dense_optimizer = torch.optim.Adagrad(model.dense_parameters(), lr=DENSE_LR)
    return model, [dense_optimizer, *sparse_optimizers], SyntheticCriteo(sizes, seed)


def hidden_sizes(text):
    """``--bottom-mlp`` / ``--top-mlp``: comma-separated layer sizes ("" for none).

    >>> hidden_sizes("512,256")
    (512, 256)
    """
    sizes = tuple(int(size) for size in text.split(",") if size.strip())
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def positive_int(text):
    """An integer >= 1 from the command line (argparse's error otherwise).

    >>> positive_int("12")
    12
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_arguments(argv=None):
    """The command line's options (``argv``, default ``sys.argv[1:]``).

    >>> parse_arguments(["--embeddings", "torch", "--threads", "2"]).batch_size
    2048
    """
    parser = argparse.ArgumentParser(
        prog="python -m fastemb.torch.dlrm",
        description="Train a DLRM-style model on synthetic Criteo-like data; prints the loss "
                    "and the time per step.")
    parser.add_argument("--steps", type=positive_int, default=50, help="default 50")
    parser.add_argument("--batch-size", type=positive_int, default=2048, help="default 2048")
    parser.add_argument("--tables", type=positive_int, default=26,
                        help="categorical features, one table each (default 26)")
    parser.add_argument("--dim", type=positive_int, default=64,
                        help="the embedding dimension (default 64)")
    parser.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS,
                        help="cap on each table's rows (default %(default)s: 26 tables of dim "
                             "64 take 2.07 GB)")
    parser.add_argument("--embeddings", choices=sorted(SPARSE_PARTS), default="fastemb",
                        help="the sparse part: fastemb (a fastemb.torch.EmbeddingBagCollection "
                             "stepping every table in the backward), fastemb-per-table (a "
                             "fastemb.torch.EmbeddingBag per table, each stepped in the "
                             "backward) or torch (nn.EmbeddingBag(sparse=True) per table, the "
                             "torch optimizer of the same update stepped after the backward)")
    parser.add_argument("--optimizer", choices=sorted(optim.OPTIMIZERS), default="adagrad",
                        help="the tables' optimizer (default adagrad; rowwise-adagrad has no "
                             "torch twin)")
    parser.add_argument("--lr", type=float, default=None,
                        help="the tables' learning rate (default: the optimizer's)")
    parser.add_argument("--bottom-mlp", type=hidden_sizes, default=BOTTOM_MLP,
                        help="the bottom MLP's hidden sizes (default 512,256)")
    parser.add_argument("--top-mlp", type=hidden_sizes, default=TOP_MLP,
                        help="the top MLP's hidden sizes (default 512,256)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for torch and fastemb (default: their own defaults)")
    parser.add_argument("--log-every", type=positive_int, default=10,
                        help="print the mean loss and time of each block of this many steps")
    parser.add_argument("--warmup-steps", type=positive_int, default=10,
                        help="steps left out of the time per step (the first touches of the "
                             "tables and the optimizer state; default 10)")
    parser.add_argument("--seed", type=int, default=0,
                        help="of the data and the starting weights (default 0)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser.parse_args(argv)


def main(argv=None):
    """The command line; returns the losses.

    >>> main(["--steps", "1", "--tables", "2", "--max-rows", "9", "--quiet"])  # doctest: +ELLIPSIS
    [0.6...]
    """
    args = parse_arguments(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        fastemb.set_num_threads(args.threads)
    lr = optim.OPTIMIZERS[args.optimizer].train_lr if args.lr is None else args.lr
    say = (lambda *_: None) if args.quiet else print
    try:
        model, optimizers, data = build(args.embeddings, args.tables, args.dim, args.max_rows,
                                        args.optimizer, lr, args.bottom_mlp, args.top_mlp,
                                        args.seed)
    except ValueError as error:  # (an optimizer without a torch twin, a bad learning rate)
        raise SystemExit(f"python -m fastemb.torch.dlrm: error: {error}") from None
    rows = sum(data.sizes)
    say(f"DLRM: {args.tables} tables ({rows:,} rows, {rows * args.dim * 4 / 1e9:.2f} GB), dim "
        f"{args.dim}, batch {args.batch_size}; embeddings: {args.embeddings}, {args.optimizer} "
        f"lr {lr:g}; threads: torch {torch.get_num_threads()}, fastemb "
        f"{fastemb.get_num_threads()}")
    block = []

    def report(step, loss, seconds):
        block.append((loss, seconds))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            losses, times = zip(*block)
            say(f"step {step + 1:6d}  loss {np.mean(losses):.4f}  "
                f"{1e3 * np.mean(times):8.2f} ms/step")
            block.clear()

    losses, seconds = train(model, optimizers, data, args.steps, args.batch_size, report)
    timed = 1e3 * np.array(seconds[args.warmup_steps:])
    if timed.size:
        say(f"time per step: mean {timed.mean():.2f} ms, median {np.median(timed):.2f} ms "
            f"(steps {args.warmup_steps + 1}-{args.steps}; the first {args.warmup_steps} "
            f"took {1e3 * sum(seconds[:args.warmup_steps]):.0f} ms)")
    return losses


if __name__ == "__main__":
    main()
