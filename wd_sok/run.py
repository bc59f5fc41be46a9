"""From a resolved config to a finished run: set up the process, build the trainer, do what was asked."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from wd_sok import storage
from wd_sok.config import Config
from wd_sok.feature_spec import SpecError
from wd_sok.watchdog import EXIT_STALL


def run(cfg: Config) -> int:
    """Train, evaluate or benchmark as ``cfg`` says; returns the process exit code."""
    import tensorflow as tf

    from wd_sok.checkpoint import CheckpointError
    from wd_sok.checkpoint.lineage import fresh_run_refusal
    from wd_sok.distributed import Runtime
    from wd_sok.reporting import Reporter
    from wd_sok.startup import StartupError
    from wd_sok.train import Interrupted, Trainer

    runtime = Runtime()
    if runtime.watchdog is not None:  # --debug: a stall also dumps every thread's stack
        runtime.watchdog.debug = cfg.debug
    _setup_devices(tf, cfg, runtime.local_rank)
    storage.configure(cfg.storage_options or None)
    reporter = None
    try:
        # start-up: local checks on every rank (no collectives), then one agreement inside Trainer
        error = None
        try:
            if runtime.is_chief:
                for flag in ("model_dir", "results_dir"):
                    _check_writable(flag, getattr(cfg, flag))
                if cfg.export_dir:
                    _check_writable("export_dir", cfg.export_dir if storage.is_url(cfg.export_dir)
                                    else str(Path(cfg.export_dir).parent))
                if not (cfg.use_checkpoint or cfg.overwrite or cfg.evaluate or cfg.benchmark):
                    refusal = fresh_run_refusal(cfg.model_dir)  # a model_dir belongs to one run
                    if refusal:
                        raise ValueError(refusal)
        except ValueError as e:
            error = str(e)
        trainer = Trainer(cfg, runtime, error=error)
        if cfg.use_checkpoint:  # collective; its verdict (usable, fall back, error) is agreed by every rank
            with runtime.phase("restore", long=True):
                trainer.restore(optional=cfg.use_checkpoint == "auto")
        # the log starts once the run is known to be able to start: a rejected run leaves no output behind
        reporter = Reporter(cfg.results_dir, cfg.log_filename, enabled=runtime.is_chief,
                            append=bool(trainer.restored))
        trainer.attach(reporter)
        if cfg.benchmark:
            with runtime.phase("benchmark"):
                rate = trainer.benchmark_eval() if cfg.evaluate else trainer.benchmark_train()
            reporter.info(f"{'validation' if cfg.evaluate else 'train'}_throughput {rate:,.0f} samples/s")
        elif cfg.evaluate:
            with runtime.phase("evaluate"):
                metrics = trainer.evaluate()
            reporter.final(metrics)
            reporter.info(f"evaluated: {_summary(metrics)}")
        else:
            with runtime.phase("train"):
                metrics = trainer.fit()
            reporter.final(metrics)
            reporter.plot_learning_curve()
            reporter.info(f"done: {_summary(metrics)}; logs in {cfg.results_dir}, checkpoints in {cfg.model_dir}")
        if cfg.export_dir and not cfg.benchmark:
            from wd_sok.export import export_saved_model

            with runtime.phase("export", long=True):  # rank 0 writes while the others wait
                export_saved_model(trainer, cfg.export_dir)
            reporter.info(f"exported SavedModel to {cfg.export_dir}")
    except (StartupError, CheckpointError) as e:  # agreed by every rank: exit 2, the message printed once
        if runtime.is_chief:
            rank = getattr(e, "rank", 0)
            where = f" (rank {rank})" if runtime.size > 1 and rank else ""
            print(f"wd-sok: error{where}: {e}", file=sys.stderr, flush=True)
        if runtime.size > 1:  # all ranks leave at once, before horovodrun starts terminating the slower ones
            sys.stdout.flush()
            os._exit(2)
        return 2
    except (SpecError, ValueError, OSError) as e:
        print(f"wd-sok: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as e:
        print(f"wd-sok: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except Exception as e:  # a collective broke (a peer died or stopped): one line, no traceback unless --debug
        if runtime.size == 1 or cfg.debug or not _collective_failure(e):
            raise
        print(_collective_line(runtime, e), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_STALL)
    finally:
        if reporter is not None:
            reporter.close()
    return 0


def _check_writable(flag: str, path: str) -> None:
    """Create ``path`` if needed and prove a file can be written there; else a ValueError naming the flag.
    A URL (model_dir, export_dir) gets a tiny object written and deleted; results_dir must be local."""
    if storage.is_url(path):
        if flag == "results_dir":
            raise ValueError(f"--results_dir {path}: logs are written locally by rank 0; give a local folder")
        try:
            storage.Store(path).probe_writable()
        except OSError as e:
            raise ValueError(f"--{flag} {e}") from None
        return
    target = Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".wd_sok_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--{flag} {path} is not writable ({e.strerror})") from None


_COLLECTIVE_WORDS = ("Horovod", "Gloo", "gloo", "Timed out waiting", "Connection closed by peer")


def _collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is Horovod / Gloo reporting a broken collective (a peer gone, stopped or timed out)."""
    if type(e).__name__ == "HorovodInternalError":
        return True
    import tensorflow as tf

    text = str(e)
    return isinstance(e, tf.errors.OpError) and any(k in text for k in _COLLECTIVE_WORDS)


def _collective_line(runtime, e: BaseException) -> str:  # noqa: ANN001 - a wd_sok.distributed.Runtime
    """The one line a rank prints when a collective failed under it."""
    import re

    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(e))  # TensorFlow's op wrapper names
    # a graph function's error wraps Horovod's words in "Graph execution error:", "Detected at node <op> defined
    # at", the Python stack ("File ..."), "Node: <op>" and "[[{{node <op>}}]]" lines: skip those
    wrapper = ("Graph execution error", "Detected at node", "File ", "Node:", "[[")
    lines = [ln for ln in map(str.strip, text.splitlines()) if ln and not ln.startswith(wrapper)]
    first = next((ln for ln in lines if any(k in ln for k in _COLLECTIVE_WORDS)),
                 next(iter(lines), type(e).__name__))
    first = first.split(". ")[0].rstrip(".")[:160]  # "Horovod has been shut down", "Timed out waiting ..."
    silent = runtime.silent_ranks()
    blame = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering"
             if silent else "another rank exited or broke: see its output")
    return (f"wd-sok: error (rank {runtime.rank}, phase {runtime.phase_name}): a collective failed ({first}); "
            f"{blame}; exit {EXIT_STALL} (--debug shows the traceback)")


def _summary(metrics: dict) -> str:
    names = {"loss_val": "BCE", "auc_roc": "AUC", "streaming_map_val": "MAP@12"}
    return ", ".join(f"{label} {metrics[k]:.4f}" for k, label in names.items() if k in metrics)


def _setup_devices(tf, cfg: Config, local_rank: int) -> None:  # noqa: ANN001 - the tensorflow module
    """One GPU per process (by local rank), memory growth on; or hide GPUs with --cpu."""
    gpus = tf.config.list_physical_devices("GPU")
    if cfg.cpu or not gpus:
        tf.config.set_visible_devices([], "GPU")
        return
    gpu = gpus[local_rank % len(gpus)]
    tf.config.set_visible_devices([gpu], "GPU")
    tf.config.experimental.set_memory_growth(gpu, True)
