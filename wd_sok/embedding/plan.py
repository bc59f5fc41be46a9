"""Placement planner: where each feature's tables live, chosen from a cost model under a per-rank memory budget.

A feature has two tables, looked up with the same ids: wide (width 1, FTRL: 2 slots) and deep (width ``d``,
RMSprop: the ``rms`` slot plus the lazy update's per-row ``last`` step). Both get the same placement, one of:

* ``replicated``: the whole table on every rank (data-parallel), its gradient reduced across ranks, as
  sparse as is cheaper: ring allgather of the rows the batch touched, or a dense ring allreduce;
* ``table_wise(r)``: the whole table on rank ``r`` (SOK's ``localized`` mode); every other rank sends it its
  distinct ids and gets the vectors back;
* ``row_wise``: row ``g`` on rank ``g % N`` (the sharded and SOK backends today).

Cost model, per feature and step (global batch ``B``, ``N`` ranks, local batch ``b = B / N``; ``k`` ids per
sample: 1, or ``max_hotness`` for multi-hot, an upper bound; ``R`` rows):

* **bytes held** per rank: ``rows held x 4 B x (1 + 2 + 2 d + 1)`` (wide value + 2 FTRL slots, deep values
  + ``rms``, ``last``); a dense-reduced replicated table also holds its dense gradient and the reduced copy
  (``2 x R x (d + 1) x 4 B``);
* **lookups**: ``n = b k`` ids per rank, of which ``u = R (1 - (1 - 1/R)^n)`` distinct (uniform ids: an
  upper bound; Zipf-skewed logs repeat more);
* **bytes exchanged** (sent per rank; the exchange sends distinct ids once, see ``sharded.py``):
  row-wise ``u (N - 1) / N x (2 x 8 B keys + 2 x 4 B x (d + 1)`` vectors forward and gradients back);
  replicated ``min(dense: 2 (N - 1) / N x 4 B x R (d + 1), sparse: (N - 1) x u x (2 x 8 B + 4 B x (d + 1)))``;
  table-wise: a non-owner ``u x (2 x 8 B + 4 B x (d + 1))``, the owner ``(N - 1) x u x 4 B x (d + 1)``.

Policies (``--embedding_plan``): ``row`` (all row-wise), ``replicated`` (all replicated), ``auto``: start
row-wise; replicate the features whose replicated exchange is cheaper than their row-wise one, best saving
per extra byte held first, while every rank stays within the budget; put the remaining small tables
(``R < N x MIN_ROWS_PER_SHARD``: row-wise would cut them into near-empty shards) whole on one rank, the one
sending least so far (the same bytes in total over ranks as row-wise, but the owner sends more than the
others, since it answers every rank). A plan that does not fit is refused (:class:`PlanError`, saying by
how much).

A feature whose spec says ``placement: replicated|table_wise|row_wise`` keeps it under every policy (a
table-wise one goes to the rank sending least); a dynamic (hash-table) feature is placed by key hash and
costed as row-wise.

Training with the sharded backend builds its tables from :meth:`Plan.placements` (``--embedding_plan``,
default auto; the budget is ``--device_memory``); the plan is printed at start and recorded per table in the
checkpoint manifest, which stays placement-independent (restore may use another plan).
``python main.py --plan_only --world_size W --device_memory GB [--embedding_plan auto]`` prints the plan for
a cluster that need not be here.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wd_sok.feature_spec import PLACEMENTS, TableConfig

if TYPE_CHECKING:
    from wd_sok.config import Config

POLICIES = ("auto", "row", "replicated")
MIN_ROWS_PER_SHARD = 1024
WIDE_FLOATS_PER_ROW = 3   # value + FTRL accumulator + linear
KEY_BYTES = 8


@dataclass(frozen=True)
class Placement:
    """Where one table lives (chosen by :mod:`wd_sok.embedding.plan`; the model never sees it).

    Attributes:
        kind: "row_wise" (row g on rank g % N), "table_wise" (the whole table on rank ``owner``) or
            "replicated" (the whole table on every rank, its gradient reduced across ranks).
        owner: the rank holding a table-wise table.
        reduction: a replicated table's gradient reduction, "sparse" (allgather of the rows each rank touched,
            summed per distinct id first) or "dense" (allreduce of the whole [rows, dim] gradient).
    """

    kind: str = "row_wise"
    owner: int = 0
    reduction: str = "sparse"

    def describe(self) -> dict[str, object]:
        """What the checkpoint manifest records for the table."""
        out: dict[str, object] = {"kind": self.kind}
        if self.kind == "table_wise":
            out["owner"] = self.owner
        if self.kind == "replicated":
            out["reduction"] = self.reduction
        return out


ROW_WISE = Placement()


class PlanError(ValueError):
    """A plan that does not fit the per-rank memory budget (the message says by how much)."""


def row_bytes(dim: int) -> int:
    """Bytes one row of a feature costs where it is held: wide (value + 2 FTRL slots) + deep (values, rms, last)."""
    return 4 * (WIDE_FLOATS_PER_ROW + 2 * dim + 1)


def distinct_ids(n: float, rows: int) -> float:
    """Expected distinct ids among ``n`` uniform draws from ``rows`` rows, ``R (1 - (1 - 1/R)^n)`` (an upper
    bound for skewed ids)."""
    if n <= 0 or rows <= 0:
        return 0.0
    if rows == 1:
        return 1.0
    return rows * -math.expm1(n * math.log1p(-1.0 / rows))


@dataclass(frozen=True)
class TablePlan:
    """One feature's placement and its costs.

    Attributes:
        name, rows, dim: the feature's table (deep width ``dim``; its wide table has width 1).
        placement: "replicated", "table_wise" or "row_wise".
        ranks: the ranks holding rows (one for table-wise; all for the others).
        bytes_total: the table's bytes incl. optimizer slots, all copies counted once (``rows x row_bytes``).
        bytes_per_rank: [N] bytes held by each rank.
        lookups_per_rank: ids looked up per rank per step; ``distinct_per_rank``: of which distinct.
        sent_per_rank: [N] bytes each rank sends per step for this feature.
        reduction: for replicated, "dense" or "sparse" (the cheaper gradient reduction); else "".
    """

    name: str
    rows: int
    dim: int
    placement: str
    ranks: tuple[int, ...]
    bytes_total: int
    bytes_per_rank: tuple[float, ...]
    lookups_per_rank: float
    distinct_per_rank: float
    sent_per_rank: tuple[float, ...]
    reduction: str = ""


@dataclass(frozen=True)
class Plan:
    """Every feature's :class:`TablePlan` for ``world_size`` ranks and a budget of ``budget_bytes`` per rank
    (0: unlimited)."""

    policy: str
    world_size: int
    global_batch: int
    budget_bytes: float
    tables: tuple[TablePlan, ...] = field(default=())

    def placements(self) -> dict[str, Placement]:
        """Feature -> :class:`Placement` for the backends (dynamic features are placed by their own backend)."""
        return {t.name: Placement(t.placement, t.ranks[0] if t.placement == "table_wise" else 0,
                                  t.reduction or "sparse")
                for t in self.tables if t.placement in PLACEMENTS}

    def bytes_per_rank(self) -> list[float]:
        """[N] bytes held per rank, all features."""
        return [sum(t.bytes_per_rank[r] for t in self.tables) for r in range(self.world_size)]

    def sent_per_rank(self) -> list[float]:
        """[N] bytes sent per rank per step, all features (embedding exchange and table gradients)."""
        return [sum(t.sent_per_rank[r] for t in self.tables) for r in range(self.world_size)]

    def check_fits(self) -> None:
        """Raise :class:`PlanError` naming the fullest rank and the shortfall if a rank exceeds the budget."""
        if self.budget_bytes <= 0:
            return
        held = self.bytes_per_rank()
        worst = max(range(self.world_size), key=held.__getitem__)
        if held[worst] > self.budget_bytes:
            raise PlanError(f"embedding plan '{self.policy}' does not fit: rank {worst} needs "
                            f"{held[worst] / 1e9:.3f} GB for its tables, {self.budget_bytes / 1e9:.3f} GB per rank "
                            f"available: {(held[worst] - self.budget_bytes) / 1e9:.3f} GB short")

    def format(self) -> str:
        """The plan as a text table, then the projected bytes per rank."""
        lines = [f"embedding plan '{self.policy}': {len(self.tables)} features, {self.world_size} ranks, global "
                 f"batch {self.global_batch}, budget "
                 + (f"{self.budget_bytes / 1e9:.3f} GB per rank" if self.budget_bytes > 0 else "unlimited"),
                 f"{'table':24s} {'rows':>14s} {'dim':>5s} {'bytes':>12s} {'placement':>18s} {'ranks':>9s} "
                 f"{'distinct ids/rank':>17s} {'sent B/rank/step':>16s}"]
        for t in self.tables:
            where = t.placement + (f"({t.reduction})" if t.reduction else "")
            ranks = (f"{t.ranks[0]}" if len(t.ranks) == 1 else f"0-{self.world_size - 1}")
            lines.append(f"{t.name:24s} {t.rows:14,d} {t.dim:5d} {t.bytes_total:12.4g} {where:>18s} {ranks:>9s} "
                         f"{t.distinct_per_rank:17,.0f} {max(t.sent_per_rank):16.4g}")
        held, sent = self.bytes_per_rank(), self.sent_per_rank()
        lines.append(f"projected per rank: tables held {min(held) / 1e9:.4g} .. {max(held) / 1e9:.4g} GB; sent per "
                     f"step {min(sent) / 1e6:.4g} .. {max(sent) / 1e6:.4g} MB (embedding exchange and table "
                     f"gradients; the MLP allreduce not included)")
        return "\n".join(lines)


def _costs(table: TableConfig, placement: str, world: int, global_batch: int, owner: int = 0,
           reduction: str = "") -> TablePlan:
    """The :class:`TablePlan` of ``table`` under ``placement`` (replicated: the cheaper reduction unless given)."""
    n, rows, d = world, table.cardinality, table.dim
    rb = row_bytes(d)
    lookups = global_batch / n * (table.max_hotness if table.multihot else 1)
    u = distinct_ids(lookups, rows)
    vec = 4.0 * (d + 1)  # one wide + one deep vector (or gradient)
    if placement in ("row_wise", "dynamic"):  # a dynamic table's keys spread over ranks by hash
        held = tuple(float(math.ceil(max(rows - r, 0) / n) * rb) for r in range(n))
        sent = tuple(u * (n - 1) / n * (2 * KEY_BYTES + 2 * vec) for _ in range(n))
        ranks = tuple(range(n))
    elif placement == "table_wise":
        held = tuple(float(rows * rb) if r == owner else 0.0 for r in range(n))
        sent = tuple((n - 1) * u * vec if r == owner else u * (2 * KEY_BYTES + vec) for r in range(n))
        ranks = (owner,)
    elif placement == "replicated":
        dense = 2.0 * (n - 1) / n * vec * rows
        sparse = (n - 1) * u * (2 * KEY_BYTES + vec)
        reduction = reduction or ("dense" if dense < sparse else "sparse")
        extra = 2.0 * rows * vec if reduction == "dense" and n > 1 else 0.0
        held = tuple(float(rows * rb) + extra for _ in range(n))
        sent = tuple((dense if reduction == "dense" else sparse) for _ in range(n))
        ranks = tuple(range(n))
    else:
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS} or 'dynamic'")
    if n == 1:
        sent = (0.0,)
    return TablePlan(table.name, rows, d, placement, ranks, rows * rb, held, lookups, u, sent,
                     reduction if placement == "replicated" else "")


def make_plan(tables: list[TableConfig], world_size: int, global_batch: int, budget_bytes: float = 0.0,
              policy: str = "auto") -> Plan:
    """The plan of ``policy`` for ``tables`` (deep widths) on ``world_size`` ranks; raises PlanError if it does
    not fit ``budget_bytes`` per rank (0: unlimited). See the module docstring for the cost model."""
    if policy not in POLICIES:
        raise ValueError(f"unknown embedding plan {policy!r}; expected one of {POLICIES}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    n = world_size
    fixed = {t.name for t in tables if t.placement or t.dynamic is not None}  # the spec decides these
    start = "replicated" if policy == "replicated" else "row_wise"
    chosen = {t.name: _costs(t, "dynamic" if t.dynamic is not None else t.placement or start, n, global_batch)
              for t in tables}
    for name, p in list(chosen.items()):  # table-wise overrides: the rank sending least so far answers
        if p.placement == "table_wise" and n > 1:
            sent = [sum(q.sent_per_rank[r] for q in chosen.values() if q.placement != "table_wise")
                    for r in range(n)]
            chosen[name] = _costs(next(t for t in tables if t.name == name), "table_wise", n, global_batch,
                                  owner=min(range(n), key=sent.__getitem__))
    if policy != "auto":
        plan = Plan(policy, n, global_batch, budget_bytes, tuple(chosen[t.name] for t in tables))
        plan.check_fits()
        return plan
    Plan(policy, n, global_batch, budget_bytes, tuple(chosen.values())).check_fits()  # the least memory there is
    held = [sum(p.bytes_per_rank[r] for p in chosen.values()) for r in range(n)]

    def room(plan_new: TablePlan, plan_old: TablePlan) -> bool:
        return budget_bytes <= 0 or all(held[r] - plan_old.bytes_per_rank[r] + plan_new.bytes_per_rank[r]
                                        <= budget_bytes for r in range(n))

    def swap(plan_new: TablePlan) -> None:
        old = chosen[plan_new.name]
        for r in range(n):
            held[r] += plan_new.bytes_per_rank[r] - old.bytes_per_rank[r]
        chosen[plan_new.name] = plan_new

    # 1. replicate where the gradient reduction is cheaper than the exchange: best saving per extra byte first
    offers = []
    for t in (t for t in tables if t.name not in fixed):
        rep, row = _costs(t, "replicated", n, global_batch), chosen[t.name]
        saving = max(row.sent_per_rank) - max(rep.sent_per_rank)
        if n == 1 or saving > 0:
            extra = max(rep.bytes_per_rank) - max(row.bytes_per_rank)
            offers.append((-(saving + 1.0) / max(extra, 1.0), t.name, rep))
    for _, name, rep in sorted(offers):
        if room(rep, chosen[name]):
            swap(rep)
    # 2. small tables left row-wise: whole on the least-loaded rank
    for t in sorted(tables, key=lambda t: -t.cardinality * row_bytes(t.dim)):
        if (chosen[t.name].placement == "row_wise" and t.name not in fixed and n > 1
                and t.cardinality < n * MIN_ROWS_PER_SHARD):
            sent = [sum(p.sent_per_rank[r] for p in chosen.values()) for r in range(n)]
            owner = min(range(n), key=lambda r: (sent[r], held[r]))  # the owner answers every rank
            whole = _costs(t, "table_wise", n, global_batch, owner=owner)
            if room(whole, chosen[t.name]):
                swap(whole)
    plan = Plan(policy, n, global_batch, budget_bytes, tuple(chosen[t.name] for t in tables))
    plan.check_fits()
    return plan


def plan_main(cfg: Config) -> int:
    """``main.py --plan_only``: print the plan of ``cfg``'s feature spec for ``--world_size`` ranks and
    ``--device_memory`` GB per rank; exit 2 with one line naming the problem if the spec is bad or the plan
    does not fit."""
    from pathlib import Path

    from wd_sok.feature_spec import FeatureSpec, SpecError

    try:
        spec = FeatureSpec.from_yaml(Path(cfg.dataset_path) / cfg.fspec_file, validate=False)
        tables = spec.tables(spec.embedding_dims(cfg.embedding_sizes_file or None), cfg.combiner)
        plan = make_plan(tables, cfg.world_size or 1, cfg.global_batch_size, cfg.device_memory * 1e9,
                         cfg.embedding_plan or "auto")
    except (SpecError, PlanError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.format())
    return 0
