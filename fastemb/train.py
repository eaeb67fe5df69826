"""The main job: train a collaborative-filtering model on the CPU with fastemb tables.

A rating is predicted as ``mean + dot(user, item) + user_bias + item_bias`` (the ``DotProduct``
model with biases of the fastai book), where users and items are rows of embedding tables. With
``kind="bag"`` a user is instead the weighted mean of the items they rated (an ``EmbeddingBag``
with the ratings as per-sample weights). Training minimises the squared error with a lazy
optimizer that only touches the rows of each batch.

The data is a deterministic synthetic ratings set (``synthetic_ratings``) or a ratings file
(``read_ratings``: MovieLens ``u.data`` or a ``user,item,rating`` CSV).
"""

import time
from dataclasses import dataclass

import numpy as np

from . import optim
from .checkpoint import load, read_metadata, save
from .modules import Embedding, EmbeddingBag

OPTIMIZERS = {
    "lazyadam": optim.LazyAdam,
    "sgd": optim.SGD,
    "adagrad": optim.Adagrad,
    "rowwise-adagrad": optim.RowWiseAdagrad,
}
INIT_SCALE = 0.01      # tables start N(0, INIT_SCALE^2), as in the fastai book
MAX_BAG_ITEMS = 64     # a user's bag holds at most this many of their training items


@dataclass
class Ratings:
    """Ratings as parallel arrays; users and items are 0-based rows."""

    users: np.ndarray    # int64
    items: np.ndarray    # int64
    ratings: np.ndarray  # float32
    num_users: int
    num_items: int

    def __len__(self):
        return self.ratings.size

    def subset(self, selection):
        return Ratings(self.users[selection], self.items[selection], self.ratings[selection],
                       self.num_users, self.num_items)

    def split(self, holdout_fraction, seed):
        """(train, held-out) split of the ratings, at random but deterministic in ``seed``."""
        order = np.random.default_rng([seed, 1]).permutation(len(self))
        cut = len(self) - int(round(len(self) * holdout_fraction))
        return self.subset(np.sort(order[:cut])), self.subset(np.sort(order[cut:]))


def _skewed_choice(rng, count, size, exponent):
    """``size`` draws from ``range(count)`` where the k-th most popular id has probability
    proportional to ``k ** -exponent``; which ids are popular is a random permutation."""
    weights = np.arange(1, count + 1, dtype=np.float64) ** -exponent
    cumulative = np.cumsum(weights / weights.sum())
    ranks = np.minimum(np.searchsorted(cumulative, rng.random(size)), count - 1)
    return rng.permutation(count)[ranks]


def synthetic_ratings(num_users=100_000, num_items=50_000, num_ratings=5_000_000, rank=8,
                      noise=0.5, seed=0):
    """A deterministic ratings set with a realistic shape: Zipf-skewed item popularity, skewed
    user activity, ratings 1..5 from a planted low-rank model plus biases and Gaussian noise.

    >>> data = synthetic_ratings(1000, 500, 20_000, seed=0)
    >>> len(data), int(data.ratings.min()), int(data.ratings.max())
    (20000, 1, 5)
    """
    rng = np.random.default_rng(seed)
    users = _skewed_choice(rng, num_users, num_ratings, exponent=0.5)
    items = _skewed_choice(rng, num_items, num_ratings, exponent=1.0)
    user_factors = rng.standard_normal((num_users, rank)) / rank ** 0.25
    item_factors = rng.standard_normal((num_items, rank)) / rank ** 0.25
    user_bias = rng.normal(0.0, 0.4, num_users)
    item_bias = rng.normal(0.0, 0.6, num_items)
    affinity = np.einsum("ij,ij->i", user_factors[users], item_factors[items])
    scores = 3.4 + user_bias[users] + item_bias[items] + affinity
    scores += rng.normal(0.0, noise, num_ratings)
    ratings = np.clip(np.rint(scores), 1, 5).astype(np.float32)
    return Ratings(users.astype(np.int64), items.astype(np.int64), ratings, num_users, num_items)


