"""Embedding backends behind one seam; :func:`make_embedding` picks one (only ``sok`` imports SOK)."""

from __future__ import annotations

import warnings

from wd_sok.distributed import Runtime
from wd_sok.embedding.base import EmbeddingCollection, Placement
from wd_sok.feature_spec import TableConfig


def resolve_backend(name: str, world: int, gpu: bool, runtime: Runtime | None = None) -> str:
    """'auto' -> 'sok' with GPUs and a supported SOK (>= 2.0, top-level API), else 'sharded' for >1 rank,
    else 'replicated'. Other names pass through (an explicit 'sok' checks the version when it is built).

    With ``runtime`` (several ranks) 'auto' is agreed by every rank (one tiny allreduce, so every rank must
    call it): 'sok' only if every rank can run it, else every rank takes 'sharded'."""
    if name != "auto":
        return name
    can = False
    if gpu:
        from wd_sok.embedding.sok import supported_sok

        can = supported_sok() is not None
    if runtime is not None and runtime.size > 1:
        can = runtime.min_int(int(can), "auto_backend_sok") == 1
    if can:
        return "sok"
    return "sharded" if world > 1 else "replicated"


def make_embedding(backend: str, tables: list[TableConfig], initializer: str, seed: int,
                   prefix: str, runtime: Runtime | None,
                   placements: dict[str, Placement] | None = None) -> EmbeddingCollection:
    """Build the embedding layer of ``backend`` ('replicated', 'sharded' or 'sok') for ``tables`` (``runtime``
    may be None for a lone replicated model). ``placements`` (feature -> :class:`Placement`, from
    :func:`wd_sok.embedding.plan.make_plan`) places the sharded and SOK backends' fixed tables; row-wise when
    absent. Dynamic tables (``TableConfig.dynamic``) go to hash tables (:mod:`wd_sok.embedding.dynamic`, or
    SOK's under 'sok'), alongside the fixed ones in one collection."""
    if any(t.dynamic is not None for t in tables):
        from wd_sok.embedding.composite import CompositeEmbedding

        fixed = [t for t in tables if t.dynamic is None]
        dynamic = [t for t in tables if t.dynamic is not None]
        parts = [make_embedding(backend, fixed, initializer, seed, prefix, runtime, placements)] if fixed else []
        parts += make_dynamic(backend, dynamic, initializer, seed, prefix, runtime)
        return CompositeEmbedding(tables, parts, initializer, seed, prefix)
    if backend == "replicated":
        from wd_sok.embedding.replicated import ReplicatedEmbedding

        rank, world = (runtime.rank, runtime.size) if runtime is not None else (0, 1)
        return ReplicatedEmbedding(tables, initializer, seed, prefix, rank, world)
    if backend == "sharded":
        from wd_sok.embedding.sharded import ShardedEmbedding

        return ShardedEmbedding(tables, initializer, seed, prefix, runtime, placements)
    if backend == "sok":
        from wd_sok.embedding.sok import SokEmbedding

        return SokEmbedding(tables, initializer, seed, prefix, runtime, placements)
    raise ValueError(f"unknown embedding backend {backend!r} (replicated, sharded, sok)")


def make_dynamic(backend: str, tables: list[TableConfig], initializer: str, seed: int, prefix: str,
                 runtime: Runtime | None) -> list[EmbeddingCollection]:
    """The parts holding a collection's dynamic tables: TF hash tables sharded by key over the ranks
    (:mod:`wd_sok.embedding.dynamic`; for 'replicated' too: a dynamic table has no whole-table copy to
    replicate); under 'sok', SOK's DynamicVariable for the tables it can hold as specified (``min_count: 1,
    evict: lru`` with a power-of-two share of the capacity per rank, :func:`~wd_sok.embedding.sok.sok_refusal`),
    the TF hash tables for the others (with a warning naming the reason)."""
    from wd_sok.embedding.dynamic import DynamicEmbedding

    if backend != "sok":
        return [DynamicEmbedding(tables, initializer, seed, prefix, runtime)]
    from wd_sok.embedding.sok import SokDynamicEmbedding, sok_refusal

    world = runtime.size if runtime is not None else 1
    why = {t.name: sok_refusal(t, world) for t in tables}
    for name, reason in why.items():
        if reason is not None:
            warnings.warn(f"--embedding_backend sok: {prefix} table '{name}' stays on the TF hash tables: {reason}",
                          stacklevel=2)
    held = [t for t in tables if why[t.name] is None]
    rest = [t for t in tables if why[t.name] is not None]
    return ([SokDynamicEmbedding(held, initializer, seed, prefix, runtime)] if held else []) + (
        [DynamicEmbedding(rest, initializer, seed, prefix, runtime)] if rest else [])
