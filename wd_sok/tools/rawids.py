"""Raw (unbounded) ids for dynamic features: the one string hash, the generator's id scramble, spec helpers.

* :func:`hash_strings` turns string ids (Outbrain's ``uuid``, hex entity ids, geo strings) into int64 ids::

      id(s) = int.from_bytes(blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)

  i.e. the low 63 bits of the unkeyed 8-byte BLAKE2b digest (RFC 7693) of the UTF-8 bytes, read little-endian:
  always in ``[0, 2**63)``, the same in every process, on every machine and in any language with BLAKE2b
  (unlike Python's salted ``hash()``). The transcoder (``--hash_ids``) and the Outbrain preprocessing
  (``--raw_ids``) both call it; nothing else hashes string ids for dynamic features.
* :func:`scramble` maps the generator's small ids ``[0, n)`` to ids spread over ``[0, 2**62)``: a bijection of
  the 62-bit integers keyed by (seed, feature), so distinct ids stay distinct (no collisions, ever).
* :func:`dynamic_variant` rewrites a spec so chosen fixed features become ``dynamic: {capacity: <cardinality>}``
  (same planted data, raw ids); :func:`parse_counts` / :func:`parse_features` read ``N`` / ``FEATURE[=N],...``
  flags.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

HASH_BITS = 63
SCRAMBLE_BITS = 62
_MASK62 = np.uint64((1 << SCRAMBLE_BITS) - 1)
# odd multipliers (SplitMix64's) and shifts: each step below is a bijection of [0, 2**62)
_ROUNDS = ((31, 0xBF58476D1CE4E5B9), (29, 0x94D049BB133111EB), (32, 0xD6E8FEB86659FD93))


def hash_string(text: str) -> int:
    """The int64 id of one string id (see the module docstring); e.g. ``hash_string("cb8c55702adb93")``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << HASH_BITS) - 1)


def hash_strings(values: Any) -> np.ndarray:
    """int64[n] :func:`hash_string` of each of ``values`` (any 1-D sequence of str, shape [n]).

    Each distinct string is hashed once. Missing values (None / NaN) are not strings: the caller decides what
    they mean (check for them first); here they raise TypeError.
    """
    codes, uniques = pd.factorize(pd.Series(values, dtype=object, copy=False), use_na_sentinel=True)
    if len(codes) and codes.min() < 0:
        raise TypeError("hash_strings: missing value among the string ids")
    joined = b"".join(hashlib.blake2b(str(u).encode("utf-8"), digest_size=8).digest() for u in uniques)
    hashed = np.frombuffer(joined, dtype="<u8") & np.uint64((1 << HASH_BITS) - 1)
    return hashed.astype(np.int64)[codes] if len(codes) else np.zeros(0, np.int64)


def scramble_key(seed: int, feature: str) -> int:
    """The 62-bit key of (seed, feature) for :func:`scramble` (BLAKE2b of ``"<seed>:<feature>"``)."""
    return hash_string(f"{int(seed)}:{feature}") & int(_MASK62)


def scramble(ids: np.ndarray, seed: int, feature: str) -> np.ndarray:
    """int64[n] in ``[0, 2**62)``: a keyed bijection of ``[0, 2**62)`` applied to int ``ids`` (shape [n], in
    ``[0, 2**62)``): add the key mod 2**62, then three rounds of ``x ^= x >> s; x = x * odd mod 2**62``.

    Every step is invertible on 62-bit integers, so distinct ids give distinct outputs.
    """
    x = np.asarray(ids, dtype=np.int64)
    if x.size and (x.min() < 0 or x.max() > int(_MASK62)):
        raise ValueError(f"scramble: ids must lie in [0, 2**{SCRAMBLE_BITS})")
    z = (x.astype(np.uint64) + np.uint64(scramble_key(seed, feature))) & _MASK62
    for shift, mult in _ROUNDS:
        z = z ^ (z >> np.uint64(shift))
        z = (z * np.uint64(mult)) & _MASK62
    return z.astype(np.int64)


def parse_counts(text: str, what: str) -> dict[str, int] | int | None:
    """``""`` -> None, ``"N"`` -> N (for every feature), ``"f=N,g=M"`` -> {f: N, g: M}; ValueError otherwise."""
    text = text.strip()
    if not text:
        return None
    try:
        if "=" not in text:
            value = int(text)
            if value < 1:
                raise ValueError
            return value
        out: dict[str, int] = {}
        for item in text.split(","):
            name, _, number = item.partition("=")
            out[name.strip()] = int(number)
            if out[name.strip()] < 1 or not name.strip():
                raise ValueError
        return out
    except ValueError:
        raise ValueError(f"{what}: expected N or FEATURE=N[,FEATURE=N] with N >= 1, got {text!r}") from None


def parse_features(text: str, what: str) -> dict[str, int | None]:
    """``"f,g=N"`` -> {f: None, g: N} (feature names, each with an optional count >= 1); ValueError otherwise."""
    out: dict[str, int | None] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, number = (p.strip() for p in item.partition("="))
        try:
            value = int(number) if sep else None
        except ValueError:
            value = 0
        if not name or (value is not None and value < 1):
            raise ValueError(f"{what}: expected FEATURE[=N][,FEATURE[=N]] with N >= 1, got {text!r}")
        out[name] = value
    return out


def dynamic_variant(raw: dict[str, Any], features: Sequence[str] | Mapping[str, int | None],
                    origin: str = "<feature spec>") -> dict[str, Any]:
    """A copy of spec dict ``raw`` whose fixed categorical ``features`` are dynamic.

    Each becomes ``{dtype: int64, dynamic: {capacity: C}, ...}`` with C the mapping's value, or the feature's
    cardinality (a name list, or a None value); ``cardinality`` and ``placement`` are dropped, other keys kept.
    ValueError for a name that is not a fixed categorical feature.
    """
    capacity = dict(features) if isinstance(features, Mapping) else dict.fromkeys(features)
    out = copy.deepcopy(raw)
    channels = out.get("channel_spec") or {}
    categorical = list(channels.get("onehot_categorical") or []) + list(channels.get("multihot_categorical") or [])
    for name in capacity:
        props = (out.get("feature_spec") or {}).get(name)
        if name not in categorical or not isinstance(props, dict):
            raise ValueError(f"{origin}: feature '{name}': --dynamic needs a categorical feature "
                             f"(categorical: {', '.join(categorical) or 'none'})")
        if "dynamic" in props:
            raise ValueError(f"{origin}: feature '{name}': already dynamic")
        card = props.pop("cardinality", None)
        props.pop("placement", None)
        props["dtype"] = "int64"
        props["dynamic"] = {"capacity": capacity[name] or card}
    return out
