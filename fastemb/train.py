"""The main job: train a collaborative-filtering model on the CPU with fastemb tables.

A rating is predicted as ``low + (high - low) * sigmoid(offset + dot(user, item) + user_bias +
item_bias)``: the ``DotProductBias`` model of the fastai book, whose output is squashed into
the rating range ``y_range = (low, high)``, with ``offset`` the logit of the training mean, so
an untrained model predicts the mean. Without a ``y_range`` the prediction is the plain
``mean + dot + biases``. Users and items are rows of embedding tables; with ``kind="bag"`` a
user is instead the weighted mean of the items they rated (an ``EmbeddingBag`` with the
ratings as per-sample weights). Training minimises the squared error with a lazy optimizer
that only touches the rows of each batch, and L2 weight decay on those rows keeps the tables
from overfitting. The data comes from ``fastemb.data``.
"""

import math
import os
import tempfile
import time

import numpy as np

from . import distributed, optim
from .checkpoint import load, read_metadata, save
from .modules import Embedding, EmbeddingBag

INIT_SCALE = 0.01      # tables start N(0, INIT_SCALE^2), as in the fastai book
MAX_BAG_ITEMS = 64     # a user's bag holds at most this many of their training items


def default_y_range(ratings):
    """The output range for ratings from ``lo`` to ``hi``: ``(lo - span / 4, hi + span / 8)``,
    the fastai book's ``(0, 5.5)`` for ratings 1..5 (a sigmoid never reaches its ends, so the
    range reaches past the ratings; more room below, where MovieLens ratings are rarer).

    >>> default_y_range(np.array([1.0, 3.0, 5.0]))
    (0.0, 5.5)
    """
    low, high = float(ratings.min()), float(ratings.max())
    span = max(high - low, 1.0)
    return low - span / 4, high + span / 8


def score_offset(global_mean, y_range):
    """The constant of the score: the mean itself, or the logit that makes the squashed
    output the mean.

    >>> float(score_offset(2.75, (0.0, 5.5)))
    0.0
    """
    if y_range is None:
        return np.float32(global_mean)
    low, high = y_range
    if not low < global_mean < high:
        raise ValueError(f"the mean rating {global_mean:.4g} lies outside the output range "
                         f"{low:g}..{high:g} (--y-range)")
    fraction = (global_mean - low) / (high - low)
    return np.float32(math.log(fraction / (1 - fraction)))


def sigmoid(z):
    """1 / (1 + exp(-z)) without overflow warnings, in z's dtype."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


class UserBags:
    """Each user's training items (at most MAX_BAG_ITEMS), with their ratings as weights."""

    def __init__(self, train, seed):
        order = np.random.default_rng([seed, 2]).permutation(len(train))
        order = order[np.argsort(train.users[order], kind="stable")]
        starts = np.searchsorted(train.users[order], np.arange(train.num_users + 1))
        self.items, self.weights, self.starts = train.items[order], train.ratings[order], starts

    def batch(self, users):
        """(indices, offsets, per_sample_weights) of the bags of ``users``."""
        starts = self.starts[users]
        lengths = np.minimum(self.starts[users + 1] - starts, MAX_BAG_ITEMS)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        positions = np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())
        return self.items[positions], offsets, self.weights[positions]


