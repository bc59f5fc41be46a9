"""What a prep run was asked to do: the column roles and how the inputs are read (saved for ``--apply``).

:class:`PrepOptions` is built from the command line (:mod:`wd_sok.prep.cli`), checked by :meth:`check`
(a column listed twice, a bad separator, conflicting flags) and saved as ``prep.json`` beside the fitted
workflow, so that ``--apply`` reads new files exactly as the training files were read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wd_sok.prep.errors import PrepError

OPTIONS_FILE = "prep.json"
WORKFLOW_DIR = "workflow"
SPEC_FILE = "feature_spec.yaml"


def embedding_width(cardinality: int) -> int:
    """The embedding width rule: ``min(64, round(6 * cardinality ** 0.25))`` (at least 1)."""
    return max(1, min(64, round(6 * cardinality ** 0.25)))


EMBEDDING_RULE = "min(64, round(6 * cardinality ** 0.25))"


@dataclass
class PrepOptions:
    """Column roles and reader settings of one prep run.

    Attributes:
        label: 0/1 label column.
        categorical: one-hot categorical columns (any strings or integers; encoded to ids).
        numerical: numerical columns (floats; empty cells allowed).
        multihot: multi-hot column -> separator of its items inside a cell.
        map: group column kept for MAP@12 (integers), test only.
        split_by: column whose value decides train/test with ``test_fraction`` (a group is never split).
        sep: field separator of CSV/TSV inputs ("" = by extension: tab for .tsv/.txt, comma otherwise).
        header: the CSV files have a header row; otherwise ``names`` names the fields in order.
        freq_threshold: values seen fewer times in train map to id 0 (unseen).
        max_vocab: table rows per categorical feature, id 0 included (0 = no cap).
        hash_buckets: one-hot column -> buckets; such columns are hashed (id = hash % buckets).
        test_fraction: share of groups (or rows) sent to test when no ``--test`` is given.
        seed: seed of the row / group hash of the split.
        rows_per_part, min_parts: each split gets ``max(min_parts, ceil(rows / rows_per_part))`` parts.
    """

    label: str
    categorical: list[str] = field(default_factory=list)
    numerical: list[str] = field(default_factory=list)
    multihot: dict[str, str] = field(default_factory=dict)
    map: str | None = None
    split_by: str | None = None
    sep: str = ""
    header: bool = True
    names: list[str] = field(default_factory=list)
    freq_threshold: int = 0
    max_vocab: int = 0
    hash_buckets: dict[str, int] = field(default_factory=dict)
    test_fraction: float = 0.0
    seed: int = 0
    rows_per_part: int = 1_000_000
    min_parts: int = 2

    @property
    def features(self) -> list[str]:
        """Model inputs in spec order: one-hot, multi-hot, numerical."""
        return self.categorical + list(self.multihot) + self.numerical

    def input_columns(self) -> list[str]:
        """Every column read from the inputs, each once (split_by last if it is not already a feature)."""
        cols = self.features + [self.label] + ([self.map] if self.map else [])
        if self.split_by and self.split_by not in cols:
            cols.append(self.split_by)
        return cols

    @property
    def split_only(self) -> str | None:
        """``split_by`` when it is read only to split (not a feature, the label or the map), else None."""
        if self.split_by and self.split_by not in self.features + [self.label, self.map]:
            return self.split_by
        return None

    def check(self) -> None:
        """Raise PrepError for a column listed twice, a bad flag value or conflicting flags."""
        roles: dict[str, str] = {}
        for role, names in (("--label", [self.label]), ("--categorical", self.categorical),
                            ("--multihot", list(self.multihot)), ("--numerical", self.numerical),
                            ("--map", [self.map] if self.map else [])):
            for name in names:
                if not name:
                    raise PrepError(f"{role}: empty column name")
                if name in roles:
                    again = "" if roles[name] == role else f" ({roles[name]} and {role})"
                    raise PrepError(f"column '{name}' is listed twice{again}")
                roles[name] = role
        if not self.features:
            raise PrepError("no feature columns: give --categorical, --multihot and/or --numerical")
        for name, sep in self.multihot.items():
            if not sep:
                raise PrepError(f"--multihot {name}=: the separator is empty")
        for name, buckets in self.hash_buckets.items():
            if name not in self.categorical:
                raise PrepError(f"--hash_buckets {name}={buckets}: column '{name}' is not a --categorical column")
            if buckets < 1:
                raise PrepError(f"--hash_buckets {name}={buckets}: buckets must be >= 1")
        if self.freq_threshold and self.max_vocab:
            raise PrepError("--freq_threshold and --max_vocab cannot be combined (NVTabular Categorify takes one)")
        if self.freq_threshold < 0 or self.max_vocab < 0 or self.max_vocab == 1:
            raise PrepError("--freq_threshold must be >= 0 and --max_vocab 0 (no cap) or >= 2")
        if not 0.0 <= self.test_fraction < 1.0:
            raise PrepError(f"--test_fraction must lie in [0, 1), got {self.test_fraction}")
        if self.rows_per_part < 1 or self.min_parts < 1:
            raise PrepError("--rows_per_part and --min_parts must be >= 1")
        if not self.header:
            if not self.names:
                raise PrepError("--no_header needs --names COL1,COL2,... naming every field in order")
            twice = sorted({n for n in self.names if self.names.count(n) > 1})
            if twice:
                raise PrepError(f"--names: column '{twice[0]}' is listed twice")
            for name in self.input_columns():
                if name not in self.names:
                    raise PrepError(f"column '{name}' ({roles.get(name, '--split_by')}) is not among --names")

    def sep_for(self, path: Path) -> str:
        """Field separator of ``path``: ``sep`` if set, else tab for .tsv/.txt files, comma otherwise."""
        if self.sep:
            return self.sep
        return "\t" if path.suffix.lower() in (".tsv", ".txt") else ","

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PrepOptions:
        raw: dict[str, Any] = json.loads(text)
        return cls(**raw)
