"""The training loop: build, (resume), train epoch by epoch with evaluation and checkpoints, or benchmark.

Read top to bottom: :class:`Trainer` builds the model around an embedding backend, ``fit`` runs the epochs,
``evaluate`` computes BCE / AUC / MAP@12 over all ranks, ``benchmark_*`` time steps. Rank 0 logs and writes.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from wd_sok import checkpoint, startup, storage
from wd_sok.checkpoint import lineage
from wd_sok.checkpoint.policy import DeltaPolicy
from wd_sok.config import Config
from wd_sok.data.batch import Batch, head, pad_batch, real_rows
from wd_sok.data.loader import DataLoader
from wd_sok.distributed import Runtime
from wd_sok.embedding import make_embedding, resolve_backend
from wd_sok.embedding.plan import make_plan
from wd_sok.feature_spec import TEST, TRAIN, FeatureSpec, SpecError
from wd_sok.metrics import StreamingAuc, StreamingBce, StreamingMap, auc_from_counts
from wd_sok.model import WideDeepModel
from wd_sok.optim import LazyRMSprop
from wd_sok.reporting import Reporter
from wd_sok.schedule import DeepLrSchedule
from wd_sok.state import dense_state, import_dense, table_states
from wd_sok.steps import make_eval_step, make_train_step


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; a checkpoint was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def batch_size_problems(cfg: Config, ranks: int) -> str:
    """The batch sizes this run uses that do not divide evenly over ``ranks`` ('' if none): evaluation uses
    only --eval_batch_size, so ``--evaluate`` under N ranks never refuses a training batch it does not use."""
    used = ["eval_batch_size"] if cfg.evaluate else ["global_batch_size", "eval_batch_size"]
    bad = [f"--{name} {getattr(cfg, name)}" for name in used if getattr(cfg, name) % ranks]
    return f"{' and '.join(bad)} must divide evenly over {ranks} ranks" if bad else ""


class Trainer:
    """Everything one run needs, built from the config and the feature spec."""

    def __init__(self, cfg: Config, runtime: Runtime, error: str | None = None) -> None:
        """Local checks (spec, batch sizes, files; no collectives), then every rank agrees to start or all
        raise :class:`~wd_sok.startup.StartupError` (``error``: a failure the caller found first)."""
        self.cfg, self.rt = cfg, runtime
        self.log = Reporter(cfg.results_dir, cfg.log_filename, enabled=False)  # silent until attach()
        # --embedding_backend auto, agreed by every rank (sok only if every rank can run it): a collective that
        # every rank reaches, before any local check can fail
        gpu = bool(tf.config.list_physical_devices("GPU")) and not cfg.cpu
        self.backend = resolve_backend(cfg.embedding_backend, runtime.size, gpu, runtime)
        try:
            if error is None:
                self._local_setup(cfg, runtime)
        except (SpecError, ValueError, OSError) as e:
            error = str(e)
        startup.agree(runtime, error)
        for loader in (self.train_data, self.eval_data):  # every rank starts: remember the passed files
            loader.commit_checks()
        cat = self.spec.categorical
        wide_tables = self.spec.tables(dict.fromkeys(cat, 1), combiner="sum")
        deep_tables = self.spec.tables(self.dims, combiner=cfg.combiner)
        placements = self.plan.placements() if self.plan is not None else None
        self.model = WideDeepModel(
            cat, len(self.spec.numerical),
            make_embedding(self.backend, wide_tables, "zeros", cfg.seed, "wide", runtime, placements),
            make_embedding(self.backend, deep_tables, "glorot_normal", cfg.seed, "deep", runtime, placements),
            cfg.deep_hidden_units, cfg.deep_dropout, compute_dtype=self.compute, seed=cfg.seed, rank=runtime.rank,
            xla=cfg.xla)
        self.wide_opt = tf.keras.optimizers.legacy.Ftrl(cfg.linear_learning_rate)
        rmsprop = (functools.partial(LazyRMSprop, tables=self.model.deep_embedding.trainable_variables)
                   if cfg.rmsprop_update == "lazy" else tf.keras.optimizers.legacy.RMSprop)
        self.deep_opt = rmsprop(
            DeepLrSchedule(steps_per_epoch=max(self.steps_per_epoch, 1), base_lr=cfg.deep_learning_rate,
                           warmup_epochs=cfg.deep_warmup_epochs, num_epochs=cfg.num_epochs), rho=0.5)
        for emb, opt in ((self.model.wide_embedding, self.wide_opt), (self.model.deep_embedding, self.deep_opt)):
            emb.attach_optimizer(opt)  # dynamic tables reset a row's slots when the row changes key
        self._dynamic_seen: dict[str, np.ndarray] = {}
        self.train_step = make_train_step(self.model, self.wide_opt, self.deep_opt, runtime,
                                          cfg.global_batch_size, loss_scaling=self.compute == "float16")
        self.eval_step = make_eval_step(self.model)
        self.epoch, self.step_in_epoch = 0, 0
        self.saved_step, self.restored = -1, ""
        self.delta_policy = DeltaPolicy(cfg.full_checkpoint_ratio, cfg.full_checkpoint_every)  # full or delta saves
        # lineage: this run's id (a resume takes the checkpoint's), and with --overwrite what it replaces once
        # its first checkpoint is committed (rank 0 lists, rank 0 deletes)
        self.run_id = runtime.broadcast_object(lineage.new_run_id() if runtime.is_chief else "", "run_id")
        self.spec_fingerprint = lineage.spec_fingerprint(self.spec.to_dict())
        self.replaces: list = []
        if runtime.is_chief:  # before any rank can save: what killed saves left behind goes
            checkpoint.clean_temporaries(cfg.model_dir)
            if cfg.overwrite:
                self.replaces = lineage.overwritten(cfg.model_dir)
        self._build()

    # ------------------------------------------------------------------ setup
    def _local_setup(self, cfg: Config, runtime: Runtime) -> None:
        """Everything start-up checks on this rank alone: raises SpecError / ValueError naming the problem."""
        self.spec = FeatureSpec.from_yaml(storage.join(cfg.dataset_path, cfg.fspec_file))
        self.spec.validate()  # any number of files works for any number of ranks (row-range sharding)
        gpu = bool(tf.config.list_physical_devices("GPU")) and not cfg.cpu
        self.compute = "float32" if not cfg.amp else ("float16" if gpu else "bfloat16")
        uneven = batch_size_problems(cfg, runtime.size)
        if uneven:
            raise ValueError(uneven)
        self.local_batch = cfg.global_batch_size // runtime.size
        with_map = cfg.map_calculation_enabled
        self.train_data = DataLoader(self.spec, TRAIN, self.local_batch, runtime.rank, runtime.size,
                                     shuffle=True, seed=cfg.seed, drop_last=True, nan_policy=cfg.nan_policy,
                                     commit_checks=False)
        self.local_eval_batch = cfg.eval_batch_size // runtime.size
        self.eval_data = DataLoader(self.spec, TEST, self.local_eval_batch, runtime.rank,
                                    runtime.size, with_map=with_map, nan_policy=cfg.nan_policy,
                                    commit_checks=False)
        # every rank reads T // N or T // N + 1 rows: the smallest share sets the steps (no collective)
        cuts = self.train_data.cuts
        self.steps_per_epoch = min(b - a for a, b in zip(cuts, cuts[1:], strict=False)) // self.local_batch
        if self.steps_per_epoch == 0 and not cfg.evaluate:
            raise ValueError(f"--global_batch_size {cfg.global_batch_size} is larger than the training set "
                             f"({self.train_data.total_rows} rows over {runtime.size} rank(s)); lower it")
        self.dims = self.spec.embedding_dims(cfg.embedding_sizes_file or None)
        self.plan = None  # where the sharded backend's tables live (the replicated backend: everywhere)
        if self.backend in ("sharded", "sok"):
            policy = cfg.embedding_plan or ("auto" if self.backend == "sharded" else "row")
            self.plan = make_plan(self.spec.tables(self.dims, cfg.combiner), runtime.size, cfg.global_batch_size,
                                  cfg.device_memory * 1e9, policy)

    @property
    def rows_per_epoch(self) -> int:
        """Training rows used per epoch (all ranks): the rest, under one global batch, is dropped."""
        return self.steps_per_epoch * self.local_batch * self.rt.size

    def _build(self) -> None:
        """Create every variable (one forward pass on a slice of data) and agree on dense weights."""
        first = self.eval_data.first()
        self._eval_template = head(first, 0)  # what a rank whose test files ran out pads from
        self.model(_head(first, 2), training=False)  # 2 rows on every rank: equal shapes for the collectives
        self.rt.broadcast_variables(self.model.dense_variables)

    def attach(self, reporter: Reporter) -> None:
        """Start reporting: the resolved configuration and run facts go to the log first."""
        self.log = reporter
        total = self.train_data.total_rows
        self.log.params({"backend": self.backend, "ranks": self.rt.size, "steps_per_epoch": self.steps_per_epoch,
                         "train_rows": total, "train_rows_per_epoch": self.rows_per_epoch,
                         "parameters": self.parameter_count(), **_jsonable(self.cfg)})
        self.log.info(f"{self.parameter_count():,} parameters, backend {self.backend}, {self.rt.size} rank(s), "
                      f"{self.steps_per_epoch} steps/epoch of {self.local_batch * self.rt.size} samples: "
                      f"{self.rows_per_epoch:,} of {total:,} training rows per epoch")
        if self.plan is not None:
            for line in self.plan.format().splitlines():
                self.log.info(line)
        if self.restored:
            self.log.info(self.restored)

    def parameter_count(self) -> int:
        """Total (global) parameters: whole tables plus dense weights."""
        tables = [t for e in (self.model.wide_embedding, self.model.deep_embedding) for t in e.tables.values()]
        return int(sum(t.cardinality * t.dim for t in tables)
                   + sum(int(np.prod(v.shape)) for v in self.model.named_dense_variables().values()))

    def restore(self, optional: bool = False) -> None:
        """Collective: load the latest usable checkpoint of model_dir; each rank reads only its own rows.

        ``optional`` (``--use_checkpoint auto``): a model_dir holding no checkpoint at all starts fresh; one
        holding only unusable checkpoints is still an error (their state is not silently dropped).
        """
        try:
            manifest, path = checkpoint.restore_latest(
                self.cfg.model_dir, table_states(self.model, self.wide_opt, self.deep_opt),
                lambda arrays, origin: import_dense(self.model, self.wide_opt, self.deep_opt, arrays, origin),
                self.rt)
        except checkpoint.NoCheckpoint:
            if not optional:
                raise
            return
        self.epoch, self.step_in_epoch = int(manifest["epoch"]), int(manifest["step_in_epoch"])
        self.saved_step = self.global_step
        self.delta_policy.restored(manifest, path, table_states(self.model, self.wide_opt, self.deep_opt),
                                   self.rt.size)
        self.run_id = str(manifest.get("run") or self.run_id)  # the resumed run's lineage goes on
        changed = _changed_flags(manifest.get("config", {}), _jsonable(self.cfg))
        self.restored = (f"restored {path} (run {self.run_id}, epoch {self.epoch}, step {self.global_step}; "
                         f"written by {manifest['world_size']} rank(s), backend {manifest.get('backend')})"
                         + (f"; flags changed since: {changed}" if changed else ""))
        self.log.info(self.restored)

    @property
    def global_step(self) -> int:
        return int(self.deep_opt.iterations.numpy())

    def save(self, preempted: bool = False, periodic: bool = False) -> dict | None:
        """Collective: every rank writes its own rows of every table and slot; rank 0 the rest + manifest. A
        delta (the rows changed since the last full checkpoint) when :class:`DeltaPolicy` says so: only a
        ``periodic`` (--checkpoint_steps) or ``preempted`` (SIGINT / SIGTERM) save may be one.

        Returns the writer's figures (:func:`wd_sok.checkpoint.save`), or None if this state is saved already.
        """
        if self.saved_step == self.global_step:
            return None
        states = table_states(self.model, self.wide_opt, self.deep_opt)
        base = self.delta_policy.choose(states, self.rt, preempted) if preempted or periodic else None
        meta = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "seed": self.cfg.seed, "config": _jsonable(self.cfg), "backend": self.backend,
                "embedding_plan": self.plan.policy if self.plan is not None else "replicated",
                **lineage.lineage_fields(self.run_id, 0, self.spec_fingerprint),
                **self.delta_policy.meta(base)}
        dense = dense_state(self.model, self.wide_opt, self.deep_opt) if self.rt.is_chief else None
        with self.rt.phase("save", long=True):  # ranks write different amounts; rank 0 also the manifest
            out = checkpoint.save(self.cfg.model_dir, self.global_step, states, dense, meta, self.rt,
                                  keep=self.cfg.keep_checkpoints, base=base)
        self.saved_step = self.global_step
        self.delta_policy.saved(out["path"], base, states)
        rate = out["bytes"] / max(out["seconds"], 1e-9) / 1e6
        self.log.info(f"saved {out['path']} ({self.delta_policy.describe(base)}{out['total_bytes'] / 2**20:,.1f} "
                      f"MiB; rank 0 wrote {out['bytes'] / 2**20:,.1f} MiB at {rate:,.0f} MB/s)")
        if self.replaces and self.rt.is_chief:  # --overwrite: the earlier run's checkpoints go only now
            removed = lineage.remove(self.replaces)
            self.log.info(f"--overwrite: removed the {removed} checkpoint(s) that were in {self.cfg.model_dir}")
        self.replaces = []
        return out

    def agreed_stop(self, stop: _StopFlag) -> int:
        """Collective (one tiny allreduce): the signal number any rank received, else 0. Every rank calls it
        at the same points, so all of them stop after the same step."""
        stop.agreed = max(stop.agreed, self.rt.max_int(stop.signum, "stop_signal"))
        return stop.agreed

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, float]:
        """Train from (epoch, step_in_epoch) to num_epochs, evaluating and checkpointing every epoch.

        SIGINT / SIGTERM on any rank (horovodrun forwards them to every rank and kills the ranks 5 s later):
        all ranks agree after the current train or eval step, save one checkpoint (unless this state was just
        saved) and raise :class:`Interrupted`.
        """
        cfg, metrics = self.cfg, {}
        stop = _StopFlag()
        samples_per_step = self.local_batch * self.rt.size
        compiled = False  # the first step traces and compiles: ranks may take very different times
        try:
            while self.epoch < cfg.num_epochs:
                self.train_data.set_epoch(self.epoch)
                t0, seen, loss_sum = time.perf_counter(), 0, 0.0
                for i, batch in zip(range(self.steps_per_epoch), self.train_data, strict=False):
                    if i < self.step_in_epoch:  # resuming mid-epoch: skip what was already trained on
                        continue
                    with self.rt.phase("train" if compiled else "first step", long=not compiled):
                        loss_sum += float(self.train_step(batch, tf.constant(self.global_step, tf.int64)))
                    self.step_in_epoch, seen, compiled = i + 1, seen + 1, True
                    if self.step_in_epoch % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                        loss = self.rt.sum_host(np.array([loss_sum, seen]), "train_loss")
                        rate = seen * samples_per_step / (time.perf_counter() - t0)
                        self.log.step([self.epoch, self.step_in_epoch], {
                            "loss": loss[0] / (loss[1] * self.local_batch), "train_throughput": rate,
                            "deep_lr": float(self.deep_opt._decayed_lr(tf.float32)),  # noqa: SLF001
                            "eta_s": (self.steps_per_epoch - self.step_in_epoch) * samples_per_step / rate},
                            global_step=self.global_step)
                        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
                    if cfg.checkpoint_steps and self.global_step % cfg.checkpoint_steps == 0:
                        self.save(periodic=True)
                    if self.agreed_stop(stop) or (cfg.max_steps and self.global_step >= cfg.max_steps):
                        break
                if stop.agreed:
                    self._interrupt(stop)
                if self.step_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.save()
                metrics = self.evaluate(should_stop=lambda: self.agreed_stop(stop))
                if stop.agreed:  # the state was saved just before the evaluation
                    self._interrupt(stop)
                self.log.epoch_end(self.epoch, metrics)
                self.log_dynamic()
                if cfg.max_steps and self.global_step >= cfg.max_steps:
                    break
            if not metrics:  # resumed after the last epoch's save, before its evaluation finished
                metrics = self.evaluate(should_stop=lambda: self.agreed_stop(stop))
                if stop.agreed:
                    self._interrupt(stop)
                self.log.epoch_end(self.epoch, metrics)
        finally:
            stop.restore()
        return metrics

    def log_dynamic(self) -> dict[str, np.ndarray]:
        """Collective (one allreduce, only with dynamic tables): per dynamic table, the inserts, admissions
        and evictions since the last call and the rows in use, summed over ranks; rank 0 logs them.

        Returns ``{"<prefix>/<feature>": [inserts, admissions, evictions, rows in use]}`` (int64)."""
        counters = {f"{e.prefix}/{n}": c for e in (self.model.wide_embedding, self.model.deep_embedding)
                    for n, c in e.counters().items()}
        if not counters:
            return {}
        keys = sorted(counters)  # every rank has the same tables
        total = self.rt.sum_host(np.concatenate([counters[k] for k in keys]), "dynamic_counters").astype(np.int64)
        out = {}
        for i, key in enumerate(keys):
            now = total[4 * i:4 * i + 4]
            prev = self._dynamic_seen.get(key, np.zeros(4, np.int64))
            out[key] = np.append(now[:3] - prev[:3], now[3])
            self._dynamic_seen[key] = now
            self.log.info(f"dynamic table {key}: epoch {self.epoch}: {out[key][0]:,} inserts, {out[key][1]:,} "
                          f"admissions, {out[key][2]:,} evictions; {now[3]:,} rows in use")
        return out

    def _interrupt(self, stop: _StopFlag) -> None:
        self.save(preempted=True)
        raise Interrupted(f"signal {stop.agreed}: checkpoint saved at epoch {self.epoch} step "
                          f"{self.step_in_epoch} (global step {self.global_step})", stop.agreed)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, should_stop: Callable[[], int] | None = None) -> dict[str, float]:
        """BCE, AUC and (exact) MAP@12 over the whole test mapping, summed over ranks.

        Every rank runs the same number of steps on batches of exactly the local eval batch size (short and
        "ran out" batches padded, :meth:`eval_batches`); padded rows are dropped before any metric sees them.
        ``should_stop`` (a collective every rank calls after each step) ends the evaluation early: {}.
        """
        bce, auc = StreamingBce(), StreamingAuc(self.cfg.num_auc_thresholds)
        mapk = StreamingMap(k=12) if self.cfg.map_calculation_enabled else None
        for batch in self.eval_batches():
            probs = self.eval_step(batch).numpy()
            probs, labels = real_rows(batch, probs, batch.label.numpy())
            if probs.size == 0:
                if should_stop is not None and should_stop():
                    return {}
                continue
            bce.update(probs, labels)
            auc.update(probs, labels)
            if mapk is not None:
                (map_ids,) = real_rows(batch, batch.map_ids.numpy())
                mapk.update(map_ids, probs, labels)
            if should_stop is not None and should_stop():
                return {}
        out = {}
        b = self.rt.sum_host(bce.sums(), "eval_bce")
        out["loss_val"] = float(b[0] / max(b[1], 1))
        out["auc_roc"] = float(auc_from_counts(self.rt.sum_host(auc.counts(), "eval_auc")))
        if mapk is not None:
            mapk.finalize()
            s = self.rt.sum_host(mapk.sums(), "eval_map")
            out["streaming_map_val"] = float(s[0] / max(s[1], 1))
            out["map_groups"], out["map_skipped_no_click"], out["map_skipped_multi_click"] = (
                int(s[1]), int(s[2]), int(s[3]))
            if s[2] or s[3]:
                self.log.info(f"warning: MAP@12 is undefined for {int(s[2])} display group(s) without a click "
                              f"and {int(s[3])} with several; they were skipped (map_skipped_* in the log)")
        return out

    def eval_batches(self) -> Iterator[Batch]:
        """One pass over this rank's test files as exactly ``eval_steps`` batches of ``local_eval_batch`` rows.

        ``eval_steps`` is the largest per-rank batch count (agreed collectively), so every rank runs every
        collective lookup with the same shapes: a rank's final partial batch is padded, and a rank that has run
        out feeds batches of padding only (mask 0, id 0, empty multi-hot rows).
        """
        steps = self.rt.max_int(len(self.eval_data), "eval_steps")
        batches = iter(self.eval_data)
        for _ in range(steps):
            batch = next(batches, None)
            yield pad_batch(self._eval_template if batch is None else batch, self.local_eval_batch)

    # ------------------------------------------------------------------ benchmark
    def benchmark_train(self) -> float:
        """Samples/s over benchmark_steps training steps after benchmark_warmup_steps.

        Each timed step's seconds (loader wait included; a step ends when its loss is on the host) are kept in
        ``self.benchmark_step_s`` (``benchmark_steps`` floats), for a median that one slow step cannot move.
        """
        cfg, done, t0 = self.cfg, 0, 0.0
        total = cfg.benchmark_warmup_steps + cfg.benchmark_steps
        epoch = 0
        self.benchmark_step_s: list[float] = []
        while done < total:
            self.train_data.set_epoch(epoch)
            t_prev = time.perf_counter()
            for _, batch in zip(range(self.steps_per_epoch), self.train_data, strict=False):
                if done == cfg.benchmark_warmup_steps:
                    t0 = t_prev
                self.train_step(batch, tf.constant(done, tf.int64)).numpy()
                t_now = time.perf_counter()
                if done >= cfg.benchmark_warmup_steps:
                    self.benchmark_step_s.append(t_now - t_prev)
                t_prev = t_now
                done += 1
                if done >= total:
                    break
            epoch += 1
        rate = cfg.benchmark_steps * self.local_batch * self.rt.size / (time.perf_counter() - t0)
        self.log.step([], {"train_throughput": rate})
        return rate

    def benchmark_eval(self) -> float:
        """Samples/s of the evaluation forward pass (warm-up batches excluded; padding rows not counted).

        Passes over the test files repeat (each of the same, collectively agreed, step count) until
        benchmark_warmup_steps + benchmark_steps steps have run: the same number on every rank.
        """
        cfg, done, rows, t0 = self.cfg, 0, 0, 0.0
        total = cfg.benchmark_warmup_steps + cfg.benchmark_steps
        while done < total:
            for batch in self.eval_batches():
                if done == cfg.benchmark_warmup_steps:
                    t0, rows = time.perf_counter(), 0
                self.eval_step(batch).numpy()
                done, rows = done + 1, rows + batch.real_size
                if done >= total:
                    break
        rate = self.rt.sum_host(np.array([rows]), "bench_rows")[0] / (time.perf_counter() - t0)
        self.log.step([], {"validation_throughput": rate})
        return float(rate)


def _head(batch: Batch, n: int) -> Batch:
    """Exactly ``n`` rows: the first ``n`` of ``batch``, padded (masked) if it has fewer."""
    return pad_batch(head(batch, n), n)


def _changed_flags(saved: dict, now: dict) -> str:
    """'flag old -> new, ...' for the flags a resume changes (up to 6; how to resume is not a change)."""
    same = {"use_checkpoint", "overwrite", "debug", "storage_options"}
    diff = [f"--{k} {saved[k]} -> {now[k]}" for k in sorted(now) if k in saved and k not in same
            and saved[k] != now[k]]
    return ", ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")


def _jsonable(cfg: Config) -> dict:
    return cfg.public()  # storage credentials are never logged nor saved


class _StopFlag:
    """Turns SIGINT / SIGTERM into a flag; the ranks agree on it after each step (then save and exit)."""

    def __init__(self) -> None:
        self.requested, self.signum, self.agreed = False, 0, 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested, self.signum = True, signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
