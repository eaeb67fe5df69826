"""``fastemb.distributed``: tables whose rows are split over shards (row r on shard r % S),
each shard owning its rows and their optimizer state, and updating them itself.

``ShardedEmbeddingBag`` runs on an engine: ``LocalEngine`` keeps every shard in this process.
"""

from .engine import LocalEngine
from .shard import TableShard
from .table import ShardedEmbeddingBag

__all__ = ["LocalEngine", "ShardedEmbeddingBag", "TableShard"]
