"""The persistent cache, bottom to top:

* ``trust`` (who may write what is loaded), ``files`` (the value-file layout, reading a row's bytes),
  ``sqlindex`` (diskcache's index: every SQL statement and connection mode), ``rawdisk``
  (the raw-bytes-only diskcache ``Disk``), ``lru`` (access times written behind), ``lock``;
* ``store`` (the protocols and the in-memory store), ``disk`` (a cache directory: ``DiskStore``),
  ``repair`` (checking and repairing a directory), ``layers`` (read-only layers and listings),
  ``remote`` (the Redis tier), ``envelope`` (the entry format), ``bundle`` (export/import),
  ``stats`` (counters and miss records);
* ``persistent``: what the decorator sees, verified entries or a miss.
"""
