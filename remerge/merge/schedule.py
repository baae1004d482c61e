"""The order mergekit saves a merge's tensors in: it decides the shard cut and the index.

    save_order(release, planned) -> [tensor name, ...]

mergekit does not save tensors in its plan order: it turns the plan into a graph of tasks (per
output tensor: load each input, gather them, merge, save) and runs them in the order of
`networkx.lexicographical_topological_sort` keyed by `(group label, -priority)`. A tensor's
label is the largest name among the tensors it reads, as the models store them (a tied
`lm_head` reads `model.embed_tokens.weight`), so in effect tensors are saved sorted by the
names they read. Ties, the tensors that read the same name (a frankenmerge that repeats a
layer, or takes layer i from two models), are broken by each node's position in the graph,
which comes from how the scheduler explored the tasks:

- "task_index" (0.1.5): tasks are numbered as `TaskUniverse` adds them (each save, then its
  writer, merge, gather and loads, depth first, equal loads once); the graph is explored by
  popping a Python `set` of those numbers. We replay that exploration on a set of the same
  numbers, so the order is the running CPython's; it matched mergekit's on 3.11, the version
  the goldens were made with (a CPython whose set pops small ints in another order would
  change mergekit's own order as much).
- "reverse_plan" (0.0.5.1): tasks are explored depth first from the last planned tensor
  back, so of tied tensors the one planned last is saved first (for inputs that tie within
  one gather, 0.0.5.1 iterates a set of tasks hashed by address; we take them in recipe order).

Only loads are merged when equal (mergekit's gathers hold an `ImmutableMap`, compared by
identity, so no two gathers, merges or saves are ever the same task). Checked against
mergekit's own schedules with one tensor per shard (tests/parity/NOTES.md § slices).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Sequence

from remerge.merge.releases import Release

# mergekit's task priorities (higher runs first among equal labels)
_LOAD, _GATHER, _MERGE, _SAVE, _DEFAULT = -1000, -10, 0, 1000, 0


@dataclass(frozen=True)
class Read:
    """One input of a planned tensor: which load task it is, and the name it resolves to."""

    model: str
    name: str  # the tensor mergekit asks the model for (a tied lm_head: "lm_head.weight")
    resolved: str | None  # the name the model stores it under; None: it has none


@dataclass
class _Task:
    label: str  # group label ("" for none)
    priority: int
    args: list[int]
    save: str | None = None  # the output tensor of a save task


def save_order(release: Release, planned: Sequence[tuple[str, Sequence[Read]]]) -> list[str]:
    """The names of `planned` (output name, its reads; in mergekit's plan order) in the order
    the release saves them."""
    tasks, targets = _universe(planned, release.writer_priority)
    edges = _WALKS[release.save_ties](tasks, targets)
    return [tasks[n].save for n in _lexicographic(tasks, edges) if n >= 0 and tasks[n].save]


def _universe(planned: Sequence[tuple[str, Sequence[Read]]], writer_priority: int
              ) -> tuple[list[_Task], list[int]]:
    """The tasks numbered as mergekit's `TaskUniverse` numbers them: a task, then its arguments
    depth first (a save's: the writer, then the merge -> gather -> loads); equal loads once."""
    tasks: list[_Task] = []
    loads: dict[tuple[str, str], int] = {}
    writer: list[int] = []

    def new(label: str, priority: int, save: str | None = None) -> int:
        tasks.append(_Task(label, priority, [], save))
        return len(tasks) - 1

    def load(read: Read) -> int:
        key = (read.model, read.name)
        if key not in loads:
            loads[key] = new(read.resolved or "", _LOAD)
        return loads[key]

    def the_writer() -> int:
        if not writer:
            writer.append(new("", writer_priority))
        return writer[0]

    saves = []
    for name, reads in planned:
        label = max((r.resolved or "" for r in reads), default="")
        save = new(label, _SAVE, save=name)
        tasks[save].args.append(the_writer())
        merge = new(label, _MERGE)
        tasks[save].args.append(merge)
        gather = new(label, _GATHER)
        tasks[merge].args.append(gather)
        tasks[gather].args.extend(load(r) for r in reads)
        saves.append(save)
    finalize = new("", _DEFAULT)
    tasks[finalize].args = [the_writer(), *saves]
    return tasks, saves + [finalize]


_DUMMY = -1  # the node mergekit links to every target


def _edges_task_index(tasks: list[_Task], targets: list[int]) -> list[tuple[int, int]]:
    """0.1.5's `build_schedule`: pop task numbers from a set, add (argument, task) edges."""
    edges = []
    explored: set[int] = set()
    to_explore = set(targets)  # the numbers hash to themselves, as mergekit's TaskHandles do
    while to_explore:
        task = to_explore.pop()
        if task in explored:
            continue
        explored.add(task)
        for dep in tasks[task].args:
            to_explore.add(dep)
            edges.append((dep, task))
    return edges + [(_DUMMY, t) for t in targets]


def _edges_reverse_plan(tasks: list[_Task], targets: list[int]) -> list[tuple[int, int]]:
    """0.0.5.1's `_build_dependencies`: depth first from the last target (a list used as a
    stack), then (argument, task) edges task by task in that order."""
    found: dict[int, list[int]] = {}
    stack = list(targets)
    while stack:
        task = stack.pop()
        if task in found:
            continue
        found[task] = list(dict.fromkeys(tasks[task].args))
        stack.extend(tasks[task].args)
    edges = [(dep, task) for task, deps in found.items() for dep in deps]
    return edges + [(_DUMMY, t) for t in targets]


# how each release walks the task graph: Release.save_ties -> the graph's edges, in order
_WALKS: dict[str, Callable[[list[_Task], list[int]], list[tuple[int, int]]]] = {
    "task_index": _edges_task_index,
    "reverse_plan": _edges_reverse_plan,
}


def _lexicographic(tasks: list[_Task], edges: list[tuple[int, int]]) -> list[int]:
    """networkx's `lexicographical_topological_sort` of the graph built from `edges`: nodes
    numbered in order of first appearance; of the ready nodes the least (key, number) first."""
    number: dict[int, int] = {}
    children: dict[int, dict[int, None]] = {}
    waiting: dict[int, int] = {}
    for u, v in edges:
        for n in (u, v):
            if n not in number:
                number[n], children[n], waiting[n] = len(number), {}, 0
        if v not in children[u]:
            children[u][v] = None
            waiting[v] += 1

    def key(n: int) -> tuple[tuple[str, int], int, int]:
        k = ("", 0) if n == _DUMMY else (tasks[n].label, -tasks[n].priority)
        return k, number[n], n

    ready = [key(n) for n in number if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        n = heapq.heappop(ready)[2]
        order.append(n)
        for child in children[n]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, key(child))
    return order
