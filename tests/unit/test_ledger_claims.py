"""Claims (Ledger.claim): who works on a (tenant, connector) now. On both backends: a claim is
given once, kept by its holder while its lease is renewed, taken over once the lease lapses,
let go when the run ends; two runs claiming the same tenants at once never both get one."""

from __future__ import annotations

import threading
from datetime import timedelta

from onboarding.clock import utcnow
from onboarding.ledger import Ledger

CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"


def keys(n: int, prefix: str = "t") -> list[tuple[str, str]]:
    return [(f"{prefix}{i:04d}", CONNECTOR) for i in range(n)]


def test_a_claim_is_given_once_and_kept_by_its_holder(ledger: Ledger) -> None:
    with ledger.run_lease("a"), ledger.run_lease("b"):
        assert ledger.claim("a", keys(3)) == set(keys(3))
        assert ledger.claim("b", keys(5)) == set(keys(5)[3:])
        assert ledger.claim("a", keys(5)) == set(keys(3)), "its own, and none of b's"


def test_every_lapsed_claim_of_a_large_slice_is_taken_over(ledger: Ledger) -> None:
    """A run killed with several slices of 100 claimed: the next run takes over all of them
    once the lease lapsed (a multi-row upsert once took over 1 of 100 on SQLite)."""
    wanted = keys(350)
    ledger.claim("dead", wanted[:300])  # its lease: never renewed, as after SIGKILL
    with ledger.run_lease("next"):
        assert ledger.claim("next", wanted) == set(wanted)


def test_a_live_lease_keeps_its_claims_until_it_lapses(ledger: Ledger) -> None:
    with ledger.run_lease("a"):
        ledger.claim("a", keys(200))
        assert ledger.claim("b", keys(200)) == set()
        later = utcnow() + timedelta(seconds=60)  # no renewal for a minute: lapsed
        assert ledger.claim("b", keys(200), now=later) == set(keys(200))


def test_ending_the_lease_lets_every_claim_go(ledger: Ledger) -> None:
    with ledger.run_lease("a"):
        ledger.claim("a", keys(120))
        ledger.release("a", keys(20))
        with ledger.run_lease("b"):
            assert ledger.claim("b", keys(120)) == set(keys(20))
    # a ended (its 100 let go) and b ended (its 20): every one is free.
    with ledger.run_lease("c"):
        assert ledger.claim("c", keys(120)) == set(keys(120))


def test_two_runs_claiming_at_once_share_the_tenants_without_overlap(ledger: Ledger) -> None:
    wanted = keys(400)
    got: dict[str, set[tuple[str, str]]] = {}
    start = threading.Barrier(2)

    def run(name: str) -> None:
        with ledger.run_lease(name):
            start.wait()
            held: set[tuple[str, str]] = set()
            for i in range(0, len(wanted), 50):  # slice by slice, as batches claim
                held |= ledger.claim(name, wanted[i : i + 50])
            got[name] = held
            start.wait()  # both hold theirs until both are done

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not got["a"] & got["b"], "no tenant claimed by both"
    assert got["a"] | got["b"] == set(wanted)
