"""Model calls in groups: a job's ``run`` yields its model call; on the event loop the calls of the
inline jobs that reach them in the same turn are made together, each job gets its own result, and
on a thread (or a shadow) the calls are made at once."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from app.core.errors import ProblemError
from app.core.execution import (
    Execution,
    GateSpec,
    ModelCalls,
    batchable,
    checkpoint,
    inline_budget,
    run_to_end,
)
from app.core.limits import INLINE_MAX_INSTANCES
from tests.support import open_request


def steps(n: int, events: list[str], model):
    """A job as a task writes it: prepare, ask for the model call, use its result."""
    events.append(f"prepare {n}")
    result = yield model, n
    events.append(f"finish {n}")
    return {"job": n, "result": result, "thread": threading.get_ident()}


def run_jobs(count: int, make_job, *, gate_concurrency: int = 2, inline: bool = True, deadline_s: float = 25.0):
    """``count`` jobs through one light gate, started together; their results (or exceptions) in
    order, the event loop's thread and the execution."""
    execution = Execution([GateSpec("light", gate_concurrency, 32, 0, "light work")], deadline_s)

    async def one(n: int):
        async with execution.ticket(open_request(), "light") as ticket:
            return await ticket.run(make_job(n), inline=inline)

    async def scenario():
        results = await asyncio.gather(*(one(n) for n in range(count)), return_exceptions=True)
        return results, threading.get_ident()

    try:
        results, loop_thread = asyncio.run(scenario())
    finally:
        execution.shutdown()
    return results, loop_thread, execution


def test_the_calls_of_jobs_in_the_same_turn_are_made_together_and_each_job_gets_its_own_result():
    events: list[str] = []

    def model(n: int) -> int:
        events.append(f"call {n}")
        return n * 10

    results, loop_thread, execution = run_jobs(5, lambda n: (lambda: steps(n, events, model)),
                                               gate_concurrency=1)
    assert [r["result"] for r in results] == [0, 10, 20, 30, 40]  # each its own, in order
    assert all(r["thread"] == loop_thread for r in results)
    # Every job prepared, then every call, then every job finished: one group of five, although the
    # gate runs one job at a time (a job waiting for its call holds no slot).
    assert events == ([f"prepare {n}" for n in range(5)] + [f"call {n}" for n in range(5)]
                      + [f"finish {n}" for n in range(5)])
    assert execution.model_calls.status() == {"groups": 1, "calls": 5, "batched": 0}
    gate = execution.gates["light"]
    assert gate.running == 0 and gate.waiting == 0 and not gate.started


def test_calls_are_grouped_by_function_in_the_order_they_came():
    events: list[str] = []

    def first(n: int) -> str:
        events.append(f"first {n}")
        return "a"

    def second(n: int) -> str:
        events.append(f"second {n}")
        return "b"

    results, _, _ = run_jobs(4, lambda n: (lambda: steps(n, [], first if n % 2 else second)))
    assert events == ["second 0", "second 2", "first 1", "first 3"]
    assert [r["result"] for r in results] == ["b", "a", "b", "a"]

    class Model:  # each job asks for its model's bound method, a new object each time
        def __init__(self, name: str) -> None:
            self.name = name

        def predict(self, n: int) -> str:
            events.append(f"{self.name} {n}")
            return self.name

    class Unhashable:
        __hash__ = None

        def __call__(self, n: int) -> str:
            events.append(f"unhashable {n}")
            return "u"

    models, odd = [Model("a"), Model("b")], Unhashable()
    events.clear()
    results, _, _ = run_jobs(5, lambda n: (lambda: steps(n, [], odd if n == 4 else models[n % 2].predict)))
    assert events == ["a 0", "a 2", "b 1", "b 3", "unhashable 4"]
    assert [r["result"] for r in results] == ["a", "b", "a", "b", "u"]


