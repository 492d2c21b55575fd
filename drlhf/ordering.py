"""The ordering of one labeling task from pairwise answers (the labeler asks, the sorter decides what next)."""
from __future__ import annotations

import math
from itertools import combinations


class TaskSorter:
    """Orders K images from answers to "is a better than b?" ('a', 'b' or 'tie').

    Binary insertion sort over tie groups (transitivity assumed, the default): image i is inserted into the
    groups of images 0..i-1 by binary search; a tie joins the group. Worst case sum_{n=1}^{K-1} ceil(log2(n+1))
    comparisons: 8 for K = 5, 17 for K = 8. Optionally a final pass re-asks every neighbouring pair of groups
    (swap or merge on a contradiction). Without transitivity, every pair is asked and images are ranked by
    wins + ties/2 (Copeland), equal scores forming tie groups.
    """

    def __init__(self, k: int, all_pairs: bool = False, recheck: bool = False):
        self.k, self.all_pairs, self.recheck = k, all_pairs, recheck
        self.groups = [[0]]                   # best first
        self.item, self.lo, self.hi = 1, 0, 1  # image being inserted and its search interval over groups
        self.check = 0                         # position of the neighbour re-check pass
        self.pairs = list(combinations(range(k), 2))
        self.answers: dict[tuple[int, int], str] = {}
        self.decisions = 0

    def next_pair(self):
        """The next (a, b) to ask, or None when the task is ordered."""
        if self.all_pairs:
            return next((p for p in self.pairs if p not in self.answers), None)
        if self.item < self.k:
            return self.item, self.groups[(self.lo + self.hi) // 2][0]
        if self.recheck and self.check < len(self.groups) - 1:
            return self.groups[self.check + 1][0], self.groups[self.check][0]  # (lower, upper)
        return None

    @property
    def done(self) -> bool:
        return self.next_pair() is None

    def apply(self, a: int, b: int, outcome: str):
        if (a, b) != self.next_pair():
            raise ValueError(f"answer for ({a}, {b}) but the pending pair is {self.next_pair()}")
        self.decisions += 1
        if self.all_pairs:
            self.answers[(a, b)] = outcome
            return
        if self.item < self.k:
            mid = (self.lo + self.hi) // 2
            if outcome == "tie":
                self.groups[mid].append(a)
                return self._next_item()
            if outcome == "a":
                self.hi = mid
            else:
                self.lo = mid + 1
            if self.lo == self.hi:
                self.groups.insert(self.lo, [a])
                self._next_item()
            return
        p = self.check  # re-check: a = lower group, b = upper group
        if outcome == "tie":
            self.groups[p:p + 2] = [self.groups[p] + self.groups[p + 1]]
            return
        if outcome == "a":
            self.groups[p], self.groups[p + 1] = self.groups[p + 1], self.groups[p]
        self.check += 1

    def _next_item(self):
        self.item += 1
        self.lo, self.hi = 0, len(self.groups)

    def ranking(self) -> list[list[int]]:
        """Tie groups of image indices, best first (partial while the task is not done)."""
        if not self.all_pairs:
            return [sorted(g) for g in self.groups]
        score = [0.0] * self.k
        for (a, b), o in self.answers.items():
            score[a] += {"a": 1.0, "tie": 0.5, "b": 0.0}[o]
            score[b] += {"a": 0.0, "tie": 0.5, "b": 1.0}[o]
        return [[i for i in range(self.k) if score[i] == s] for s in sorted(set(score), reverse=True)]

    def most_left(self) -> int:
        """At most this many more comparisons finish the task: the binary search of the image being inserted
        and of each image after it (over as many tie groups as there can be), then the re-check pass; or the
        pairs not yet asked."""
        if self.all_pairs:
            return sum(p not in self.answers for p in self.pairs)
        n, groups = 0, len(self.groups)
        if self.item < self.k:
            n += math.ceil(math.log2(self.hi - self.lo + 1))
            for groups in range(groups + 1, groups + self.k - self.item):
                n += math.ceil(math.log2(groups + 1))
            groups = len(self.groups) + self.k - self.item
        return n + (max(groups - 1 - self.check, 0) if self.recheck else 0)


def ordering_text(ranking: list) -> str:
    """[[3], [1, 4], [0]] -> '#3 > #1 = #4 > #0'."""
    return " > ".join(" = ".join(f"#{i}" for i in group) for group in ranking)
