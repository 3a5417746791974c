"""Adapters and their versions in the database: publishing, activation, verification, refusal, deletion.

`AdapterRecords` is a part of `Store` (it uses the store's sessions and tenant lookup); its methods return
detached views (`AdapterView`), never ORM rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.errors import Missing
from server.errors import StateConflict as Conflict
from server.storage.connection import ROW_LOCK, has_nul
from server.storage.db import Adapter, AdapterVersion, Tenant, VersionSequence, utcnow
from server.storage.paging import keyset_page


class OverQuota(Conflict):
    """Recording the adapter version would pass a tenant's quota (`what`: `adapters` or `adapter_bytes`)."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


@dataclass(frozen=True)
class VersionView:
    version: int
    rank: int
    size_bytes: int
    source: str
    created_at: datetime
    state: str = "verified"  # or `unverified` (no engine has loaded it yet) or `refused` (an engine would not)
    evaluation: dict | None = None  # its latest report on the adapter's golden set
    awaiting_evaluation: bool = False  # whether it becomes active is decided once it is evaluated


@dataclass(frozen=True)
class AdapterView:
    """What the gateway needs to know of one adapter, detached from the session."""

    tenant_id: str
    name: str
    active_version: int | None
    versions: tuple[int, ...]
    created_at: datetime
    version_details: tuple[VersionView, ...] = ()
    golden_set: str | None = None  # the file id of the set its versions are evaluated on
    promotion: str = "always"  # when a new version becomes active (`server.publishing.promotion`)
    max_forgetting: float | None = None
    canary: dict | None = None  # the candidate version taking a share of `NAME` (`server.publishing.canary`)


