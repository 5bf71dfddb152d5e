"""`ledger.plan` on its own: one writer batch of many requests against the model, request by request.

The service tests send one request per writer batch more often than not; here every example
is one batch, so a refused request must leave the balances and ids for the requests after it
exactly as they were before it.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bus.errors import ServiceError
from ledger.plan import Head, plan
from schemas.ledger import Transfer
from tests.test_ledger_model import Model, transfers

RECORDED_AT = "2026-11-28T01:02:03.456789Z"

requests = st.lists(
    st.tuples(
        st.lists(st.tuples(st.sampled_from(["t1", "t2", "t3", "t4"]), transfers), min_size=1, max_size=4), st.booleans()
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(requests)
def test_a_batch_is_planned_as_its_requests_one_after_another(drawn: list[tuple[list[tuple[str, dict]], bool]]) -> None:
    bodies = [[{"id": id, **transfer} for id, transfer in request] for request, _ in drawn]
    batched = [is_batch for _, is_batch in drawn]
    planned = [
        [Transfer(t["id"], t["from"], t["to"], t["amount"], t["currency"], t["memo"]) for t in body] for body in bodies
    ]
    balances: dict[tuple[str, str], int] = {}
    result = plan(planned, Head(), {}, balances, RECORDED_AT, batched)

    model = Model()
    for body, outcome, is_batch in zip(bodies, result.outcomes, batched, strict=True):
        refusal = model.apply(body)
        if refusal is None:
            assert not isinstance(outcome, ServiceError), outcome
            assert [entry.id for entry in outcome] == [t["id"] for t in body]
            assert all(model.recorded[entry.id]["amount"] == entry.amount for entry in outcome)
        else:
            assert isinstance(outcome, ServiceError) and outcome.type == refusal, (outcome, refusal)
            assert bool(outcome.details) == is_batch
    assert [entry.seq for entry in result.new_entries] == list(range(1, model.seq + 1))
    assert {entry.id for entry in result.new_entries} == set(model.recorded)
    assert result.head.seq == model.seq
    keys = set(balances) | set(model.balances)
    assert {key: balances.get(key, 0) for key in keys} == {key: model.balances[key] for key in keys}
    assert {key: model.balances[key] for key in result.balances} == result.balances
    assert set(result.balances) >= {key for key, value in model.balances.items() if value != 0}


def test_a_kept_refusal_answers_its_id_ever_after_and_a_recorded_entry_comes_first() -> None:
    spend = Transfer("tx:k", "user:1", "user:2", 5, "EUR")
    first = plan([[spend]], Head(), {}, {}, RECORDED_AT, [False], kept=[True], refused={})
    assert isinstance(first.outcomes[0], ServiceError) and first.outcomes[0].type == "insufficient_funds"
    assert [(r.transfer, r.error.type) for r in first.refusals] == [(spend, "insufficient_funds")]

    funded = {("user:1", "EUR"): 100}
    refused = {spend.id: first.refusals[0]}
    again = plan([[spend]], Head(), {}, dict(funded), RECORDED_AT, [False], kept=[True], refused=refused)
    assert isinstance(again.outcomes[0], ServiceError) and again.outcomes[0].body() == first.refusals[0].error
    assert again.new_entries == [] and again.refusals == []  # kept once: nothing more to store

    other = Transfer("tx:k", "user:1", "user:2", 6, "EUR")
    conflict = plan([[other]], Head(), {}, dict(funded), RECORDED_AT, [False], kept=[True], refused=refused)
    assert isinstance(conflict.outcomes[0], ServiceError) and conflict.outcomes[0].code == 409

    public = plan([[spend]], Head(), {}, dict(funded), RECORDED_AT, [False], kept=[False], refused=refused)
    assert [entry.id for entry in public.new_entries] == ["tx:k"]  # ledger.record: a refused id is free
    recorded = {spend.id: public.new_entries[0]}
    kept_after = plan(
        [[spend]], public.head, recorded, dict(funded), RECORDED_AT, [False], kept=[True], refused=refused
    )
    assert kept_after.outcomes == [[public.new_entries[0]]]
