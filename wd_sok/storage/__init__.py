"""Where bytes live: local paths and fsspec URLs (s3://, gs://, memory://, ...) behind one small seam.

A *location* is a local path (``str`` or ``Path``; ``file://`` URLs are local paths) or a URL whose scheme
is a registered fsspec protocol. :class:`Store` is rooted at one location and names everything below it
by a relative, ``/``-separated path. Local stores keep the project's disk behaviour: streamed writes go
through :class:`~wd_sok.checkpoint.directio.SequentialWriter` (O_DIRECT where allowed, fsync on close), a
folder is published by renaming a temporary one. Object stores have no rename and no folders: a write is
durable once its PUT (or multipart upload) completes, and what makes a set of objects visible is one
object written last (a checkpoint's manifest, an export's marker), which readers check for.

Credentials and endpoints come from the protocol's own environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) or from keyword
arguments of the protocol's fsspec filesystem given once with :func:`configure` (``--storage_options``
JSON, or ``WD_SOK_STORAGE_OPTIONS``); they are never printed. Every failure of a remote call is a
:class:`StorageError`: one line naming the URL and what went wrong (``NotFound`` for a missing object or
bucket).
"""

from wd_sok.storage.location import (
    Location,
    NotFound,
    StorageError,
    configure,
    errors,
    is_url,
    join,
    local_path,
    options,
    parent,
    protocol,
)
from wd_sok.storage.store import PART_BYTES, Store, Writer, arrow_source, exists, parquet_file, read_text

__all__ = ["PART_BYTES", "Location", "NotFound", "StorageError", "Store", "Writer", "arrow_source", "configure",
           "errors", "exists", "is_url", "join", "local_path", "options", "parent", "parquet_file", "protocol",
           "read_text"]