def test_each_call_runs_in_its_own_request_context_with_its_deadline():
    import contextvars

    from app.core.execution import _deadline

    who = contextvars.ContextVar("who", default=None)
    seen: list[tuple] = []

    def model(n: int) -> int:
        deadline = _deadline.get()
        seen.append((n, who.get(), deadline is not None and deadline.remaining() > 0))
        return n

    def job(n: int):
        who.set(f"request {n}")  # set in the request's task, before its ticket

        def run():
            return (yield model, n)
        return run

    results, _, _ = run_jobs(3, job)
    assert results == [0, 1, 2]
    assert seen == [(0, "request 0", True), (1, "request 1", True), (2, "request 2", True)]


def test_a_failing_call_fails_its_own_job_only_and_reaches_the_job_where_it_asked():
    caught: list[str] = []

    def model(n: int) -> int:
        if n == 1:
            raise ValueError("bad tensor")
        return n

    def job(n: int):
        def run():
            try:
                value = yield model, n
            except ValueError as exc:
                caught.append(str(exc))
                raise ProblemError(422, "bad-input", f"job {n}: {exc}") from exc
            return value
        return run

    results, _, execution = run_jobs(3, job)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], ProblemError) and results[1].code == "bad-input"
    assert caught == ["bad tensor"]
    assert execution.gates["light"].running == 0


def test_a_job_may_ask_for_several_calls_and_may_ask_for_none():
    def model(n: int) -> int:
        return n + 1

    def chain():
        a = yield model, 1
        b = yield model, a
        return b

    def none():
        return "no call"
        yield  # a generator all the same

    for job, expected in ((chain, 3), (none, "no call")):
        results, _, _ = run_jobs(1, lambda n, job=job: job)
        assert results == [expected]


def test_off_the_event_loop_the_calls_are_made_at_once_on_the_gate_thread():
    events: list[str] = []
    results, loop_thread, execution = run_jobs(
        3, lambda n: (lambda: steps(n, events, lambda m: m * 10)), inline=False)
    assert [r["result"] for r in results] == [0, 10, 20]
    assert all(r["thread"] != loop_thread for r in results)
    assert execution.model_calls.status() == {"groups": 0, "calls": 0, "batched": 0}


def test_a_big_job_makes_its_calls_at_once_on_the_event_loop():
    execution = Execution([GateSpec("light", 2, 32, 0, "light work")], 25.0)
    events: list[str] = []

    async def scenario():
        async def one(n: int, big: bool):
            async with execution.ticket(open_request(), "light") as ticket:
                return await ticket.run(lambda: steps(n, events, lambda m: m), inline=True, big=big)

        return await asyncio.gather(one(0, True), one(1, False), one(2, True)), threading.get_ident()

    (results, loop_thread) = asyncio.run(scenario())
    execution.shutdown()
    assert [r["result"] for r in results] == [0, 1, 2] and all(r["thread"] == loop_thread for r in results)
    # The big jobs finished in their first step; the small one waited for its group.
    assert events == ["prepare 0", "finish 0", "prepare 1", "prepare 2", "finish 2", "finish 1"]
    assert execution.model_calls.status() == {"groups": 1, "calls": 1, "batched": 0}


def test_a_job_past_the_inline_budget_runs_all_its_steps_on_the_gate_thread():
    def job(n: int):
        def run():
            inline_budget(instances=INLINE_MAX_INSTANCES + 1)  # too big for the loop
            result = yield (lambda m: m * 10), n
            return result, threading.current_thread().name
        return run

    results, _, execution = run_jobs(2, job)
    assert [r[0] for r in results] == [0, 10]
    assert all(r[1].startswith("gate-light") for r in results)
    assert execution.model_calls.status()["calls"] == 0


def test_the_steps_after_the_call_see_the_request_deadline():
    def job(n: int):
        def run():
            yield (lambda m: __import__("time").sleep(0.06)), n  # the call outlasts the deadline
            checkpoint()
            return "ran past its deadline"
        return run

    results, _, _ = run_jobs(1, job, deadline_s=0.05)
    assert isinstance(results[0], ProblemError) and results[0].code == "deadline-exceeded"


