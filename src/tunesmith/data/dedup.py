"""Exact and near-duplicate detection.

Exact: rows whose text is equal after folding case and whitespace. Near: MinHash signatures of
word shingles, candidate pairs from locality-sensitive hashing, each pair then checked against
the threshold with the signatures' estimated Jaccard similarity (LSH alone lets through pairs
somewhat below it). Pairs are joined into clusters (connected components).

This is the one module that calls `datasketch`.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from typing import Callable

import numpy as np

WORD = re.compile(r"\w+")
SIGNATURE_DTYPE = np.uint32  # datasketch's default "affine32" scheme stores 32-bit hash values


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()


def words(text: str) -> list[str]:
    return WORD.findall(text.casefold())


def shingles(text: str, size: int) -> set[bytes]:
    """Word n-grams; a text shorter than `size` words is one shingle of all its words."""
    w = words(text)
    return {" ".join(w[i:i + size]).encode("utf-8") for i in range(max(1, len(w) - size + 1))} if w else set()


def _crc32(b: bytes) -> int:
    # Stable across processes and runs (unlike hash()), and much faster than datasketch's SHA-1;
    # datasketch mixes it with a MurmurHash3 finaliser before permuting, so 32 bits suffice.
    return zlib.crc32(b)


def signatures(texts: list[str], num_perm: int, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(signatures [rows, num_perm], has_words [rows]) for a batch of texts. Rows without a single
    word get no meaningful signature (all empty sets would look identical) and are flagged."""
    from datasketch import MinHash

    sets = [shingles(t, shingle_size) for t in texts]
    sigs = np.zeros((len(texts), num_perm), dtype=SIGNATURE_DTYPE)
    has_words = np.array([bool(s) for s in sets], dtype=bool)
    for i, mh in zip(np.flatnonzero(has_words), MinHash.bulk([sets[i] for i in np.flatnonzero(has_words)],
                                                             num_perm=num_perm, hashfunc=_crc32)):
        sigs[i] = mh.hashvalues
    return sigs, has_words


def exact_groups(keys: list[bytes]) -> list[list[int]]:
    """Groups (of two or more row indices) with the same exact key, in order of first appearance."""
    by_key: dict[bytes, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    return [g for g in by_key.values() if len(g) > 1]


def similarity(sigs: np.ndarray, a: int, b: int) -> float:
    return float(np.mean(sigs[a] == sigs[b]))


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) such that a pair exactly at the threshold becomes a candidate with
    probability >= recall, using the most rows per band that allows (fewest spurious candidates).
    datasketch's own choice balances misses and false candidates equally, which at 0.85 misses
    about half the pairs that sit at the threshold; here misses are what matter, since every
    candidate is checked against the threshold afterwards anyway."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= recall:
            return b, r
    return num_perm, 1


def near_pairs(sigs: np.ndarray, rows: list[int], threshold: float,
               progress: Callable[[int], None] | None = None) -> list[tuple[int, int, float]]:
    """Pairs (i < j, estimated Jaccard) among `rows` with similarity >= threshold."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=sigs.shape[1], params=lsh_bands(threshold, sigs.shape[1]))
    pairs = []
    for n, i in enumerate(rows, 1):
        if progress and (n % 5000 == 0 or n == len(rows)):
            progress(n)
        mh = LeanMinHash(seed=1, hashvalues=sigs[i], scheme="affine32")
        # Querying before inserting yields each candidate pair exactly once.
        for j in lsh.query(mh):
            sim = similarity(sigs, i, j)
            if sim >= threshold:
                pairs.append((min(i, j), max(i, j), sim))
        lsh.insert(i, mh, check_duplication=False)
    return sorted(pairs)


def clusters(pairs: list[tuple[int, int, float]]) -> list[list[int]]:
    """Connected components of the pair graph, each sorted, in order of their first row."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees shallow
            x = parent[x]
        return x

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])
