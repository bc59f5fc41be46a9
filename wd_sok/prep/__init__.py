"""Bring your own data: raw CSV / TSV / parquet -> a trainable dataset and feature spec (``wd-sok-prep``).

Modules: :mod:`~wd_sok.prep.options` (column roles; saved for ``--apply``), :mod:`~wd_sok.prep.stage`
(read + check + split), :mod:`~wd_sok.prep.workflow` (the NVTabular workflow and its id / log rules),
:mod:`~wd_sok.prep.write` (parts), :mod:`~wd_sok.prep.spec` (feature_spec.yaml),
:mod:`~wd_sok.prep.pipeline` (a run), :mod:`~wd_sok.prep.apply` (``--apply``), :mod:`~wd_sok.prep.cli`.
"""