def test_a_request_cancelled_while_it_waits_frees_its_slot_and_ends_its_steps():
    execution = Execution([GateSpec("light", 1, 32, 0, "light work")], 25.0)
    ended: list[str] = []

    def run():
        try:
            yield (lambda n: n), 1
        finally:
            ended.append("closed")

    async def scenario():
        async def one():
            async with execution.ticket(open_request(), "light") as ticket:
                return await ticket.run(run, inline=True)

        task = asyncio.ensure_future(one())
        await asyncio.sleep(0)  # the job has asked for its call
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended == ["closed"]  # now, not when the generator is collected
        async with execution.ticket(open_request(), "light") as ticket:  # the one slot is free
            return await asyncio.wait_for(ticket.run(lambda: "next", inline=True), 1.0)

    assert asyncio.run(scenario()) == "next"
    gate = execution.gates["light"]
    assert gate.running == 0 and gate.waiting == 0
    assert execution.model_calls.status()["calls"] == 0  # the cancelled job's call was not made
    execution.shutdown()


def test_steps_after_a_call_cannot_leave_the_event_loop():
    def job(n: int):
        def run():
            yield (lambda m: m), n
            inline_budget(instances=INLINE_MAX_INSTANCES + 1)
        return run

    results, _, _ = run_jobs(1, job)
    assert isinstance(results[0], RuntimeError) and "after its first model call" in str(results[0])


def test_a_call_raising_stopiteration_fails_its_own_job_only():
    def model(n: int) -> int:
        if n == 0:
            raise StopIteration
        return n

    results, _, _ = run_jobs(2, lambda n: (lambda: (yield model, n)))
    assert isinstance(results[0], RuntimeError) and results[1] == 1


def test_a_call_whose_job_has_gone_is_not_made():
    calls = ModelCalls()
    made: list[int] = []

    async def scenario():
        gone = calls.submit(made.append, 1)
        kept = calls.submit(made.append, 2)
        gone.cancel()
        await asyncio.wait_for(kept, 1.0)

    asyncio.run(scenario())
    assert made == [2] and calls.status() == {"groups": 1, "calls": 1, "batched": 0}


def test_no_job_waits_for_a_call_that_a_broken_group_did_not_make():
    calls = ModelCalls()

    async def scenario():
        first = calls.submit(lambda n: (_ for _ in ()).throw(KeyboardInterrupt()), 1)  # not an Exception
        second = calls.submit(lambda n: n, 2)
        with pytest.raises(KeyboardInterrupt):
            calls.run()
        assert first.done() and second.done()
        with pytest.raises(RuntimeError, match="not made"):
            second.result()
        first.exception()

    asyncio.run(scenario())


