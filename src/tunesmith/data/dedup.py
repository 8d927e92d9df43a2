"""Exact and near-duplicate detection.

Exact: rows whose text is equal after folding case and whitespace.

Near, two criteria; a pair meeting either is a near-duplicate:
- MinHash signatures of word shingles, candidate pairs from locality-sensitive hashing, each pair
  then checked against the threshold with the signatures' estimated Jaccard similarity (LSH alone
  lets through pairs somewhat below it).
- One word apart: rows of up to EDIT_MAX_WORDS words whose word sequences differ by one inserted,
  deleted or substituted word (word-level edit distance <= 1, after the same case folding), the
  word being in a line of EDIT_MIN_WORDS or more (so a one-word answer or label that differs, with
  the rest of the row equal, is not a duplicate: it is a different answer).
  Why a second criterion: in a short row one changed word breaks up to `shingle` shingles, so the
  3-word-shingle Jaccard of a one-word substitution is (n-5)/(n+1): 0.54 at 12 words, 0.81 at 30,
  under 0.85 whatever the MinHash accuracy; any proportional measure (word sets, character
  n-grams) is capped near (n-1)/n, 0.8 at 5 words. Only an absolute count of changed words says
  "the same row" for short text without lowering the threshold for every row. The candidate step is
  exact, not probabilistic: each row is indexed under the hash of its word sequence, of each
  sequence with one word deleted, and of each deletion with its position; two rows one word apart
  always share one of these keys (a substitution the same deletion at the same position, an
  insertion the shorter row's whole sequence), so recall is complete and no pair needs checking.
Pairs are joined into clusters (connected components).

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
# Below 5 words one word is often the whole difference in meaning ("cancel my card" / "cancel my
# order", an answer "yes" / "no", a label, a number): the changed word must sit in a line of at
# least this many words, in the longer row of the pair.
EDIT_MIN_WORDS = 5
# From 100 words on, a one-word substitution keeps 3-word-shingle Jaccard >= 0.94, well above the
# default threshold, where MinHash finds it; the word-level keys (2n+1 per row) stop there.
EDIT_MAX_WORDS = 100
STAR_ABOVE = 64  # rows sharing one key: beyond this many, link each to the first (same clusters, not n^2 pairs)
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so powers of it never vanish modulo 2^64


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()


def words(text: str) -> list[str]:
    return WORD.findall(text.casefold())


def shingles(text: str, size: int) -> set[bytes]:
    return _shingles(words(text), size)


def _shingles(w: list[str], size: int) -> set[bytes]:
    """Word n-grams; a text shorter than `size` words is one shingle of all its words."""
    return {" ".join(w[i:i + size]).encode("utf-8") for i in range(max(1, len(w) - size + 1))} if w else set()


def _crc32(b: bytes) -> int:
    # Stable across processes and runs (unlike hash()), and much faster than datasketch's SHA-1;
    # datasketch mixes it with a MurmurHash3 finaliser before permuting, so 32 bits suffice.
    return zlib.crc32(b)


def signatures(texts: list[str], num_perm: int, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(signatures [rows, num_perm], has_words [rows]) for a batch of texts. Rows without a single
    word get no meaningful signature (all empty sets would look identical) and are flagged."""
    return word_signatures([words(t) for t in texts], num_perm, shingle_size)


def word_signatures(word_lists: list[list[str]], num_perm: int, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    sets = [_shingles(w, shingle_size) for w in word_lists]
    sigs = np.zeros((len(word_lists), num_perm), dtype=SIGNATURE_DTYPE)
    has_words = np.array([bool(s) for s in sets], dtype=bool)
    for i, mh in zip(np.flatnonzero(has_words), MinHash.bulk([sets[i] for i in np.flatnonzero(has_words)],
                                                             num_perm=num_perm, hashfunc=_crc32)):
        sigs[i] = mh.hashvalues
    return sigs, has_words


def _word_ids(w: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(hashlib.blake2b(x.encode("utf-8"), digest_size=8).digest() for x in w),
                         dtype=np.uint64)


def line_words(text: str) -> list[list[str]]:
    """The words of each line that has any (`words` is these, concatenated)."""
    return [w for w in (words(line) for line in text.split("\n")) if w]


def edit_keys(lines: list[list[str]]) -> np.ndarray | None:
    """A row's one-word neighbourhood as 64-bit keys: [whole sequence, the sequence without word i,
    the same with i mixed in], for each word i in a line of EDIT_MIN_WORDS or more; None when the
    row has no word or more than EDIT_MAX_WORDS. Line ends are part of the sequence.
    Sequence hashes are sum(id_j * B^j) modulo 2^64, so the hash of each deletion comes from a
    prefix sum and a suffix sum instead of re-hashing the row once per word."""
    if not 0 < sum(map(len, lines)) <= EDIT_MAX_WORDS:
        return None
    seq = [x for n, line in enumerate(lines) for x in ([] if n == 0 else ["\n"]) + line]  # no word holds "\n"
    eligible = np.array([e for n, line in enumerate(lines)
                         for e in ([] if n == 0 else [False]) + [len(line) >= EDIT_MIN_WORDS] * len(line)], dtype=bool)
    ids, n = _word_ids(seq), len(seq)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.concatenate([[np.uint64(1)], np.full(n, _BASE, dtype=np.uint64)]))
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(ids * powers[:n])])  # prefix[i]: hash of seq[:i]
        # suffix[i]: hash of seq[i+1:] shifted one place left, the sum over j > i of id_j * B^(j-1)
        shifted = np.concatenate([ids[1:] * powers[:n - 1], [np.uint64(0)]])
        suffix = np.cumsum(shifted[::-1])[::-1]
        at = np.flatnonzero(eligible).astype(np.uint64)
        deleted = (prefix[:n] + suffix)[eligible]
        placed = deleted * _BASE + (at + np.uint64(1)) * np.uint64(0xD6E8FEB86659FD93)
    return np.concatenate([prefix[-1:], deleted, placed])


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