class RatingModel:
    """``low + (high - low) * sigmoid(offset + dot(user, item) + user_bias + item_bias)`` on
    fastemb tables (``mean + dot + biases`` when ``y_range`` is None)."""

    def __init__(self, num_users, num_items, dim, seed, global_mean, kind="dot", bags=None,
                 y_range=None, dtype=np.float32, split=False):
        """The model's four tables (or, for ``kind="bag"``, the users' table an EmbeddingBag
        over items), drawn from ``seed`` and scaled by INIT_SCALE. ``shard`` turns them into
        sharded tables."""
        if kind not in ("dot", "bag"):
            raise ValueError(f"kind must be 'dot' or 'bag', got {kind!r}")
        rng_seeds = np.random.SeedSequence(seed).spawn(4)
        table = dict(dtype=dtype, split=split)
        if kind == "dot":
            self.users = Embedding(num_users, dim, seed=rng_seeds[0], **table)
        else:
            self.users = EmbeddingBag(num_items, dim, mode="mean", seed=rng_seeds[0], **table)
        self.items = Embedding(num_items, dim, seed=rng_seeds[1], **table)
        self.user_bias = Embedding(num_users, 1, seed=rng_seeds[2], **table)
        self.item_bias = Embedding(num_items, 1, seed=rng_seeds[3], **table)
        for module in self.modules:
            module.weight *= INIT_SCALE  # (a split table's: read, scaled, both halves set)
        self.kind, self.bags, self.global_mean = kind, bags, np.float32(global_mean)
        self.y_range, self.offset = y_range, score_offset(global_mean, y_range)
        self.sharded = False

    def shard(self, num_shards, make_engine, optimizer, **hyperparameters):
        """Move every table onto ``num_shards`` shards (``fastemb.distributed``; an engine from
        ``make_engine()`` each), from its current rows, with the shards' ``optimizer`` (an
        ``optim.OPTIMIZERS`` name) applying each backward's gradient: ``train_step`` then takes
        no optimizer. Each table becomes its sharded kind (``ShardedEmbedding`` or, for the bag
        model's users, ``ShardedEmbeddingBag``, which pulls its rows), so training equals the
        unsharded model's."""
        def sharded(module):
            options = {"engine": make_engine(), "optimizer": optimizer, **hyperparameters}
            if isinstance(module, EmbeddingBag):
                return distributed.ShardedEmbeddingBag.from_pretrained(
                    module.weight, num_shards, mode=module.mode, strategy="pull", **options)
            return distributed.ShardedEmbedding.from_pretrained(module.weight, num_shards,
                                                                **options)

        self.users, self.items, self.user_bias, self.item_bias = map(sharded, self.modules)
        self.sharded = True

    @property
    def modules(self):
        return [self.users, self.items, self.user_bias, self.item_bias]

    def _user_vectors(self, users):
        if self.kind == "dot":
            return self.users(users)
        indices, offsets, weights = self.bags.batch(users)
        return self.users(indices, offsets, per_sample_weights=weights)

    def forward(self, users, items):
        """(predictions for (users[k], items[k]), d prediction / d score, user vectors, item
        vectors), remembering in the tables what the backward needs. The model computes in
        float32 (rows of 16-bit tables are widened, exactly)."""
        user_vectors = self._user_vectors(users).astype(np.float32, copy=False)
        item_vectors = self.items(items).astype(np.float32, copy=False)
        biases = (self.user_bias(users)[:, 0].astype(np.float32, copy=False)
                  + self.item_bias(items)[:, 0].astype(np.float32, copy=False))
        score = self.offset + np.einsum("ij,ij->i", user_vectors, item_vectors) + biases
        if self.y_range is None:
            return score, np.float32(1), user_vectors, item_vectors
        low, high = (np.float32(x) for x in self.y_range)
        squashed = sigmoid(score)
        slope = (high - low) * squashed * (1 - squashed)
        return low + (high - low) * squashed, slope, user_vectors, item_vectors

    def predict(self, users, items, batch_size=65536):
        """Predictions in batches, without keeping anything for a backward."""
        return np.concatenate([self.forward(users[s:s + batch_size], items[s:s + batch_size])[0]
                               for s in range(0, users.size, batch_size)] or [np.empty(0)])

    def train_step(self, users, items, ratings, optimizer):
        """One step of mean squared error; returns the batch's sum of squared errors.
        ``optimizer`` is None for a sharded model (its shards apply each gradient)."""
        prediction, slope, user_vectors, item_vectors = self.forward(users, items)
        error = prediction - ratings
        grad = ((2.0 / error.size) * error * slope).astype(np.float32)
        self.users.backward(grad[:, None] * item_vectors)
        self.items.backward(grad[:, None] * user_vectors)
        self.user_bias.backward(grad[:, None])
        self.item_bias.backward(grad[:, None])
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        return float(np.dot(error, error))


def rmse(model, data):
    """Root mean squared error of the model on ``data``."""
    error = model.predict(data.users, data.items) - data.ratings
    return float(np.sqrt(np.mean(error.astype(np.float64) ** 2)))


def make_optimizer(name, modules, lr, weight_decay=0.0, stochastic_rounding=False, seed=0):
    """An optimizer from its command-line name."""
    if name not in optim.OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from "
                         f"{', '.join(optim.OPTIMIZERS)}")
    return optim.OPTIMIZERS[name].cls(modules, lr=lr, weight_decay=weight_decay,
                                      stochastic_rounding=stochastic_rounding, seed=seed)


def batches(num_ratings, batch_size, seed, epoch):
    """The shuffled batches of one epoch; the shuffle depends only on (seed, epoch)."""
    order = np.random.default_rng([seed, 3, epoch]).permutation(num_ratings)
    return [order[s:s + batch_size] for s in range(0, num_ratings, batch_size)]


def train_epoch(model, optimizer, train, batch_size, seed, epoch, progress=None):
    """One pass over ``train``; returns (train RMSE over the epoch, seconds)."""
    started = time.perf_counter()
    squared_error = 0.0
    for selection in batches(len(train), batch_size, seed, epoch):
        squared_error += model.train_step(train.users[selection], train.items[selection],
                                          train.ratings[selection], optimizer)
        if progress is not None:
            progress.update(selection.size)
            progress.set_postfix(rmse=f"{np.sqrt(squared_error / max(progress.n, 1)):.4f}",
                                 refresh=False)
    return float(np.sqrt(squared_error / max(len(train), 1))), time.perf_counter() - started


def checkpoint_metadata(args, epoch):
    """What a resumed run must share with the run that saved the checkpoint."""
    data = args.data or f"synthetic {args.users} {args.items} {args.ratings}"
    return {"epoch": epoch, "model": args.model, "dim": args.dim, "optimizer": args.optimizer,
            "lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
            "seed": args.seed, "holdout": args.holdout, "data": data,
            "y_range": list(args.y_range) if args.y_range else None, "dtype": args.dtype,
            "stochastic_rounding": args.stochastic_rounding, "shards": args.shards}


