"""``fastemb.distributed``: tables whose rows are split over shards (row r on shard r % S),
each shard owning its rows and their optimizer state, and updating them itself.

``ShardedEmbedding`` and ``ShardedEmbeddingBag`` (and ``ShardedEmbeddingCollection`` and
``ShardedEmbeddingBagCollection``, one per table) run on an engine: ``LocalEngine`` keeps
every shard in this process, ``RayEngine`` makes each shard a Ray actor (``pip install
'fastemb[ray]'``; Ray is imported only by ``RayEngine``, and never initialised for you).
"""

from .checkpoint import load, save
from .collection import ShardedEmbeddingBagCollection, ShardedEmbeddingCollection
from .engine import LocalEngine, RayEngine, ShardLost
from .shard import TableShard
from .table import ShardedEmbedding, ShardedEmbeddingBag

__all__ = ["LocalEngine", "RayEngine", "ShardLost", "ShardedEmbedding", "ShardedEmbeddingBag",
           "ShardedEmbeddingBagCollection", "ShardedEmbeddingCollection", "TableShard", "load",
           "save"]