def test_run_to_end_makes_the_calls_in_turn_and_throws_a_failure_into_the_steps():
    def model(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n * 2

    def job(first: int):
        try:
            a = yield model, first
        except ValueError:
            return "caught"
        b = yield model, a
        return b

    assert run_to_end(job, 3) == 12
    assert run_to_end(job, -1) == "caught"
    assert run_to_end(lambda: "plain") == "plain"  # a plain function's result as it is
    with pytest.raises(ValueError):
        run_to_end(lambda: (yield model, -1))


class RowModel:
    """A batchable model as a task writes one: each row's answer is its own (its sum and the row
    count of the call that made it, so a test can tell a joined call from single ones)."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.calls: list[int] = []  # the rows of each call made
        self.fail_on = fail_on

    @batchable
    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if self.fail_on is not None and (batch == self.fail_on).any():
            raise ValueError(f"bad row {self.fail_on}")
        sums = batch.reshape(len(batch), -1).sum(axis=1)
        return np.stack([sums, np.full(len(batch), len(batch))], axis=1)


def test_the_calls_of_a_batchable_model_are_made_as_one_and_each_job_gets_its_own_rows():
    model = RowModel()
    rows = {0: np.full((1, 2, 2), 1.0), 1: np.full((3, 2, 2), 2.0), 2: np.full((2, 2, 2), 3.0)}

    def job(n: int):
        def run():
            return (yield model.predict, rows[n])
        return run

    results, _, execution = run_jobs(3, job)
    assert model.calls == [6]  # one call for the three jobs' six rows
    for n, result in enumerate(results):  # each job its own rows, in its order
        assert result.tolist() == [[4.0 * (n + 1), 6.0]] * len(rows[n])
    assert execution.model_calls.status() == {"groups": 1, "calls": 3, "batched": 3}


def test_only_arguments_with_the_same_row_shape_and_type_are_joined():
    model = RowModel()
    args = [np.ones((1, 2, 2)), np.ones((1, 3, 3)), np.ones((1, 2, 2)), np.ones((1, 2, 2), np.float32)]

    def job(n: int):
        def run():
            return (yield model.predict, args[n])
        return run

    results, _, execution = run_jobs(4, job)
    assert sorted(model.calls) == [1, 1, 2]  # jobs 0 and 2 joined; 3 x 3 rows and float32 alone
    assert [r[0, 0] for r in results] == [4.0, 9.0, 4.0, 4.0]
    assert [r[0, 1] for r in results] == [2, 1, 2, 1]
    assert execution.model_calls.status()["batched"] == 2


def test_when_the_joined_call_fails_each_call_is_made_alone_and_only_its_own_job_fails():
    model = RowModel(fail_on=7.0)
    args = [np.full((2, 2), 1.0), np.full((1, 2), 7.0), np.full((1, 2), 3.0)]

    def job(n: int):
        def run():
            try:
                return (yield model.predict, args[n])
            except ValueError as exc:
                raise ProblemError(422, "bad-input", str(exc)) from exc
        return run

    results, _, execution = run_jobs(3, job)
    assert model.calls == [4, 2, 1, 1]  # the joined call, then each alone
    assert results[0].tolist() == [[2.0, 2.0], [2.0, 2.0]] and results[2].tolist() == [[6.0, 1.0]]
    assert isinstance(results[1], ProblemError) and results[1].code == "bad-input"
    assert execution.model_calls.status() == {"groups": 1, "calls": 3, "batched": 0}


def test_a_batch_leaves_out_the_calls_whose_jobs_have_gone():
    model = RowModel()
    calls = ModelCalls()

    async def scenario():
        first = calls.submit(model.predict, np.full((1, 2), 1.0))
        gone = calls.submit(model.predict, np.full((2, 2), 2.0))
        last = calls.submit(model.predict, np.full((1, 2), 3.0))
        gone.cancel()
        return await asyncio.wait_for(asyncio.gather(first, last), 1.0)

    first, last = asyncio.run(scenario())
    assert model.calls == [2]  # the two live calls' rows only
    assert first.tolist() == [[2.0, 2.0]] and last.tolist() == [[6.0, 2.0]]
    assert calls.status() == {"groups": 1, "calls": 2, "batched": 2}


def test_a_batchable_call_that_does_not_answer_an_array_of_rows_is_made_alone(caplog):
    class Pair:
        def __init__(self) -> None:
            self.calls: list[int] = []

        @batchable
        def predict(self, batch):  # marked batchable, but answers a tuple (two outputs)
            self.calls.append(len(batch))
            return np.asarray(batch).sum(axis=1), len(batch)

    model = Pair()
    args = [np.ones((1, 2)), np.ones((1, 2)), [[1.0, 2.0]], [[3.0, 4.0]]]  # two arrays, two lists

    def job(n: int):
        def run():
            return (yield model.predict, args[n])
        return run

    with caplog.at_level("WARNING", logger="app.execution"):
        results, _, execution = run_jobs(4, job)
    assert model.calls == [2, 1, 1, 1, 1]  # the arrays' joined call, then each alone; lists never joined
    assert [(r[0].tolist(), r[1]) for r in results] == [([2.0], 1), ([2.0], 1), ([3.0], 1), ([7.0], 1)]
    assert execution.model_calls.status() == {"groups": 1, "calls": 4, "batched": 0}
    assert [r.getMessage() for r in caplog.records].count(
        "a batchable model call failed on rows joined; its calls are made alone") == 1
