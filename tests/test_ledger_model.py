"""A hypothesis state machine drives random records, batches and retries against a model."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from ledger import postings
from tests.conftest import Mesh, empty_tables
from tests.ledger_checks import assert_ledger_invariants

ACCOUNTS = ["world", "user:1", "user:2", "user:3"]
CURRENCIES = ["EUR", "USD"]
INT64_MAX = 2**63 - 1

transfers = st.builds(
    lambda source, target, amount, currency, memo: {
        "from": source,
        "to": target,
        "amount": amount,
        "currency": currency,
        "memo": memo,
    },
    st.sampled_from(ACCOUNTS),
    st.sampled_from(ACCOUNTS),
    st.one_of(st.integers(1, 500), st.sampled_from([INT64_MAX, INT64_MAX // 2 + 1])),
    st.sampled_from(CURRENCIES),
    st.sampled_from(["", "memo", 'ü\n"x"']),
)


class Model:
    def __init__(self) -> None:
        self.balances: dict[tuple[str, str], int] = defaultdict(int)
        self.recorded: dict[str, dict] = {}
        self.seq = 0

    def refusal(self, transfer: dict, overlay: dict[tuple[str, str], int]) -> str | None:
        """What the contract says about one transfer; on success its effect goes into `overlay`."""
        earlier = self.recorded.get(transfer["id"])
        if earlier is not None:
            return None if earlier == transfer else "idempotency_conflict"
        if transfer["from"] == transfer["to"]:
            return "same_account"
        debit, credit = (transfer["from"], transfer["currency"]), (transfer["to"], transfer["currency"])
        debit_after = overlay.get(debit, self.balances[debit]) - transfer["amount"]
        credit_after = overlay.get(credit, self.balances[credit]) + transfer["amount"]
        if debit_after < 0 and transfer["from"] != "world":
            return "insufficient_funds"
        if debit_after < -(2**63) or credit_after > INT64_MAX:
            return "amount_overflow"
        overlay[debit], overlay[credit] = debit_after, credit_after
        return None

    def apply(self, batch: list[dict]) -> str | None:
        overlay: dict[tuple[str, str], int] = {}
        staged: dict[str, dict] = {}
        for transfer in batch:
            earlier = staged.get(transfer["id"])
            if earlier is not None:
                if earlier != transfer:
                    return "idempotency_conflict"
                continue
            refusal = self.refusal(transfer, overlay)
            if refusal is not None:
                return refusal
            if transfer["id"] not in self.recorded:
                staged[transfer["id"]] = transfer
        self.balances.update(overlay)
        self.recorded.update(staged)
        self.seq += len(staged)
        return None


def machine_for(mesh: Mesh, database: str, loop: asyncio.AbstractEventLoop) -> type[RuleBasedStateMachine]:
    def run(coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            run(empty_tables(database))
            self.model = Model()
            self.counter = 0

        def fresh_id(self) -> str:
            self.counter += 1
            return f"t{self.counter}"

        def send(self, subject: str, body: dict, batch: list[dict]) -> None:
            expected = self.model.apply(batch)
            code, reply = run(mesh.request(subject, body))
            if expected is None:
                assert code is None, (batch, reply)
            else:
                assert (code, reply["error"]["type"]) in {(409, expected), (422, expected)}, (batch, reply)

        @rule(transfer=transfers)
        def record(self, transfer: dict) -> None:
            body = {"id": self.fresh_id(), **transfer}
            self.send("ledger.record", body, [body])

        @rule(batch=st.lists(transfers, min_size=1, max_size=4), reuse=st.booleans())
        def record_batch(self, batch: list[dict], reuse: bool) -> None:
            bodies = [{"id": self.fresh_id(), **transfer} for transfer in batch]
            if reuse and self.model.recorded:
                bodies.append(next(iter(self.model.recorded.values())))
            self.send("ledger.record_batch", {"transfers": bodies}, bodies)

        @precondition(lambda self: self.model.recorded)
        @rule(data=st.data(), change=st.booleans())
        def retry(self, data: st.DataObject, change: bool) -> None:
            original = data.draw(st.sampled_from(sorted(self.model.recorded)))
            body = dict(self.model.recorded[original])
            if change:
                body["amount"] = body["amount"] % 500 + 1 if body["amount"] != 1 else 2
            self.send("ledger.record", body, [body])

        @invariant()
        def balances_match_the_model(self) -> None:
            for account in ACCOUNTS:
                stored = run(mesh.ok("ledger.balance", {"account": account}))["balances"]
                expected = {
                    c: self.model.balances[(account, c)] for c in CURRENCIES if (account, c) in self.model.balances
                }
                assert {c: v for c, v in stored.items()} == {c: v for c, v in expected.items() if v or c in stored}

        def teardown(self) -> None:
            entries = run(assert_ledger_invariants(mesh))
            assert len(entries) == self.model.seq

    return LedgerMachine


async def test_random_records_batches_and_retries_agree_with_the_model(
    mesh: Mesh, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postings, "postings_run_entries", 3)  # history read from runs and from the tail
    machine = machine_for(mesh, database, asyncio.get_running_loop())
    machine_settings = settings(
        max_examples=12, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=machine_settings)