class AdapterRecords:
    """The adapter methods of `Store`."""

    is_postgres: bool

    def reserve_version(self, tenant_id: str, name: str) -> int:
        """The next version number of `tenant/name`, never handed out before, also to another process or
        gateway: on PostgreSQL one upsert that locks the sequence row; elsewhere the UPDATE takes the
        database's write lock first."""
        if self.is_postgres:
            with self.session() as s:
                bump = pg_insert(VersionSequence).values(tenant_id=tenant_id, name=name, last=1)
                bump = bump.on_conflict_do_update(
                    index_elements=[VersionSequence.tenant_id, VersionSequence.name],
                    set_={"last": VersionSequence.last + 1},
                ).returning(VersionSequence.last)
                return s.scalar(bump)
        where = (VersionSequence.tenant_id == tenant_id, VersionSequence.name == name)
        for _ in range(10):
            try:
                with self.session() as s:
                    bumped = s.execute(update(VersionSequence).where(*where).values(last=VersionSequence.last + 1))
                    if bumped.rowcount == 0:
                        s.add(VersionSequence(tenant_id=tenant_id, name=name, last=1))
                        s.flush()
                    return s.scalar(select(VersionSequence.last).where(*where))
            except IntegrityError:
                continue  # another publisher created the sequence first; bump it instead
        raise RuntimeError("could not reserve a version number")

    def add_version(
        self, tenant_id: str, name: str, version: int, *, rank: int, size_bytes: int, source: str,
        activate: bool = True, max_adapters: int | None = None, max_bytes: int | None = None,
    ) -> bool:
        """Record a published version (its number comes from `reserve_version`), `unverified` until an
        engine loads it; with `activate`, make it active if it is the newest (`activate_if_newer`).
        Returns whether it became active. `OverQuota`, and nothing recorded, when the tenant would then
        have more than `max_adapters` adapters or `max_bytes` bytes of versions. The counts are taken after
        the insert, in its transaction: on SQLite the insert holds the write lock, on PostgreSQL the
        tenant's row is locked first, so concurrent publishes cannot both slip under a quota."""
        for attempt in range(3):
            try:
                with self.session() as s:
                    self._tenant(s, tenant_id, lock=True)
                    adapter = self._adapter(s, tenant_id, name, lock=True)
                    if adapter is None:
                        adapter = Adapter(tenant_id=tenant_id, name=name)
                        s.add(adapter)
                        s.flush()
                    # With a golden set, its evaluation decides whether it becomes active (a gateway takes it up).
                    awaits = activate and adapter.golden_set is not None
                    s.add(AdapterVersion(adapter_id=adapter.id, version=version, rank=rank,
                                         size_bytes=size_bytes, source=source, state="unverified",
                                         promotion_due=utcnow() if awaits else None))
                    s.flush()
                    self._check_quota(s, tenant_id, max_adapters, max_bytes)
                activate = activate and not awaits
                break
            except IntegrityError:  # a concurrent first publish created the adapter row; a retry finds it
                if attempt == 2:
                    raise
        return activate and self.activate_if_newer(tenant_id, name, version)[0]

    @staticmethod
    def _check_quota(s: Session, tenant_id: str, max_adapters: int | None, max_bytes: int | None) -> None:
        if max_adapters is not None:
            count = s.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant_id))
            if count > max_adapters:
                raise OverQuota(f"The tenant already has {max_adapters} adapters, its quota; delete one first.",
                                "adapters")
        if max_bytes is not None:
            total = s.scalar(select(func.coalesce(func.sum(AdapterVersion.size_bytes), 0)).join(Adapter)
                             .where(Adapter.tenant_id == tenant_id))
            if total > max_bytes:
                raise OverQuota(f"This version would bring the tenant's adapters to {total} bytes, above its "
                                f"quota of {max_bytes}; delete old versions first.", "adapter_bytes")

    def activate_if_newer(self, tenant_id: str, name: str, version: int) -> tuple[bool, int | None]:
        """Make a just-published `version` active unless a newer one already is: concurrent publishes end
        with the highest number active, whatever order they finish in. Returns (activated, the version
        active before). The version's `fallback_version` is set to that previous one (see
        `refuse_version`). Two statements, and the conditional UPDATE decides: on SQLite the first write
        takes the database's lock, on PostgreSQL the UPDATE re-checks its condition on the locked row."""
        with self.session() as s:
            adapter_id = self._existing_adapter(s, tenant_id, name).id
            active = select(Adapter.active_version).where(Adapter.id == adapter_id).scalar_subquery()
            s.execute(update(AdapterVersion).where(AdapterVersion.adapter_id == adapter_id,
                                                   AdapterVersion.version == version)
                      .values(fallback_version=active))
            previous = s.scalar(select(AdapterVersion.fallback_version).where(
                AdapterVersion.adapter_id == adapter_id, AdapterVersion.version == version))
            done = s.execute(update(Adapter).where(
                Adapter.id == adapter_id, or_(Adapter.active_version.is_(None), Adapter.active_version < version),
            ).values(active_version=version, canary=None))  # a new active version ends a canary
            return done.rowcount == 1, previous

    def mark_verified(self, tenant_id: str, name: str, version: int) -> bool:
        """An engine loaded the version: `unverified` becomes `verified` (a refusal is never undone)."""
        with self.session() as s:
            done = s.execute(update(AdapterVersion).where(
                AdapterVersion.adapter_id == self._adapter_id(tenant_id, name), AdapterVersion.version == version,
                AdapterVersion.state == "unverified").values(state="verified"))
            return done.rowcount == 1

    def refuse_version(self, tenant_id: str, name: str, version: int) -> tuple[bool, int | None] | None:
        """An engine refused an `unverified` version at its first load: it becomes `refused` and can never
        be active again. If it was active, the adapter falls back to the version active before it (its
        `fallback_version`, following refusals down the chain), else to the newest verified version, else
        to none (NAME answers 404). Returns (it was active, the version active now), or None when the
        version was not unverified (verified versions that fail later are an operational error, not a
        verdict on the adapter)."""
        with self.session() as s:
            marked = s.execute(update(AdapterVersion).where(
                AdapterVersion.adapter_id == self._adapter_id(tenant_id, name), AdapterVersion.version == version,
                AdapterVersion.state == "unverified").values(state="refused"))
            if marked.rowcount != 1:
                return None
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)  # SQLite: under the write lock now
            if (adapter.canary or {}).get("version") == version:
                adapter.canary = None  # a refused candidate serves nothing
            if adapter.active_version != version:
                return False, adapter.active_version
            adapter.active_version = _fallback(adapter, version)
            return True, adapter.active_version

    def get_adapter(self, tenant_id: str, name: str) -> AdapterView | None:
        with self.session() as s:
            adapter = self._adapter(s, tenant_id, name)
            return _view(adapter) if adapter else None

    def require_adapter(self, tenant_id: str, name: str) -> AdapterView:
        """As `get_adapter`, but Missing (a 404) when there is no such adapter."""
        with self.session() as s:
            return _view(self._existing_adapter(s, tenant_id, name))

    def list_adapters(self, tenant_id: str) -> list[AdapterView]:
        with self.session() as s:
            rows = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id).order_by(Adapter.name))
            return [_view(a) for a in rows]

    def adapter_page(self, tenant_id: str, limit: int, after: str | None = None) -> tuple[list[AdapterView], bool]:
        """A page of the tenant's adapters by name, after the name `after`."""
        with self.session() as s:
            rows, more = keyset_page(s, select(Adapter).where(Adapter.tenant_id == tenant_id), (Adapter.name,),
                                     limit=limit, after=None if after is None else (after,))
            return [_view(a) for a in rows], more

    def activate(self, tenant_id: str, name: str, version: int) -> int | None:
        """Make `version` the active one; returns the version that was active before. A `refused` version
        cannot be; an `unverified` one falls back to the previous if an engine refuses it."""
        with self.session() as s:
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)
            row = next((v for v in adapter.versions if v.version == version), None)
            if row is None:
                raise Missing(f"adapter '{name}' has no version {version}")
            if row.state == "refused":
                raise Conflict(f"version {version} was refused by the inference engine; it cannot be made active")
            previous, adapter.active_version = adapter.active_version, version
            if row.state == "unverified" and previous != version:
                row.fallback_version = previous
            adapter.canary = None  # a new active version ends a canary (promoting its candidate, or not)
            return previous

    def set_canary(self, tenant_id: str, name: str, canary: dict | None, *, if_started: str | None = None) -> bool:
        """Start (`canary`) or end (None) the adapter's canary. The candidate must be a version other than the
        active one, and not `refused`. With `if_started`, only the canary started then is ended (a rollback
        decided on old counts does not end a newer canary); returns whether anything changed."""
        with self.session() as s:
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)
            if if_started is not None and (adapter.canary or {}).get("started") != if_started:
                return False
            if canary is not None:
                row = next((v for v in adapter.versions if v.version == canary["version"]), None)
                if row is None:
                    raise Missing(f"adapter '{name}' has no version {canary['version']}")
                if row.version == adapter.active_version:
                    raise Conflict(f"version {row.version} is the active version; a canary needs another one")
                if row.state == "refused":
                    raise Conflict(f"version {row.version} was refused by the inference engine")
                if adapter.active_version is None:
                    raise Conflict(f"adapter '{name}' has no active version to compare a canary with")
            changed = adapter.canary != canary
            adapter.canary = canary
            return changed

    def update_adapter(self, tenant_id: str, name: str, **fields) -> None:
        """Set the adapter's `golden_set`, `promotion` and `max_forgetting` (those given)."""
        assert set(fields) <= {"golden_set", "promotion", "max_forgetting"}, fields
        with self.session() as s:
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)
            for field, value in fields.items():
                setattr(adapter, field, value)

    def claim_due_promotion(self, lease: float) -> tuple[str, str, int, str] | None:
        """A version whose promotion waits for its evaluation, taken for `lease` seconds (by then it is done, or its
        gateway died and another takes it): (tenant, name, version, source), or None. Taken by a conditional
        UPDATE: two gateways never take the same one."""
        now = utcnow()
        with self.session() as s:
            due = s.execute(select(AdapterVersion.id, AdapterVersion.promotion_due, Adapter.tenant_id, Adapter.name,
                                   AdapterVersion.version, AdapterVersion.source).join(Adapter)
                            .where(AdapterVersion.promotion_due <= now).order_by(AdapterVersion.promotion_due)
                            .limit(1)).first()
            if due is None:
                return None
            taken = s.execute(update(AdapterVersion).where(AdapterVersion.id == due.id,
                                                           AdapterVersion.promotion_due == due.promotion_due)
                              .values(promotion_due=now + timedelta(seconds=lease)))
            return (due.tenant_id, due.name, due.version, due.source) if taken.rowcount == 1 else None

    def schedule_promotion(self, tenant_id: str, name: str, version: int, in_seconds: float | None) -> None:
        """Take the version's promotion up again in `in_seconds` (0: now); None: it is decided, no longer waiting."""
        due = None if in_seconds is None else utcnow() + timedelta(seconds=in_seconds)
        with self.session() as s:
            s.execute(update(AdapterVersion).where(
                AdapterVersion.adapter_id == self._adapter_id(tenant_id, name), AdapterVersion.version == version,
            ).values(promotion_due=due))

    def save_evaluation(self, tenant_id: str, name: str, version: int, report: dict) -> None:
        """Store `version`'s evaluation report, replacing an earlier one; Missing if the version is gone."""
        with self.session() as s:
            done = s.execute(update(AdapterVersion).where(
                AdapterVersion.adapter_id == self._adapter_id(tenant_id, name), AdapterVersion.version == version,
            ).values(evaluation=report))
            if done.rowcount != 1:
                raise Missing(f"adapter '{name}' has no version {version}")

    def delete_version(self, tenant_id: str, name: str, version: int) -> None:
        with self.session() as s:
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)
            row = next((v for v in adapter.versions if v.version == version), None)
            if row is None:
                raise Missing(f"adapter '{name}' has no version {version}")
            if adapter.active_version == version:
                raise Conflict(f"version {version} is active; activate another version or delete the adapter")
            if (adapter.canary or {}).get("version") == version:
                adapter.canary = None
            adapter.versions.remove(row)

    def delete_adapter(self, tenant_id: str, name: str) -> list[int]:
        """Delete an adapter and all its versions; returns the version numbers it had."""
        with self.session() as s:
            adapter = self._existing_adapter(s, tenant_id, name, lock=True)
            versions = [v.version for v in adapter.versions]
            tenant = s.get(Tenant, tenant_id, with_for_update=ROW_LOCK)
            if tenant.default_adapter == name:
                tenant.default_adapter = None
            s.delete(adapter)
            return versions

    @staticmethod
    def _adapter(s: Session, tenant_id: str, name: str, lock: bool = False) -> Adapter | None:
        if has_nul(tenant_id, name):
            return None
        stmt = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        return s.scalar(stmt.with_for_update(**ROW_LOCK) if lock else stmt)

    @staticmethod
    def _adapter_id(tenant_id: str, name: str):
        """The adapter's id, as a subquery of the statement it is used in."""
        return select(Adapter.id).where(Adapter.tenant_id == tenant_id, Adapter.name == name).scalar_subquery()

    def _existing_adapter(self, s: Session, tenant_id: str, name: str, lock: bool = False) -> Adapter:
        adapter = self._adapter(s, tenant_id, name, lock)
        if adapter is None:
            raise Missing(f"adapter '{name}' does not exist")
        return adapter


def _fallback(adapter: Adapter, refused: int) -> int | None:
    """Where an adapter goes when its active version `refused` is refused (see `Store.refuse_version`)."""
    rows = {v.version: v for v in adapter.versions}
    seen, target = {refused}, rows[refused].fallback_version
    while target in rows and target not in seen and rows[target].state == "refused":
        seen.add(target)
        target = rows[target].fallback_version
    if target in rows and target not in seen:
        return target
    return max((v for v, row in rows.items() if row.state == "verified"), default=None)


def _view(adapter: Adapter) -> AdapterView:
    details = tuple(VersionView(v.version, v.rank, v.size_bytes, v.source, v.created_at, v.state, v.evaluation,
                                v.promotion_due is not None) for v in adapter.versions)
    return AdapterView(
        tenant_id=adapter.tenant_id, name=adapter.name, active_version=adapter.active_version,
        versions=tuple(v.version for v in details), created_at=adapter.created_at, version_details=details,
        golden_set=adapter.golden_set, promotion=adapter.promotion, max_forgetting=adapter.max_forgetting,
        canary=adapter.canary,
    )
