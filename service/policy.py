"""Which queued jobs start now: the scheduler's decision as a pure function (tested with a table).

Jobs are taken by priority (highest first), then age. Up to ``slots`` start at once. Two jobs of
the same ``key`` (input, model, scale: the same coordinator job, one job directory) never run at
once: the later one waits.

- **One model at a time** (local workers: the fleet runs one model, and switching it costs a model
  load): a job of the fleet's model may start while no queued job of another model has a higher
  priority; so queued jobs are grouped by model. When none may and nothing is running, the fleet
  switches to the model of the first job in line.
- **Several models** (remote workers, each running its own model): the first jobs in line start;
  each goes only to the workers that run its model.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Queued:
    """A queued job, as the policy sees it."""

    id: str
    model: str
    priority: int
    key: tuple[object, ...] = ()  # jobs with equal keys are the same coordinator job


@dataclass(frozen=True)
class Plan:
    """What to do now: start ``start`` (in order), after switching the fleet to ``switch_to`` if set."""

    start: tuple[str, ...] = ()
    switch_to: str | None = None


def plan_starts(
    queued: Sequence[Queued],
    *,
    slots: int,
    running: int,
    fleet_model: str | None,
    one_model: bool,
    running_keys: Collection[tuple[object, ...]] = (),
) -> Plan:
    """The jobs to start now; ``queued`` is in line order (priority, then age)."""
    taken = set(running_keys)
    free = []
    for job in queued:
        if not job.key or job.key not in taken:
            free.append(job)
            if job.key:
                taken.add(job.key)
    return _plan(free, slots=slots, running=running, fleet_model=fleet_model, one_model=one_model)


def _plan(
    queued: Sequence[Queued], *, slots: int, running: int, fleet_model: str | None, one_model: bool
) -> Plan:
    if slots <= 0 or not queued:
        return Plan()
    if not one_model:
        return Plan(tuple(job.id for job in queued[:slots]))
    top_other = max((job.priority for job in queued if job.model != fleet_model), default=None)
    same = [
        job.id
        for job in queued
        if job.model == fleet_model and (top_other is None or job.priority >= top_other)
    ]
    if same:
        return Plan(tuple(same[:slots]))
    if running:
        return Plan()  # the fleet's model is still in use: switch once its jobs are done
    model = queued[0].model  # the first in line has the top priority: some of its jobs start
    first = _plan(queued, slots=slots, running=0, fleet_model=model, one_model=True)
    return Plan(first.start, switch_to=model)
