"""The persistent cache: stores (bytes in, bytes out), the entry envelope, read-only layers and
bundles, the Redis tier, per-key locks, the trust rule, statistics and LRU bookkeeping.
:mod:`jitfreeze.cache.persistent` is what the decorator sees: verified entries or a miss."""
