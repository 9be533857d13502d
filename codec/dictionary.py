"""Dictionaries of ternary words for fixed 16-bit codewords.

A dictionary maps codeword c to a word, a run of ternary symbols (0 = zero, 1 = row max, 2 = row min).
Two constructions:

- `tunstall(probs)`: Tunstall's variable-to-fixed code. Start from the root; repeatedly expand the most probable
  leaf into its three children until one more expansion would pass 2^16 leaves. The leaves are the words. Every
  internal node is fully expanded, so any symbol sequence parses uniquely; the expected word length is the sum of
  the internal nodes' probabilities, which is as long as any complete dictionary of this size can make it.
- `qmoe_pairs(p0)`: QMoE's fixed dictionary, the baseline: the 2^16 most probable sequences of 1..14 *pairs* of
  weights under an i.i.d. model with P(0) = p0, parsed greedily (longest match).

Since nearly nine in ten symbols are 0, a word is stored as its length plus the positions and symbols of its few
non-zeros; decoding then costs per non-zero, not per weight. Everything is built from a few numbers (kind, symbol
probabilities), deterministically, so a container stores those numbers and a checksum, not the 2^16 words.
"""
from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from functools import cache, cached_property

import numba
import numpy as np

CODEWORDS = 1 << 16
MAX_WORD = 127  # longest word: bounds memory for very skewed symbols (costs only when P(0) > ~0.98), and keeps
# positions within a word at 0..126, so the decoder's byte 0xFF (position 127) can mean "no more non-zeros"
EMPTY = 0xFF


@dataclass(frozen=True)
class Dictionary:
    kind: str  # "tunstall" or "qmoe-pairs"
    probs: tuple[float, float, float]  # the symbol probabilities it was built for (P(0), P(1), P(2))
    length: np.ndarray  # [W] uint16: symbols per word
    nz_start: np.ndarray  # [W + 1] int64: word c's non-zeros are nz_pos/nz_sym[nz_start[c]:nz_start[c + 1]]
    nz_pos: np.ndarray  # uint16: offset of the non-zero within its word
    nz_sym: np.ndarray  # uint8: 1 or 2
    child: np.ndarray  # [nodes, 3] int32: the trie of all words (-1: no child); node 0 is the root
    word: np.ndarray  # [nodes] int32: the codeword ending at this node, or -1

    @property
    def size(self) -> int:
        return len(self.length)

    @cached_property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in (self.length, self.nz_start, self.nz_pos, self.nz_sym):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    @property
    def label(self) -> str:
        """For messages: kind, probabilities, size and the start of the checksum."""
        probs = ", ".join(f"{p:.4g}" for p in self.probs)
        return f"{self.kind} dictionary (P = {probs}; {self.size} words; sha256 {self.sha256[:12]})"

    @cached_property
    def table(self) -> np.ndarray:
        """The decoder's view: one fixed-size record per word, [W, 1 + max nnz] uint8.

        record = [length, nz_0, ..., nz_{nnz-1}, EMPTY...]; nz = position (7 bits) | (symbol - 1) << 7.
        A flat dictionary (Tunstall's words are nearly equiprobable, so decoding touches all of it) must be small
        to stay in cache: at P(0) = 0.885 the longest record has 4 non-zeros, so the table is 5 x 65535 = 320 KB.
        """
        nnz = np.diff(self.nz_start)
        t = np.full((self.size, 1 + max(1, int(nnz.max(initial=0)))), EMPTY, dtype=np.uint8)
        t[:, 0] = self.length
        word = np.repeat(np.arange(self.size), nnz)
        rank = np.arange(len(self.nz_pos)) - np.repeat(self.nz_start[:-1], nnz)
        t[word, 1 + rank] = (self.nz_pos.astype(np.uint8) | ((self.nz_sym - 1) << 7)).astype(np.uint8)
        return t

    def expected_length(self) -> float:
        """Mean symbols per codeword under i.i.d. symbols with self.probs (exact for Tunstall)."""
        p = np.asarray(self.probs)
        nnz = np.diff(self.nz_start)
        counts = np.zeros((self.size, 3))
        counts[:, 0] = self.length - nnz
        np.add.at(counts, (np.repeat(np.arange(self.size), nnz), self.nz_sym.astype(np.int64)), 1)
        with np.errstate(divide="ignore"):
            logp = np.where(p > 0, np.log(np.maximum(p, 1e-300)), -np.inf)
        word_p = np.exp((counts * logp).sum(1, where=counts > 0))
        return float((word_p * self.length).sum() / word_p.sum())


