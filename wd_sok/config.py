"""One frozen run configuration, built from the command line.

Every flag is a dataclass field; its default and help text live in the field, so ``main.py -h`` can never
drift from the code. Flag names, defaults and meanings follow NVIDIA DeepLearningExamples' TF2 WideAndDeep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("auto", "replicated", "sharded", "sok")


def _f(default: Any, help: str, group: str, **argparse_kw: Any) -> Any:
    """A config field: ``default``, ``help`` and argparse extras (choices, nargs, action) in one place."""
    kw = {"default_factory": (lambda: list(default))} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "group": group, "argparse": argparse_kw}, **kw)


@dataclass(frozen=True)
class Config:
    """The resolved run configuration (saved inside every checkpoint and logged at start)."""

    # location of datasets
    dataset_path: str = _f("data/demo", "Dataset base directory; the feature spec and its paths resolve "
                           "relative to it", "location of datasets")
    fspec_file: str = _f("feature_spec.yaml", "Feature spec file, relative to dataset_path",
                         "location of datasets")
    embedding_sizes_file: str = _f("", "JSON of embedding widths per categorical feature, for specs without "
                                   "embedding_dim (default: embedding_sizes.json beside the spec, if any)",
                                   "location of datasets")
    use_checkpoint: str = _f("", "Resume from (or, with --evaluate, evaluate) the latest checkpoint in "
                             "model_dir; a missing checkpoint is an error. '--use_checkpoint auto': resume if "
                             "a usable checkpoint exists, else start fresh (for a job an orchestrator restarts "
                             "with the same command)", "location of datasets", nargs="?", const="yes",
                             choices=["", "yes", "auto"])
    overwrite: bool = _f(False, "Start a fresh run in a model_dir that holds another run's checkpoints: they are "
                         "removed once this run's first checkpoint is committed (without it such a run is "
                         "refused)", "location of datasets")
    model_dir: str = _f("runs/checkpoints", "Where checkpoints are written; one run's (see --use_checkpoint, "
                        "--overwrite)", "location of datasets")
    keep_checkpoints: int = _f(2, "Checkpoints of this run kept in model_dir (older ones of this run are removed "
                               "once a newer one is committed; other runs' never)", "location of datasets")
    results_dir: str = _f("runs/results", "Where logs and results are written", "location of datasets")
    export_dir: str = _f("", "After training (or with --evaluate), write a TensorFlow SavedModel here whose "
                         "serving signature takes the spec's raw features and returns click probabilities",
                         "location of datasets")
    storage_options: str = _f("", "JSON object of keyword arguments for the fsspec filesystem of s3:// / gs:// / "
                              "... URLs in dataset_path, model_dir, export_dir (e.g. {\"endpoint_url\": ...}); "
                              "empty: the protocol's own environment (AWS_*, AWS_ENDPOINT_URL, ...). Never "
                              "printed nor saved", "location of datasets")
    log_filename: str = _f("log.json", "DLLogger-format log file name inside results_dir",
                           "location of datasets")
    # training parameters
    global_batch_size: int = _f(131072, "Global training batch size (split evenly over ranks)",
                                "training parameters")
    eval_batch_size: int = _f(131072, "Global evaluation batch size", "training parameters")
    num_epochs: int = _f(20, "Number of training epochs", "training parameters")
    cpu: bool = _f(False, "Run on the CPU even if a GPU is present", "training parameters")
    amp: bool = _f(False, "Mixed precision (float16 + loss scaling on GPU, bfloat16 on CPU)",
                   "training parameters")
    xla: bool = _f(False, "Compile the train and eval steps with XLA", "training parameters")
    linear_learning_rate: float = _f(0.02, "FTRL learning rate of the wide part", "training parameters")
    deep_learning_rate: float = _f(0.00012, "RMSprop base learning rate of the deep part",
                                   "training parameters")
    deep_warmup_epochs: float = _f(6.0, "Epochs of linear learning-rate warm-up of the deep part",
                                   "training parameters")
    rmsprop_update: str = _f("lazy", "Sparse RMSprop update of the deep tables: lazy (O(rows touched), decays "
                             "owed applied when a row is next read; same weights) or dense (Keras' legacy update: "
                             "decays every row of every table each step, as the reference)",
                             "training parameters", choices=["lazy", "dense"])
    nan_policy: str = _f("reject", "Non-finite numerical values: reject (error naming file, feature, row) or "
                         "fill with zero", "training parameters", choices=["reject", "zero"])
    checkpoint_steps: int = _f(0, "Also checkpoint every N training steps (0: only at epoch ends and on "
                               "SIGINT/SIGTERM)", "training parameters")
    full_checkpoint_ratio: float = _f(0.2, "A --checkpoint_steps save after a full one is a delta (the table rows "
                                      "changed since the last full checkpoint, plus the dense state; restored "
                                      "with it) while it would be at most this fraction of a full one's bytes, "
                                      "else full; a SIGINT/SIGTERM save is a delta whenever a full one exists "
                                      "and it is smaller; epoch ends save full (0: full checkpoints only). 0.2: a "
                                      "restore reads base + delta, measured ~(1 + ratio) x a full restore",
                                      "training parameters")
    full_checkpoint_every: int = _f(20, "A full checkpoint after at most this many deltas", "training parameters")
    seed: int = _f(0, "Seed for initialisation, dropout and data order (every rank agrees)",
                   "training parameters")
    # model construction
    deep_hidden_units: list[int] = _f([1024, 1024, 1024, 1024, 1024], "Hidden units per deep layer",
                                      "model construction", nargs="+", type=int)
    deep_dropout: float = _f(0.1, "Dropout after each hidden layer of the deep part", "model construction")
    combiner: str = _f("sum", "Pooling of multi-hot features", "model construction", choices=["sum", "mean"])
    embedding_backend: str = _f("auto", "Where embedding tables live: replicated on every rank, sharded over "
                                "ranks with TF alltoall, or sharded by SOK on GPUs (auto: sok if GPUs and SOK "
                                "are present, else sharded with >1 rank, else replicated)",
                                "model construction", choices=list(BACKENDS))
    embedding_plan: str = _f("", "Placement of the sharded backend's tables (wd_sok.embedding.plan): auto (cost "
                             "model: replicate where cheaper, small tables whole on one rank, else row-wise), "
                             "row (all row-wise) or replicated; a feature's spec 'placement' overrides it; "
                             "empty: auto for the sharded backend, row for sok (whose table-wise = SOK "
                             "localized and replicated paths have not run on a GPU here)", "model construction",
                             choices=["", "auto", "row", "replicated"])
    plan_only: bool = _f(False, "Print the embedding placement plan (table, rows, dim, bytes, placement, "
                         "ranks, projected bytes per rank) for --world_size ranks and --device_memory GB per "
                         "rank, then exit (exit 2 if it does not fit)", "model construction")
    world_size: int = _f(0, "Ranks to plan for with --plan_only (0: 1)", "model construction")
    device_memory: float = _f(0.0, "Memory per rank for embedding tables and their optimizer slots, in GB "
                              "(1e9 bytes): the planner's budget (0: unlimited)", "model construction")
    # run mode parameters
    num_auc_thresholds: int = _f(8000, "Histogram buckets of the streaming AUC", "run mode parameters")
    disable_map_calculation: bool = _f(False, "Skip MAP@12 (for specs without a map channel)",
                                       "run mode parameters")
    evaluate: bool = _f(False, "Only evaluate on the test mapping, do not train", "run mode parameters")
    benchmark: bool = _f(False, "Time benchmark_steps steps after benchmark_warmup_steps and log "
                         "train_throughput / validation_throughput", "run mode parameters")
    benchmark_warmup_steps: int = _f(500, "Warm-up steps before the benchmark timing starts",
                                     "run mode parameters")
    benchmark_steps: int = _f(1000, "Timed benchmark steps", "run mode parameters")
    log_every: int = _f(50, "Log loss and throughput every N training steps", "run mode parameters")
    max_steps: int = _f(0, "Stop training after this many steps in total (0: no limit)", "run mode parameters")
    debug: bool = _f(False, "Show TensorFlow's C++ INFO / WARNING / ERROR log lines (hidden by default unless "
                     "TF_CPP_MIN_LOG_LEVEL is set; wd_sok/tflog.py), the Python traceback of a failed collective "
                     "and, when a rank stops answering, every thread's stack (exit 3 either way)",
                     "run mode parameters")

    @property
    def map_calculation_enabled(self) -> bool:
        return not self.disable_map_calculation

    def to_json(self) -> str:
        return json.dumps(self.public(), sort_keys=True)

    def public(self) -> dict[str, Any]:
        """The fields as a dict, secrets (``storage_options``) replaced by a mark: what logs and manifests
        may hold."""
        out = dataclasses.asdict(self)
        if out.get("storage_options"):
            out["storage_options"] = "<set, not shown>"
        return out

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser generated from :class:`Config`'s fields (defaults and help from one place)."""
    parser = argparse.ArgumentParser(description="wd-sok: Wide & Deep CTR training with model-parallel "
                                     "embeddings", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        kw: dict[str, Any] = {"default": default, "help": f.metadata["help"], **f.metadata["argparse"]}
        if isinstance(default, bool):
            kw["action"] = "store_true"
        elif "type" not in kw:
            kw["type"] = type(default)
        group.add_argument(f"--{f.name}", **kw)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse ``argv`` into a frozen :class:`Config`; conflicting flags are a parser error (exit 2)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    cfg = Config(**args)
    problems = check_config(cfg)
    if problems:
        parser.error("; ".join(problems))
    return cfg


def check_config(cfg: Config) -> list[str]:
    """Flag values that cannot work together or at all, as readable sentences."""
    problems = []
    for name in ("global_batch_size", "eval_batch_size", "num_epochs", "num_auc_thresholds", "log_every",
                 "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.deep_warmup_epochs < 0:
        problems.append(f"--deep_warmup_epochs must be >= 0, got {cfg.deep_warmup_epochs}")
    if not 0.0 <= cfg.deep_dropout < 1.0:
        problems.append(f"--deep_dropout must be in [0, 1), got {cfg.deep_dropout}")
    if any(u < 1 for u in cfg.deep_hidden_units):
        problems.append(f"--deep_hidden_units must all be >= 1, got {cfg.deep_hidden_units}")
    if cfg.benchmark and (cfg.benchmark_steps < 1 or cfg.benchmark_warmup_steps < 0):
        problems.append("--benchmark needs --benchmark_steps >= 1 and --benchmark_warmup_steps >= 0")
    if cfg.deep_warmup_epochs > cfg.num_epochs:
        problems.append(f"--deep_warmup_epochs {cfg.deep_warmup_epochs} exceeds --num_epochs {cfg.num_epochs}")
    if cfg.embedding_backend == "sok" and cfg.cpu:
        problems.append("--embedding_backend sok needs GPUs; it cannot run with --cpu (use sharded)")
    if cfg.benchmark and cfg.max_steps:
        problems.append("--benchmark times --benchmark_steps steps; do not combine it with --max_steps")
    if cfg.checkpoint_steps < 0:
        problems.append(f"--checkpoint_steps must be >= 0, got {cfg.checkpoint_steps}")
    if cfg.full_checkpoint_ratio < 0 or cfg.full_checkpoint_every < 1:
        problems.append(f"--full_checkpoint_ratio must be >= 0 and --full_checkpoint_every >= 1, got "
                        f"{cfg.full_checkpoint_ratio}, {cfg.full_checkpoint_every}")
    if cfg.embedding_plan and cfg.embedding_backend == "replicated" and not cfg.plan_only:
        problems.append("--embedding_plan places the sharded backend's tables; --embedding_backend replicated "
                        "holds every table on every rank")
    if cfg.world_size and not cfg.plan_only:
        problems.append("--world_size is for --plan_only (a run's world size is its rank count)")
    if cfg.world_size < 0 or cfg.device_memory < 0:
        problems.append(f"--world_size and --device_memory must be >= 0, got {cfg.world_size}, "
                        f"{cfg.device_memory}")
    if cfg.storage_options:
        try:
            if not isinstance(json.loads(cfg.storage_options), dict):
                raise ValueError
        except ValueError:
            problems.append("--storage_options must be a JSON object (its value is not shown)")
    if cfg.overwrite and cfg.use_checkpoint:
        problems.append(f"--overwrite starts over; --use_checkpoint {cfg.use_checkpoint} resumes: choose one")
    if cfg.overwrite and (cfg.evaluate or cfg.benchmark):
        problems.append("--overwrite is for training runs (--evaluate and --benchmark write no checkpoint)")
    if cfg.max_steps < 0:
        problems.append(f"--max_steps must be >= 0, got {cfg.max_steps}")
    return problems
