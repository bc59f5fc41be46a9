"""DLLogger-format file lines and the readable stdout line."""

from __future__ import annotations

import io
import json
import time

import numpy as np

from wd_sok.logger import Logger, format_step

KEYS_LOG = {"timestamp", "datetime", "elapsedtime", "type", "step", "data"}
KEYS_META = {"timestamp", "datetime", "elapsedtime", "type", "metric", "metadata"}


def read_dlll(path):
    records = []
    for line in path.read_text().splitlines():
        assert line.startswith("DLLL ")
        records.append(json.loads(line[len("DLLL "):]))
    return records


def test_file_lines_parse_and_round_trip(tmp_path):
    path = tmp_path / "deep" / "er" / "log.json"  # parent folders are created
    out = io.StringIO()
    t0 = time.time()
    log = Logger(path, enabled=True, stream=out)
    log.metadata("throughput", {"unit": "samples/s", "format": ":,.0f"})
    log.log("PARAMETER", {"lr": 0.001, "backend": "sharded", "sizes": (3, 4)})
    data = {"loss": np.float32(0.4513), "throughput": np.float64(18204.3), "n": np.int64(7),
            "vec": np.arange(3, dtype=np.int32), "ok": np.bool_(True)}
    log.log((1, np.int64(200)), data)
    # line-buffered and flushed: readable before close
    recs = read_dlll(path)
    assert len(recs) == 3
    log.log([], {"map@12": 0.61})
    log.close()

    recs = read_dlll(path)
    assert [r["type"] for r in recs] == ["METADATA", "LOG", "LOG", "LOG"]
    assert set(recs[0]) == KEYS_META
    assert recs[0]["metric"] == "throughput"
    assert recs[0]["metadata"] == {"unit": "samples/s", "format": ":,.0f"}
    for r in recs[1:]:
        assert set(r) == KEYS_LOG
    for r in recs:
        assert isinstance(r["timestamp"], float) and t0 - 1 <= r["timestamp"] <= time.time() + 1
        assert isinstance(r["elapsedtime"], float) and 0 <= r["elapsedtime"] < 60
        assert isinstance(r["datetime"], str) and r["datetime"][:2] == "20"
    assert recs[1]["step"] == "PARAMETER"
    assert recs[1]["data"] == {"lr": 0.001, "backend": "sharded", "sizes": [3, 4]}
    assert recs[2]["step"] == [1, 200]
    assert recs[2]["data"] == {"loss": float(np.float32(0.4513)), "throughput": 18204.3, "n": 7,
                               "vec": [0, 1, 2], "ok": True}
    assert recs[3]["step"] == [] and recs[3]["data"] == {"map@12": 0.61}

    lines = out.getvalue().splitlines()
    assert lines[1] == ("epoch 1 step 200 | loss 0.4513 | throughput 18,204 samples/s | n 7 | vec [0, 1, 2] "
                        "| ok True")
    assert lines[0] == "PARAMETER | lr 0.001 | backend sharded | sizes [3, 4]"
    assert lines[2] == "final | map@12 0.61"


def test_verbosity_and_append(tmp_path):
    path = tmp_path / "log.json"
    out = io.StringIO()
    with Logger(path, stream=out) as log:
        log.log([0, 1], {"a": 1}, verbosity=1)  # file only
        log.log([0, 2], {"a": 2}, verbosity=2)  # nowhere
    assert [r["data"]["a"] for r in read_dlll(path)] == [1]
    assert out.getvalue() == ""
    with Logger(path, stream=out, append=True) as log:
        log.log([0, 3], {"a": 3})
    assert [r["data"]["a"] for r in read_dlll(path)] == [1, 3]
    with Logger(path, stream=out) as log:  # truncates by default
        log.log([0, 4], {"a": 4})
    assert [r["data"]["a"] for r in read_dlll(path)] == [4]


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    path = tmp_path / "sub" / "log.json"
    log = Logger(path, enabled=False)
    log.metadata("loss", {"unit": None})
    log.log([1, 2], {"loss": 0.5})
    log.flush()
    log.close()
    assert not path.parent.exists()
    assert capsys.readouterr().out == ""


def test_default_stdout_and_step_format(tmp_path, capsys):
    log = Logger(tmp_path / "l.json")
    log.log([2, 10], {"loss": 0.123456, "lr": 1.5e-05, "samples": 1234567})
    log.close()
    assert capsys.readouterr().out == "epoch 2 step 10 | loss 0.1235 | lr 1.5e-05 | samples 1,234,567\n"
    assert format_step(5) == "step 5"
    assert format_step([3]) == "epoch 3"