def _from_words(kind: str, probs, words: list[tuple[int, ...]]) -> Dictionary:
    words = sorted(words)  # codeword ids in lexicographic order of the words: deterministic
    length = np.array([len(w) for w in words], dtype=np.uint16)
    nz = [[(i, s) for i, s in enumerate(w) if s] for w in words]
    nz_start = np.zeros(len(words) + 1, dtype=np.int64)
    nz_start[1:] = np.cumsum([len(x) for x in nz])
    nz_pos = np.array([i for x in nz for i, _ in x], dtype=np.uint16)
    nz_sym = np.array([s for x in nz for _, s in x], dtype=np.uint8)
    child, word = [[-1, -1, -1]], [-1]
    for c, w in enumerate(words):
        node = 0
        for s in w:
            if child[node][s] < 0:
                child[node][s] = len(child)
                child.append([-1, -1, -1])
                word.append(-1)
            node = child[node][s]
        word[node] = c
    return Dictionary(kind, tuple(float(p) for p in probs), length, nz_start, nz_pos, nz_sym,
                      np.array(child, dtype=np.int32), np.array(word, dtype=np.int32))


def normalize_probs(probs) -> tuple[float, float, float]:
    """Probabilities as the dictionary key: float64, summing to 1, no symbol at exactly 0 (every symbol must stay
    encodable, including in a matrix that had none of it when the dictionary was fitted)."""
    p = np.maximum(np.asarray(probs, dtype=np.float64), 1e-6)
    p = p / p.sum()
    return tuple(float(x) for x in p)


def tunstall(probs, size: int = CODEWORDS) -> Dictionary:
    """The Tunstall dictionary with at most `size` words for i.i.d. symbols with these probabilities (normalized
    first; the dictionary's `probs` are the normalized ones, from which `build` makes it again)."""
    return _tunstall(normalize_probs(probs), size)


@cache
def _tunstall(probs: tuple[float, float, float], size: int) -> Dictionary:
    """Built from `probs` exactly as given: normalizing again may move a probability by an ulp (normalize_probs is
    not idempotent in floating point), which can reorder tied leaves and give another dictionary, so the
    dictionary a container names is rebuilt from its recorded probabilities verbatim.

    Leaves of MAX_WORD symbols are not expanded further (the tree stays complete, so parsing stays unique).
    Compiled (`_tunstall_trie`); `_tunstall_reference` is the same construction in plain Python, the definition
    the tests hold it to, array for array."""
    length, nz_start, nz_pos, nz_sym, child, word = _tunstall_trie(np.asarray(probs, dtype=np.float64), size,
                                                                   MAX_WORD)
    return Dictionary("tunstall", tuple(float(p) for p in probs), length, nz_start, nz_pos, nz_sym, child, word)


def _tunstall_reference(probs: tuple[float, float, float], size: int) -> Dictionary:
    heap = [(-1.0, 0, ())]  # (-probability, tie-break, word): the expandable leaves
    full = []  # leaves at MAX_WORD
    leaves, counter = 1, 1
    while leaves + 2 <= size and heap:
        neg_p, _, w = heapq.heappop(heap)
        for s in range(3):
            child = (neg_p * probs[s], counter, w + (s,))
            (full.append(child) if len(child[2]) >= MAX_WORD else heapq.heappush(heap, child))
            counter += 1
        leaves += 2
    return _from_words("tunstall", probs, [w for _, _, w in heap] + [w for _, _, w in full])


@numba.njit(inline="always")
def _heap_less(negp, a: int, b: int) -> bool:
    return negp[a] < negp[b] or (negp[a] == negp[b] and a < b)


