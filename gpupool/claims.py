"""How schedulers sharing one database split the work (used by ``State.claim_experiments``):
each says it is alive through a presence row in the leases table, and takes an even share of
the running experiments; the holder of the placement lease also takes the pending ones."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from gpupool import db
from gpupool.lifecycle import ExperimentState

PRESENCE = "daemon:"  # lease rows saying a scheduler is alive (name: PRESENCE + hash of owner)


def presence_name(owner: str) -> str:
    return PRESENCE + hashlib.sha256(owner.encode()).hexdigest()[:24]


def renew_presence(conn: sa.Connection, owner: str, now: float, ttl: float,
                   holder_dead: Callable[[str], bool] | None) -> int:
    """Say ``owner`` is alive until ``now + ttl``; return how many schedulers are alive. The
    write comes first, so SQLite takes its write lock before anything is read."""
    table, name = db.leases, presence_name(owner)
    values = dict(owner=owner, expires_at=now + ttl)
    if conn.execute(table.update().where(table.c.name == name).values(**values)).rowcount == 0:
        conn.execute(table.insert().values(name=name, **values))
    owners = conn.execute(sa.select(table.c.owner).where(
        table.c.name.startswith(PRESENCE), table.c.expires_at > now)).scalars().all()
    alive = [o for o in owners if o == owner or holder_dead is None or not holder_dead(o)]
    return max(1, len(alive))


def share_of(rows: Sequence[Any], owner: str, now: float, share: int, placing: bool,
             holder_dead: Callable[[str], bool] | None) -> tuple[list[str], list[str], list[str]]:
    """(ids to claim, ids to let go, owners known dead) for ``owner`` among ``rows``."""
    dead: dict[str, bool] = {}

    def free(row: Any) -> bool:
        if row.claimed_by is None or row.claim_expires is None or row.claim_expires <= now:
            return True
        if holder_dead is None:
            return False
        if row.claimed_by not in dead:
            dead[row.claimed_by] = holder_dead(row.claimed_by)
        return dead[row.claimed_by]

    pending = ExperimentState.PENDING.value
    mine = [r for r in rows if r.claimed_by == owner]
    others_free = [r for r in rows if r.claimed_by != owner and free(r)]
    take = [r.id for r in mine + others_free if r.state == pending] if placing else []
    drop = [r.id for r in mine if r.state == pending and not placing]
    running_mine = [r.id for r in mine if r.state != pending]
    running_free = [r.id for r in others_free if r.state != pending]
    take += running_mine[:share] + running_free[:max(0, share - len(running_mine))]
    drop += running_mine[share:]
    return take, drop, [o for o, gone in dead.items() if gone]