def save_checkpoint(path, model, optimizer, args, epoch):
    """The tables and optimizer state (a sharded model's: every shard's) to ``path``."""
    metadata = checkpoint_metadata(args, epoch)
    if model.sharded:
        distributed.save(path, model.modules, metadata)
    else:
        save(path, model.modules, optimizer, metadata=metadata)


def resume_checkpoint(path, model, optimizer, args):
    """Load a checkpoint written by this command; returns the number of epochs it had done."""
    # (checkpoints from before 16-bit tables hold float32 ones, rounded to nearest)
    saved = {"dtype": "float32", "stochastic_rounding": False} | read_metadata(path)
    expected = checkpoint_metadata(args, saved.get("epoch"))
    mismatched = [key for key in expected if saved.get(key) != expected[key]]
    if mismatched:
        raise ValueError(
            f"{path} was trained with different options: "
            + ", ".join(f"{key}={saved.get(key)!r} (now {expected[key]!r})" for key in mismatched)
        )
    if model.sharded:
        distributed.load(path, model.modules)
    else:
        load(path, model.modules, optimizer)
    return saved["epoch"]


def train_with_torch(initial_weights, train, test, args, global_mean, progress=None):
    """Train the same dot model with torch (sparse embeddings, the matching torch optimizer,
    the same lazy L2 weight decay added to the looked-up rows' gradients) from the same
    initial weights and batches; returns (seconds per epoch, final held-out RMSE, final tables
    as NumPy arrays). ``progress`` (a tqdm bar, optional) advances by each batch's ratings."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    users, items, user_bias, item_bias = (
        torch.nn.Embedding.from_pretrained(torch.from_numpy(weight.copy()), freeze=False,
                                           sparse=True)
        for weight in initial_weights
    )
    parameters = [users.weight, items.weight, user_bias.weight, item_bias.weight]
    optimizer = getattr(torch.optim, optim.OPTIMIZERS[args.optimizer].torch_name)(parameters,
                                                                                 lr=args.lr)
    offset = torch.tensor(score_offset(global_mean, args.y_range), dtype=torch.float32)

    def predict(u, i):
        score = offset + (users(u) * items(i)).sum(1) + user_bias(u)[:, 0] + item_bias(i)[:, 0]
        if args.y_range is None:
            return score
        low, high = (torch.tensor(x, dtype=torch.float32) for x in args.y_range)
        return low + (high - low) * torch.sigmoid(score)

    def decay_looked_up_rows():
        for parameter in parameters:
            grad = parameter.grad.coalesce()
            rows = grad.indices()[0]
            values = grad.values() + args.weight_decay * parameter.detach()[rows]
            parameter.grad = torch.sparse_coo_tensor(grad.indices(), values, grad.shape,
                                                     check_invariants=False)

    epoch_seconds = []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        for selection in batches(len(train), args.batch_size, args.seed, epoch):
            u = torch.from_numpy(train.users[selection])
            i = torch.from_numpy(train.items[selection])
            loss = ((predict(u, i) - torch.from_numpy(train.ratings[selection])) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            if args.weight_decay:
                decay_looked_up_rows()
            optimizer.step()
            if progress is not None:
                progress.update(selection.size)
        epoch_seconds.append(time.perf_counter() - started)
    with torch.no_grad():
        error = predict(torch.from_numpy(test.users), torch.from_numpy(test.items)).numpy()
    final_rmse = float(np.sqrt(np.mean((error.astype(np.float64) - test.ratings) ** 2)))
    return epoch_seconds, final_rmse, [p.detach().numpy() for p in parameters]


def bytes_needed(num_users, num_items, dim, optimizer, kind="dot", dtype=np.float32):
    """Bytes of the tables (of ``dtype``) and optimizer state (float32) a model of this size
    allocates."""
    info = optim.OPTIMIZERS[optimizer]
    rows = (num_items if kind == "bag" else num_users) + num_items
    bias_rows = num_users + num_items
    table_bytes = np.dtype(dtype).itemsize * (rows * dim + bias_rows)
    return table_bytes + 4 * (rows * info.state_per_row(dim) + bias_rows * info.state_per_row(1))


def synthetic_bytes(num_users, num_items, num_ratings):
    """Bytes that ``synthetic_ratings`` holds at its peak (a generous estimate)."""
    return 8 * (6 * num_ratings + 24 * (num_users + num_items))


def available_memory():
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(needed, what):
    """Refuse (MemoryError, one line) before allocating ``needed`` bytes that are not free."""
    free = available_memory()
    if free is not None and needed > free:
        raise MemoryError(f"{what} need {needed / 1e9:,.1f} GB, but only {free / 1e9:,.1f} GB "
                          f"of memory is available; use fewer users, items or a smaller --dim")


def check_writable(path):
    """Refuse (OSError naming ``path``) a checkpoint path that cannot be written, before any
    training: its folder must exist and take a new file, and it must not be a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to {path}: it is a folder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"cannot save to {path}: {error.strerror or error}") from None
