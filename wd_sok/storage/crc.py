"""CRC32 of a concatenation from the CRC32s of its pieces (zlib's ``crc32_combine``, which Python's ``zlib``
does not expose), so a file written or read piece by piece gets both a checksum per piece (a block of rows a
rank may later read alone) and the whole file's, from one pass over the bytes.

The arithmetic is zlib's own (``crc32.c``, 1.2.12+: ``multmodp`` / ``x2nmodp``): CRC32 is linear over GF(2), so
``crc(A + B) = crc(A) * x^(8 |B|) mod P  xor  crc(B)``, with polynomials in zlib's reflected bit order.
"""

from __future__ import annotations

import functools
import zlib

_POLY = 0xEDB88320  # the CRC-32 polynomial, reflected
_ONE = 1 << 31  # x^0 in reflected order


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial (reflected 32-bit polynomials)."""
    m, p = _ONE, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()  # x^(2^k) mod P, k = 0..31


@functools.lru_cache(maxsize=64)
def _shift(length: int) -> int:
    """x^(8 * length) mod P: the operator appending ``length`` zero bytes (cached: blocks share lengths)."""
    p, k, n = _ONE, 3, length
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len2 = len(B)``."""
    return _multmodp(_shift(len2), crc1) ^ crc2 if len2 else crc1


class Pieces:
    """Running CRC32 of bytes fed in pieces: :attr:`crc` of everything, :attr:`pieces` one CRC32 per piece."""

    def __init__(self, crc: int = 0) -> None:
        self.crc = crc
        self.pieces: list[int] = []

    def add(self, data: bytes | memoryview) -> int:
        """Feed one piece; returns its own CRC32."""
        c = zlib.crc32(data)
        self.pieces.append(c)
        self.crc = combine(self.crc, c, len(memoryview(data).cast("B")))
        return c
