"""The coordinator's ledger: reassignment and failure decisions, as pure logic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifests.ledger import JobLedger
from manifests.manifest import Batch
from manifests.planner import plan_batches
from manifests.status import BatchError, Status, WorkerIdentity, WorkerState


def status(
    manifest_id: str,
    state: WorkerState,
    done: tuple[int, ...] = (),
    errors: tuple[BatchError, ...] = (),
    total: int = 0,
) -> Status:
    return Status(
        state=state,
        worker=WorkerIdentity(worker_id="w", host="h", pid=1),
        updated_at=0.0,
        job_id="job",
        manifest_id=manifest_id,
        batches_total=max(total, len(done) + len(errors)),
        done_batches=done,
        errors=errors,
    )


def ledger_for(frames: int, workers: list[str]) -> JobLedger:
    plan = plan_batches(frames, 8, workers)
    ledger = JobLedger.for_batches(plan.batches)
    for worker in workers:
        ledger.assign(f"m-{worker}", worker, plan.for_worker(worker))
    return ledger


def test_completes_when_every_status_claims_its_batches() -> None:
    ledger = ledger_for(40, ["a", "b"])  # batches 0..4: a has 0,2,4; b has 1,3
    assert ledger.record_status(status("m-a", WorkerState.PROCESSING, (0,), total=3)) == [0]
    assert ledger.record_status(status("m-a", WorkerState.PROCESSING, (0,), total=3)) == []  # idempotent
    ledger.record_status(status("m-a", WorkerState.COMPLETED, (0, 2, 4)))
    assert not ledger.complete and ledger.frames_done == 24
    ledger.record_status(status("m-b", WorkerState.COMPLETED, (1, 3)))
    assert ledger.complete and ledger.frames_done == ledger.frames_total == 40
    assert ledger.failure(["a", "b"]) is None


def test_lost_worker_batches_go_to_the_others() -> None:
    ledger = ledger_for(48, ["a", "b", "c"])  # a: 0,3  b: 1,4  c: 2,5
    ledger.record_status(status("m-a", WorkerState.PROCESSING, (0,), total=2))
    returned = ledger.release_worker("a")
    assert [b.id for b in returned] == [3]
    assert [b.id for b in ledger.pending()] == [3]
    dealt = ledger.deal(["b", "c"])
    assert {w: [b.id for b in bs] for w, bs in dealt.items()} == {"b": [3]}
    ledger.assign("m-b-2", "b", dealt["b"])
    assert ledger.pending() == []
    assert ledger.failure(["b", "c"]) is None


def test_failed_batch_is_retried_elsewhere_then_fails_the_job() -> None:
    ledger = ledger_for(32, ["a", "b"])  # a: 0,2  b: 1,3
    error = BatchError(batch_id=2, frame=17, reason="input frame input/00000017.png is missing")
    ledger.record_status(status("m-a", WorkerState.FAILED, (0,), (error,)))
    assert [b.id for b in ledger.pending()] == [2]
    assert ledger.deal(["a", "b"]) == {"b": (ledger.batches[2],)}  # never back to a
    ledger.assign("m-b-2", "b", [ledger.batches[2]])
    assert ledger.failure(["a", "b"]) is None
    ledger.record_status(status("m-b-2", WorkerState.FAILED, (), (BatchError(2, 17, "missing again"),)))
    failure = ledger.failure(["a", "b"])
    assert failure is not None and failure.batch == ledger.batches[2]
    assert str(failure) == (
        "batch 2 (frames 17-24) failed on 2 different workers "
        "(on a: frame 17: input frame input/00000017.png is missing; on b: frame 17: missing again)"
    )


def test_failed_batch_with_no_other_worker_fails_the_job() -> None:
    ledger = ledger_for(8, ["a"])
    ledger.record_status(status("m-a", WorkerState.FAILED, (), (BatchError(0, None, "CUDA error"),)))
    failure = ledger.failure(["a"])
    assert failure is not None
    assert (
        str(failure)
        == "batch 0 (frames 1-8) failed, and no other worker is left to retry it (on a: CUDA error)"
    )


def test_no_worker_left() -> None:
    ledger = ledger_for(16, ["a"])
    ledger.release_worker("a")
    failure = ledger.failure([])
    assert failure is not None and str(failure) == "no worker is left to upscale the remaining 2 batch(es)"


def test_cancelled_manifest_releases_what_it_did_not_do() -> None:
    ledger = ledger_for(24, ["a"])
    ledger.record_status(status("m-a", WorkerState.CANCELLED, (0,), total=3))
    assert [b.id for b in ledger.pending()] == [1, 2]
    assert ledger.open_manifests() == []


def test_an_old_final_status_does_not_release_a_new_manifest() -> None:
    ledger = ledger_for(16, ["a", "b"])
    ledger.record_status(status("m-b", WorkerState.FAILED, (), (BatchError(1, None, "boom"),)))
    ledger.assign("m-a-2", "a", [ledger.batches[1]])
    ledger.record_status(status("m-a", WorkerState.COMPLETED, (0,)))
    ledger.record_status(status("m-a", WorkerState.COMPLETED, (0,)))  # read again later
    assert ledger.assigned == {1: "m-a-2"}


def test_misuse_is_refused() -> None:
    ledger = ledger_for(16, ["a"])
    with pytest.raises(ValueError, match="already done or assigned"):
        ledger.assign("m-x", "b", [ledger.batches[0]])
    with pytest.raises(ValueError, match="never dealt"):
        ledger.record_status(status("m-unknown", WorkerState.COMPLETED, ()))


events = st.lists(
    st.tuples(
        st.sampled_from(["deal", "done", "fail", "lose", "cancel"]),
        st.sampled_from(["a", "b", "c"]),
        st.integers(min_value=0, max_value=30),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(frames=st.integers(min_value=1, max_value=200), actions=events)
def test_invariants_under_any_event_sequence(frames: int, actions: list[tuple[str, str, int]]) -> None:
    ledger = JobLedger.for_batches(plan_batches(frames, 8, ["x"]).batches)
    alive = ["a", "b", "c"]
    counter = 0
    for action, worker, pick in actions:
        held = [m for m in ledger.open_manifests(worker)]
        if action == "deal":
            for w, batches in ledger.deal([w for w in alive if not ledger.open_manifests(w)]).items():
                for batch in batches:
                    assert w not in ledger.failures.get(batch.id, {})
                counter += 1
                ledger.assign(f"m{counter}", w, batches)
        elif action in {"done", "fail", "cancel"} and held:
            manifest = held[0]
            batches = ledger.held_by(manifest)
            chosen = batches[pick % len(batches)]
            if action == "done":
                ledger.record_status(
                    status(manifest, WorkerState.PROCESSING, (chosen.id,), total=len(batches))
                )
            elif action == "fail":
                error = BatchError(chosen.id, chosen.frames[0], "bad")
                ledger.record_status(status(manifest, WorkerState.FAILED, (), (error,), total=len(batches)))
            else:
                ledger.record_status(status(manifest, WorkerState.CANCELLED, (), total=len(batches)))
        elif action == "lose" and worker in alive and len(alive) > 1:
            alive.remove(worker)
            ledger.release_worker(worker)
        # Every batch is in exactly one of done / assigned / pending.
        pending = {b.id for b in ledger.pending()}
        assigned = set(ledger.assigned)
        assert not (ledger.done & assigned) and not (ledger.done & pending) and not (assigned & pending)
        assert ledger.done | assigned | pending == set(ledger.batches)
        assert ledger.complete == (len(ledger.done) == len(ledger.batches))
        assert 0 <= ledger.frames_done <= ledger.frames_total == frames


def test_batches_keep_ids_and_frames() -> None:
    ledger = JobLedger.for_batches([Batch.range(0, 1, 9), Batch(1, (9, 11))])
    assert ledger.frames_total == 10


def test_streaming_adds_batches_and_deals_a_share() -> None:
    plan = plan_batches(64, 8, ["x"])
    ledger = JobLedger.for_batches([])
    ledger.add(plan.batches[:4], done=[1])  # batch 1 was found complete on disk
    assert [b.id for b in ledger.pending()] == [0, 2, 3] and ledger.frames_done == 8
    dealt = ledger.deal(["a", "b"], limit=2)
    assert {w: [b.id for b in bs] for w, bs in dealt.items()} == {"a": [0], "b": [2]}
    ledger.add(plan.batches[4:])
    assert [b.id for b in ledger.pending()] == [0, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="already"):
        ledger.add(plan.batches[:1])


def test_forgetting_encoded_batches_keeps_the_counts() -> None:
    plan = plan_batches(32, 8, ["a"])
    ledger = JobLedger.for_batches(plan.batches)
    ledger.assign("m1", "a", plan.batches[:2])
    ledger.record_status(status("m1", WorkerState.COMPLETED, (0, 1)))
    with pytest.raises(ValueError, match="not done"):
        ledger.forget([2])
    ledger.forget([0, 1])
    assert (ledger.frames_done, ledger.frames_total) == (16, 32)
    assert sorted(ledger.batches) == [2, 3] and ledger.manifests == {} and not ledger.done


def test_a_failure_says_whether_workers_are_gone_or_the_batch_failed_everywhere() -> None:
    """The job service queues again a job that failed for want of workers, not one whose batch failed
    on every worker it was tried on (coordinator.errors.WorkersLostError against JobError)."""
    batches = [Batch.range(0, 1, 9), Batch.range(1, 9, 17)]
    ledger = JobLedger.for_batches(batches)
    ledger.record_failure("w1", 0, "bad frame")
    ledger.record_failure("w2", 0, "bad frame")
    twice = ledger.failure(["w1", "w2"])
    assert twice is not None and not twice.workers_gone
    empty = JobLedger.for_batches(batches)
    gone = empty.failure([])
    assert gone is not None and gone.workers_gone and "no worker is left" in str(gone)
    one = JobLedger.for_batches(batches)
    one.record_failure("w1", 1, "out of memory")
    last = one.failure(["w1"])
    assert last is not None and last.workers_gone and last.batch == batches[1]