def read_ratings(path):
    """Read MovieLens ``u.data`` (``user<TAB>item<TAB>rating[<TAB>timestamp]``, no header) or a
    CSV with a header naming ``user``, ``item`` and ``rating`` columns. Ids may be any strings
    or numbers; they are mapped to rows 0..n-1. A malformed line raises ValueError naming it.
    """
    with open(path, encoding="utf-8-sig") as file:  # -sig: spreadsheets write a BOM
        lines = file.read().splitlines()
    first = lines[0].strip().lower() if lines else ""
    if "," in first and "user" in first:
        header = [name.strip() for name in first.split(",")]
        missing = {"user", "item", "rating"} - set(header)
        if missing:
            raise ValueError(f"{path}:1: the CSV header lacks column(s) {', '.join(sorted(missing))}")
        columns = [header.index(name) for name in ("user", "item", "rating")]
        separator, body_start = ",", 1
    else:
        columns, separator, body_start = [0, 1, 2], "\t", 0
    users, items, ratings = [], [], []
    for number, line in enumerate(lines[body_start:], start=body_start + 1):
        if not line.strip():
            continue
        fields = line.split(separator)
        try:
            user, item, rating = (fields[c].strip() for c in columns)
            value = float(rating)
            if not np.isfinite(value):
                raise ValueError("rating is not finite")
        except (IndexError, ValueError) as error:
            raise ValueError(f"{path}:{number}: malformed line {line!r} ({error})") from None
        users.append(user)
        items.append(item)
        ratings.append(value)
    if not ratings:
        raise ValueError(f"{path}: no ratings found")
    user_ids, user_rows = np.unique(np.array(users), return_inverse=True)
    item_ids, item_rows = np.unique(np.array(items), return_inverse=True)
    return Ratings(user_rows.astype(np.int64), item_rows.astype(np.int64),
                   np.array(ratings, dtype=np.float32), user_ids.size, item_ids.size)


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
    """``mean + dot(user, item) + user_bias + item_bias`` on fastemb tables."""

    def __init__(self, num_users, num_items, dim, seed, global_mean, kind="dot", bags=None):
        if kind not in ("dot", "bag"):
            raise ValueError(f"kind must be 'dot' or 'bag', got {kind!r}")
        rng_seeds = np.random.SeedSequence(seed).spawn(4)
        if kind == "dot":
            self.users = Embedding(num_users, dim, seed=rng_seeds[0])
        else:
            self.users = EmbeddingBag(num_items, dim, mode="mean", seed=rng_seeds[0])
        self.items = Embedding(num_items, dim, seed=rng_seeds[1])
        self.user_bias = Embedding(num_users, 1, seed=rng_seeds[2])
        self.item_bias = Embedding(num_items, 1, seed=rng_seeds[3])
        for module in self.modules:
            module.weight *= INIT_SCALE
        self.kind, self.bags, self.global_mean = kind, bags, np.float32(global_mean)

    @property
    def modules(self):
        return [self.users, self.items, self.user_bias, self.item_bias]

    def _user_vectors(self, users):
        if self.kind == "dot":
            return self.users(users)
        indices, offsets, weights = self.bags.batch(users)
        return self.users(indices, offsets, per_sample_weights=weights)

    def forward(self, users, items):
        """Predictions for (users[k], items[k]), remembering what the backward needs."""
        user_vectors, item_vectors = self._user_vectors(users), self.items(items)
        prediction = (self.global_mean + np.einsum("ij,ij->i", user_vectors, item_vectors)
                      + self.user_bias(users)[:, 0] + self.item_bias(items)[:, 0])
        return prediction, user_vectors, item_vectors

    def predict(self, users, items, batch_size=65536):
        """Predictions in batches, without keeping anything for a backward."""
        return np.concatenate([self.forward(users[s:s + batch_size], items[s:s + batch_size])[0]
                               for s in range(0, users.size, batch_size)] or [np.empty(0)])

    def train_step(self, users, items, ratings, optimizer):
        """One step of mean squared error; returns the batch's sum of squared errors."""
        prediction, user_vectors, item_vectors = self.forward(users, items)
        error = prediction - ratings
        grad = (2.0 / error.size) * error.astype(np.float32)
        self.users.backward(grad[:, None] * item_vectors)
        self.items.backward(grad[:, None] * user_vectors)
        self.user_bias.backward(grad[:, None])
        self.item_bias.backward(grad[:, None])
        optimizer.step()
        optimizer.zero_grad()
        return float(np.dot(error, error))


def rmse(model, data):
    """Root mean squared error of the model on ``data``."""
    error = model.predict(data.users, data.items) - data.ratings
    return float(np.sqrt(np.mean(error.astype(np.float64) ** 2)))


def make_optimizer(name, modules, lr):
    """An optimizer from its command-line name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](modules, lr=lr)


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
            "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
            "holdout": args.holdout, "data": data}


def save_checkpoint(path, model, optimizer, args, epoch):
    save(path, model.modules, optimizer, metadata=checkpoint_metadata(args, epoch))


def resume_checkpoint(path, model, optimizer, args):
    """Load a checkpoint written by this command; returns the number of epochs it had done."""
    saved = read_metadata(path)
    expected = checkpoint_metadata(args, saved.get("epoch"))
    mismatched = [key for key in expected if saved.get(key) != expected[key]]
    if mismatched:
        raise ValueError(
            f"{path} was trained with different options: "
            + ", ".join(f"{key}={saved.get(key)!r} (now {expected[key]!r})" for key in mismatched)
        )
    load(path, model.modules, optimizer)
    return saved["epoch"]


def train_with_torch(initial_weights, train, test, args, global_mean):
    """Train the same dot model with torch (sparse embeddings, the matching torch optimizer)
    from the same initial weights and batches; returns (seconds per epoch, final held-out RMSE,
    final tables as NumPy arrays)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    users, items, user_bias, item_bias = (
        torch.nn.Embedding.from_pretrained(torch.from_numpy(weight.copy()), freeze=False,
                                           sparse=True)
        for weight in initial_weights
    )
    parameters = [users.weight, items.weight, user_bias.weight, item_bias.weight]
    optimizer = {
        "lazyadam": lambda: torch.optim.SparseAdam(parameters, lr=args.lr),
        "sgd": lambda: torch.optim.SGD(parameters, lr=args.lr),
        "adagrad": lambda: torch.optim.Adagrad(parameters, lr=args.lr),
    }[args.optimizer]()
    mean = torch.tensor(global_mean, dtype=torch.float32)

    def predict(u, i):
        return mean + (users(u) * items(i)).sum(1) + user_bias(u)[:, 0] + item_bias(i)[:, 0]

    epoch_seconds = []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        for selection in batches(len(train), args.batch_size, args.seed, epoch):
            u = torch.from_numpy(train.users[selection])
            i = torch.from_numpy(train.items[selection])
            loss = ((predict(u, i) - torch.from_numpy(train.ratings[selection])) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - started)
    with torch.no_grad():
        error = predict(torch.from_numpy(test.users), torch.from_numpy(test.items)).numpy()
    final_rmse = float(np.sqrt(np.mean((error.astype(np.float64) - test.ratings) ** 2)))
    return epoch_seconds, final_rmse, [p.detach().numpy() for p in parameters]
