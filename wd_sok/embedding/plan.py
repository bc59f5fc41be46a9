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

Step time (:class:`CostModel`, seconds per step of the slowest rank; the defaults were fitted to this
project's CPU + Gloo ladder, ``benchmarks/embedding_scaling.py``): bytes sent / ``network_bps``; a fixed
``collective_s`` per Horovod collective with more than one rank (the exchange of a collection is 3 fused
alltoalls, whatever its tables, so it is paid once if any table is exchanged; a sparse-reduced replicated
table adds 2 allgathers per collection; a dense-reduced one joins the MLP's fused allreduce); per id looked
up, ``exchange_id_s`` through the exchange (unique, sort, gathers, scatters) or ``local_id_s`` locally; a
dense-reduced table pays ``dense_float_s`` per float of the whole table (densify, dense optimizer pass), a
sparse one ``sparse_table_s`` per collection (its ~25 small ops: unique, segment sums, sparse optimizer).

Policies (``--embedding_plan``): ``row`` (all row-wise), ``replicated`` (all replicated, the cheaper
reduction each), ``auto``: the plan of least modelled step time that fits the budget, found by coordinate
descent over each feature's options (row-wise; replicated, dense or sparse; table-wise on the rank with the
least time so far; table-wise and row-wise only with ``R >= N x MIN_ROWS_PER_SHARD`` for row-wise) from
two starts: all row-wise and all replicated (each table's cheaper reduction). Starting from all-replicated
matters: moving one table out of the exchange saves little, moving the last one saves
the exchange's collectives. A plan that does not fit is refused (:class:`PlanError`, saying by how much).

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
from collections.abc import Iterable
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


@dataclass(frozen=True)
class CostModel:
    """Seconds of a step's embedding work (see the module docstring). Defaults: fitted to the 2-core CPU +
    Gloo ladder (reference vs sharded, 1e4..1e7 rows, benchmarks/README.md); GPUs with NCCL have other
    constants (collectives ~10x cheaper, bandwidth ~100x higher), so a GPU cluster's dry run is only as good
    as these numbers."""

    collective_s: float = 2.5e-3   # one Horovod collective on >1 rank (alltoall, allgather)
    network_bps: float = 0.5e9     # bytes per second one rank sends
    exchange_id_s: float = 100e-9  # per id through the exchange (per collection: wide and deep)
    local_id_s: float = 30e-9      # per id looked up locally (replicated)
    dense_float_s: float = 2.5e-9  # per float of a dense-reduced table, per step (densify, optimizer pass)
    sparse_table_s: float = 0.5e-3  # per table and collection with a sparse gradient (unique, segment sums,
    #                                  the sparse optimizer's gathers and scatters: ~25 small ops)


DEFAULT_COST = CostModel()


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

    def step_seconds(self, cost: CostModel = DEFAULT_COST) -> float:
        """Modelled seconds per step of the embedding work on the slowest rank (see :class:`CostModel`)."""
        return step_seconds(self.tables, self.world_size, cost)

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
                     f"gradients; the MLP allreduce not included); modelled embedding time "
                     f"{self.step_seconds() * 1e3:.3g} ms per step")
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
    free = [t for t in tables if t.name not in fixed]
    starts = [dict(chosen)]
    replicated = dict(chosen)
    for t in free:
        replicated[t.name] = min((_costs(t, "replicated", n, global_batch, reduction=r) for r in ("dense", "sparse")),
                                 key=lambda p: _work(p, 0, n, DEFAULT_COST))
    if _fits(replicated.values(), n, budget_bytes):
        starts.append(replicated)
    best = min((_descend(free, start, n, global_batch, budget_bytes) for start in starts),
               key=lambda c: step_seconds(tuple(c.values()), n, DEFAULT_COST))
    plan = Plan(policy, n, global_batch, budget_bytes, tuple(best[t.name] for t in tables))
    plan.check_fits()
    return plan


def _held(plans: Iterable[TablePlan], n: int) -> list[float]:
    plans = list(plans)
    return [sum(p.bytes_per_rank[r] for p in plans) for r in range(n)]


def _fits(plans: Iterable[TablePlan], n: int, budget_bytes: float) -> bool:
    return budget_bytes <= 0 or max(_held(plans, n)) <= budget_bytes


def _work(p: TablePlan, rank: int, n: int, cost: CostModel) -> float:
    """One feature's modelled seconds on ``rank``, less the exchange's shared alltoalls."""
    exchanged = p.placement in ("row_wise", "table_wise", "dynamic")
    work = 2 * p.lookups_per_rank * (cost.exchange_id_s if exchanged else cost.local_id_s)  # wide and deep
    work += p.sent_per_rank[rank] / cost.network_bps
    if p.placement == "replicated" and p.reduction == "dense":
        work += cost.dense_float_s * p.rows * (p.dim + 1)
    else:  # a sparse gradient, wide and deep
        work += 2 * cost.sparse_table_s
    if p.placement == "replicated" and p.reduction == "sparse" and n > 1:
        work += 4 * cost.collective_s  # values and indices allgathered, wide and deep
    return work


def step_seconds(plans: tuple[TablePlan, ...] | list[TablePlan], n: int, cost: CostModel = DEFAULT_COST) -> float:
    """Modelled seconds per step of ``plans`` on the slowest of ``n`` ranks (see :class:`CostModel`)."""
    per_rank = [sum(_work(p, r, n, cost) for p in plans) for r in range(n)]
    if n > 1 and any(p.placement in ("row_wise", "table_wise", "dynamic") for p in plans):
        per_rank = [t + 6 * cost.collective_s for t in per_rank]  # 3 fused alltoalls x (wide, deep)
    return max(per_rank, default=0.0)


def _options(t: TableConfig, n: int, global_batch: int, chosen: dict[str, TablePlan]) -> list[TablePlan]:
    """The placements ``auto`` considers for ``t`` (table-wise on the rank with the least time so far)."""
    out = [_costs(t, "replicated", n, global_batch, reduction=r) for r in ("dense", "sparse")]
    if n > 1:
        others = [p for name, p in chosen.items() if name != t.name]
        load = [sum(p.sent_per_rank[r] for p in others) for r in range(n)]
        out.append(_costs(t, "table_wise", n, global_batch, owner=min(range(n), key=load.__getitem__)))
    if n == 1 or t.cardinality >= n * MIN_ROWS_PER_SHARD:
        out.append(_costs(t, "row_wise", n, global_batch))
    return out


def _descend(free: list[TableConfig], start: dict[str, TablePlan], n: int, global_batch: int,
             budget_bytes: float) -> dict[str, TablePlan]:
    """Coordinate descent on modelled step time: per feature (largest first), the option of least total time
    that keeps every rank within budget; until nothing changes (at most 4 passes)."""
    chosen = dict(start)
    for _ in range(4):
        changed = False
        for t in sorted(free, key=lambda t: -t.cardinality * row_bytes(t.dim)):
            best, best_s = chosen[t.name], step_seconds(tuple(chosen.values()), n)
            for option in _options(t, n, global_batch, chosen):
                trial = {**chosen, t.name: option}
                if _fits(trial.values(), n, budget_bytes):
                    secs = step_seconds(tuple(trial.values()), n)
                    if secs < best_s * (1 - 1e-9):
                        best, best_s = option, secs
            if best is not chosen[t.name]:
                chosen[t.name], changed = best, True
        if not changed:
            break
    return chosen


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
