"""Which queued jobs start now (service.policy.plan_starts): a table of cases."""

from __future__ import annotations

import pytest

from service.policy import Plan, Queued, plan_starts

A, B = "model-a", "model-b"


def line(*jobs: tuple[str, str, int]) -> list[Queued]:
    return [Queued(job_id, model, priority, (job_id.rstrip("'"),)) for job_id, model, priority in jobs]


CASES = {
    "no slot": (line(("1", A, 0)), dict(slots=0, running=2, fleet_model=A), Plan()),
    "empty queue": ([], dict(slots=2, running=0, fleet_model=A), Plan()),
    "first jobs of the fleet's model": (
        line(("1", A, 0), ("2", A, 0), ("3", A, 0)), dict(slots=2, running=0, fleet_model=A), Plan(("1", "2"))
    ),
    "grouped: the fleet's model before an older job of another model of the same priority": (
        line(("1", B, 0), ("2", A, 0)), dict(slots=2, running=1, fleet_model=A), Plan(("2",))
    ),
    "a higher priority of another model waits for the running jobs, then switches": (
        line(("1", B, 5), ("2", A, 0)), dict(slots=1, running=1, fleet_model=A), Plan()
    ),
    "switch when nothing runs": (
        line(("1", B, 5), ("2", A, 0), ("3", B, 0)), dict(slots=2, running=0, fleet_model=A),
        Plan(("1", "3"), switch_to=B),
    ),
    "first fleet": (
        line(("1", B, 0), ("2", A, 0)), dict(slots=2, running=0, fleet_model=None), Plan(("1",), B)
    ),
    "after a switch only jobs as urgent as the rest": (
        line(("1", B, 5), ("2", A, 3), ("3", B, 0)), dict(slots=2, running=0, fleet_model=None),
        Plan(("1",), switch_to=B),
    ),
    "the same job twice: one at a time": (
        line(("1", A, 0), ("1'", A, 0), ("2", A, 0)), dict(slots=3, running=0, fleet_model=A),
        Plan(("1", "2")),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_one_model_fleet(name: str) -> None:
    queued, settings, expected = CASES[name]
    assert plan_starts(queued, one_model=True, **settings) == expected  # type: ignore[arg-type]


def test_a_running_job_holds_its_key() -> None:
    queued = line(("1'", A, 0), ("2", A, 0))
    assert plan_starts(
        queued, slots=2, running=1, fleet_model=A, one_model=True, running_keys={("1",)}
    ) == Plan(("2",))


def test_several_models_take_the_line_in_order() -> None:
    queued = line(("1", B, 5), ("2", A, 0), ("3", B, 0))
    assert plan_starts(queued, slots=2, running=0, fleet_model=None, one_model=False) == Plan(("1", "2"))