@numba.njit(cache=True, nogil=True)
def _tunstall_trie(probs, size, max_word):
    """Tunstall's trie, as `_tunstall_reference` builds it. Node ids are creation order, which is the Python
    version's tie-break counter, so a binary heap keyed on (-probability, id) pops the same leaf at every step.
    The words are then listed by a depth-first walk taking children in symbol order: the leaves come out in
    lexicographic order and the nodes in the order `_from_words` creates them."""
    cap = 1 + 3 * max(1, (size - 1) // 2)
    negp = np.empty(cap, np.float64)
    depth = np.zeros(cap, np.int64)
    first = np.full(cap, -1, np.int64)  # id of the node's child 0 (children 1, 2 follow), -1 for a leaf
    heap = np.empty(cap, np.int64)
    negp[0], n, heap[0], hn, leaves = -1.0, 1, 0, 1, 1
    while leaves + 2 <= size and hn > 0:
        top = heap[0]  # pop the smallest (-p, id)
        hn -= 1
        heap[0] = heap[hn]
        i = 0
        while True:
            c = 2 * i + 1
            if c >= hn:
                break
            if c + 1 < hn and _heap_less(negp, heap[c + 1], heap[c]):
                c += 1
            if _heap_less(negp, heap[c], heap[i]):
                heap[i], heap[c] = heap[c], heap[i]
                i = c
            else:
                break
        first[top] = n
        for s in range(3):
            negp[n], depth[n] = negp[top] * probs[s], depth[top] + 1
            if depth[n] < max_word:  # push
                j = hn
                heap[hn] = n
                hn += 1
                while j > 0:
                    parent = (j - 1) // 2
                    if _heap_less(negp, heap[j], heap[parent]):
                        heap[j], heap[parent] = heap[parent], heap[j]
                        j = parent
                    else:
                        break
            n += 1
        leaves += 2
    words = leaves
    length = np.empty(words, np.uint16)
    nz_start = np.zeros(words + 1, np.int64)
    nz_pos = np.empty(words * max_word, np.uint16)
    nz_sym = np.empty(words * max_word, np.uint8)
    child = np.full((n, 3), -1, np.int32)
    word = np.full(n, -1, np.int32)
    path = np.zeros(max_word + 1, np.int64)  # the symbols from the root to the node being visited
    stack = np.empty(3 * max_word + 3, np.int64)  # (node, its preorder id's parent slot) pairs, flattened
    stack_sym = np.empty(3 * max_word + 3, np.int64)
    stack_parent = np.empty(3 * max_word + 3, np.int64)
    stack[0], stack_sym[0], stack_parent[0], sp = 0, 0, -1, 1
    order, w, nnz = 0, 0, 0
    while sp > 0:
        sp -= 1
        node, sym, parent = stack[sp], stack_sym[sp], stack_parent[sp]
        me = order
        order += 1
        if parent >= 0:
            child[parent, sym] = me
            path[depth[node] - 1] = sym
        if first[node] < 0:  # a leaf: the next word in lexicographic order
            word[me] = w
            length[w] = depth[node]
            for k in range(depth[node]):
                if path[k] != 0:
                    nz_pos[nnz], nz_sym[nnz] = k, path[k]
                    nnz += 1
            w += 1
            nz_start[w] = nnz
        else:
            for s in range(2, -1, -1):  # pushed in reverse: child 0 is visited first
                stack[sp], stack_sym[sp], stack_parent[sp] = first[node] + s, s, me
                sp += 1
    return length, nz_start, nz_pos[:nnz].copy(), nz_sym[:nnz].copy(), child, word


@cache
def qmoe_pairs(p0: float = 0.885, size: int = CODEWORDS, max_pairs: int = 14) -> Dictionary:
    """QMoE's dictionary: the `size` most probable sequences of 1..max_pairs pairs of ternary weights."""
    probs = (p0, (1 - p0) / 2, (1 - p0) / 2)
    pairs = [((a, b), probs[a] * probs[b]) for a in range(3) for b in range(3)]
    # Best-first: a sequence is less probable than its prefix, so popping by probability lists the top `size`.
    heap = [(-p, i, pair) for i, (pair, p) in enumerate(pairs)]
    heapq.heapify(heap)
    counter, words = len(heap), []
    while heap and len(words) < size:
        neg_p, _, w = heapq.heappop(heap)
        words.append(w)
        if len(w) < 2 * max_pairs:
            for pair, p in pairs:
                heapq.heappush(heap, (neg_p * p, counter, w + pair))
                counter += 1
    return _from_words("qmoe-pairs", probs, words)


def build(kind: str, probs, size: int = CODEWORDS) -> Dictionary:
    """The dictionary a container names: ('tunstall', fitted probabilities) or ('qmoe-pairs', (p0, ...)), with at
    most `size` words (at most 2^16: codewords are uint16)."""
    if not 1 <= size <= CODEWORDS:
        raise ValueError(f"dictionary size {size} is outside 1..{CODEWORDS}")
    if kind == "tunstall":
        p = tuple(float(x) for x in probs)
        if len(p) != 3 or not all(0 < x <= 1 for x in p) or abs(sum(p) - 1) > 1e-9:
            raise ValueError(f"tunstall probabilities {list(p)} are not three positive numbers summing to 1")
        return _tunstall(p, size)
    if kind == "qmoe-pairs":
        return qmoe_pairs(float(probs[0]), size)
    raise ValueError(f"unknown dictionary kind {kind!r}")