def _links(group: list[int]) -> list[tuple[int, int]]:
    group = sorted(set(group))
    if len(group) > STAR_ABOVE:
        return [(group[0], j) for j in group[1:]]
    return [(a, b) for n, a in enumerate(group) for b in group[n + 1:]]


def _same_key_runs(keys: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the entries that share a key, for keys held by two or more entries."""
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
    ends = np.append(starts[1:], len(ks))
    return [order[a:b] for a, b in zip(starts, ends) if b - a > 1]


def one_word_pairs(keys: list[np.ndarray | None], rows: list[int]) -> set[tuple[int, int]]:
    """Pairs (i < j) among `rows` whose word sequences are at most one word apart (see the module
    docstring), from the keys of `edit_keys`."""
    seq_keys, seq_rows, seq_whole, at_keys, at_rows = [], [], [], [], []
    for i in rows:
        k = keys[i]
        if k is None:
            continue
        n = (len(k) - 1) // 2
        seq_keys.append(k[:n + 1])
        seq_rows.append(np.full(n + 1, i))
        seq_whole.append(np.arange(n + 1) == 0)
        at_keys.append(k[n + 1:])
        at_rows.append(np.full(n, i))
    if not seq_keys:
        return set()
    pairs: set[tuple[int, int]] = set()
    seq_rows_a, whole = np.concatenate(seq_rows), np.concatenate(seq_whole)
    for run in _same_key_runs(np.concatenate(seq_keys)):
        # Equal sequences, or one row equal to the other less one word; two deletions sharing a
        # key can be two words apart ("x a b" / "a b y"), so those match only through `at` keys.
        full = sorted({int(r) for r in seq_rows_a[run[whole[run]]]})
        longer = sorted({int(r) for r in seq_rows_a[run[~whole[run]]]} - set(full))
        if not full:
            continue
        if len(full) + len(longer) > STAR_ABOVE:
            pairs.update((min(full[0], b), max(full[0], b)) for b in full[1:] + longer)
        else:
            pairs.update(_links(full))
            pairs.update((min(a, b), max(a, b)) for a in full for b in longer)
    at_rows_a = np.concatenate(at_rows)
    for run in _same_key_runs(np.concatenate(at_keys)):  # the same word substituted at the same place
        pairs.update(_links([int(r) for r in at_rows_a[run]]))
    return pairs


def near_pairs(sigs: np.ndarray, rows: list[int], threshold: float,
               progress: Callable[[int], None] | None = None,
               keys: list[np.ndarray | None] | None = None) -> list[tuple[int, int, float]]:
    """Pairs (i < j, estimated Jaccard) among `rows` with similarity >= threshold, or one word
    apart when `keys` (from edit_keys, per row) are given; the similarity reported is the estimated
    Jaccard either way, so a one-word-apart pair of short rows may show less than the threshold."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=sigs.shape[1], params=lsh_bands(threshold, sigs.shape[1]))
    pairs = {}
    for n, i in enumerate(rows, 1):
        if progress and (n % 5000 == 0 or n == len(rows)):
            progress(n)
        mh = LeanMinHash(seed=1, hashvalues=sigs[i], scheme="affine32")
        # Querying before inserting yields each candidate pair exactly once.
        for j in lsh.query(mh):
            sim = similarity(sigs, i, j)
            if sim >= threshold:
                pairs[(min(i, j), max(i, j))] = sim
        lsh.insert(i, mh, check_duplication=False)
    for a, b in one_word_pairs(keys, rows) if keys is not None else ():
        if (a, b) not in pairs:
            pairs[(a, b)] = similarity(sigs, a, b)
    return sorted((a, b, sim) for (a, b), sim in pairs.items())


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
