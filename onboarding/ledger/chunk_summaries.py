"""Chunk summaries: what each chunk of a batch fanned out over deployments came to, kept
until the parent has merged them (see flows/onboard_chunk.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from onboarding.clock import utcnow
from onboarding.ledger.database import Repository
from onboarding.ledger.engine import reconnecting
from onboarding.ledger.schema import batch_chunks


class ChunkSummaries(Repository):
    """A batch's chunk summaries (a RunSummary's versioned JSON each)."""

    def record_chunk(
        self, batch_id: str, chunk: int, flow_run_id: str | None, summary: dict[str, Any]
    ) -> None:
        """A chunk's summary, once it has run; a second write of the same chunk replaces it."""
        values = {"flow_run_id": flow_run_id, "summary": summary, "finished_at": utcnow()}
        self.db.upsert(batch_chunks, {"batch_id": batch_id, "chunk": chunk}, values)

    @reconnecting
    def forget_batch(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(batch_chunks.delete().where(batch_chunks.c.batch_id == batch_id))

    @reconnecting
    def forget_chunks_before(self, when: datetime) -> int:
        """Chunk summaries of batches whose parent never came back for them (it was killed)."""
        with self.engine.begin() as conn:
            done = conn.execute(batch_chunks.delete().where(batch_chunks.c.finished_at < when))
        return int(done.rowcount or 0)

    @reconnecting
    def chunk_summary(self, batch_id: str, chunk: int) -> dict[str, Any] | None:
        query = select(batch_chunks.c.summary).where(
            batch_chunks.c.batch_id == batch_id, batch_chunks.c.chunk == chunk
        )
        with self.engine.connect() as conn:
            summary = conn.execute(query).scalar_one_or_none()
        return dict(summary) if summary is not None else None
