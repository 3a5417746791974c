"""The adapter registry: `<root>/<tenant>/<adapter>/<version>/`, immutable versions, atomic publish.

Publishing copies the adapter into a staging folder on the same file system (`<root>/.staging`),
validates the copy (never the source, which could change underneath), writes `manifest.json`, fsyncs,
and renames the folder into place. A crash leaves either the whole version or nothing; leftovers in
the staging folder are removed at a later start-up, once an hour old (gateways sharing the registry may
be publishing meanwhile). The rename is made durable by fsyncing the folder it lands in, and every
folder that publish created above it (a new tenant's or adapter's). The database row is written after
the rename and records which version is active.

Which version is active (the rule; `server.storage.store` enforces it):
- A publish activates its version only if it is newer than the active one, in one conditional UPDATE:
  concurrent publishes end with the highest number active, whatever order they finish in.
- A new version is `unverified` until an engine has loaded it: the gateway's upload loads it before
  activating it (an engine that refuses it means it is never published); where no engine could try it
  (engine down at upload, `loraserve adapter publish`, a training job) it becomes active unverified, and
  its first real load on an engine is the verification. If that load is refused, the version becomes
  `refused` (never active again) and the adapter falls back to the version active before it, with an
  audit entry (`server.publishing.lifecycle.engine_loaded`).
- Per-tenant quotas (`AdapterQuota`: adapters, bytes of all versions) are checked when the version's row
  is written; over one, the version is removed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from adapters.names import InvalidName, check_name, is_valid_name
from adapters.validate import ADAPTER_FILES, BaseModelSpec, validate_adapter_dir

MANIFEST_FILE = "manifest.json"
_STAGING = ".staging"
_STALE_AFTER_SECONDS = 3600


@dataclass(frozen=True)
class AdapterQuota:
    """What one tenant may keep in the registry; None: no limit of that kind."""

    max_adapters: int | None = None
    max_bytes: int | None = None  # all versions of all its adapters together


@dataclass(frozen=True)
class PublishedVersion:
    tenant: str
    name: str
    version: int
    path: Path
    manifest: dict
    active: bool = False  # it became the active version


class Registry:
    def __init__(self, root: Path, store, base: BaseModelSpec, quota: AdapterQuota | None = None):
        self.root = root.resolve()
        self.store = store
        self.base = base
        self.quota = quota or AdapterQuota()
        self.staging = self.root / _STAGING

    def prepare(self) -> None:
        """Create the folders and drop what interrupted publishes left in staging. Only leftovers older
        than an hour go: gateways sharing this registry may be publishing right now."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True)
        cutoff = time.time() - _STALE_AFTER_SECONDS
        for entry in self.staging.iterdir():
            with contextlib.suppress(OSError):
                if entry.lstat().st_mtime >= cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.sweep_deleted()

    def version_path(self, tenant: str, name: str, version: int) -> Path:
        path = (self.root / check_name(tenant, "tenant") / check_name(name, "adapter") / str(int(version)))
        path = path.resolve()
        if not path.is_relative_to(self.root):  # names are checked, but the wall stays here too
            raise ValueError("adapter path escapes the registry")
        return path

    def publish(self, source: Path, tenant: str, name: str, *, origin: str, activate: bool = True) -> PublishedVersion:
        """Validate the adapter in `source` and record it as the newest version of `tenant/name`, unverified
        (the active one, if `activate` and no newer one is; see the module's rule)."""
        check_name(name, "adapter")
        if name == "default":
            raise InvalidName("The adapter name 'default' is reserved: it means the tenant's default adapter.")
        self.store.require_tenant(tenant)
        self.staging.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="publish-", dir=self.staging))
        try:
            for filename in os.listdir(source):
                _stage_entry(source / filename, work / filename)
            info = validate_adapter_dir(work, self.base)
            files = {f: _file_digest(work / f) for f in ADAPTER_FILES}
            for extra in set(os.listdir(work)) - set(ADAPTER_FILES):
                os.unlink(work / extra)  # validated as harmless (a README), not kept
            return self._commit(work, tenant, name, origin, info, files, activate)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _commit(self, work: Path, tenant: str, name: str, origin: str, info, files, activate) -> PublishedVersion:
        adapter_dir = self.root / tenant / name
        created = [p for p in (adapter_dir.parent, adapter_dir) if not p.is_dir()]
        adapter_dir.mkdir(parents=True, exist_ok=True)
        while True:
            version = self.store.reserve_version(tenant, name)
            manifest = {
                "tenant": tenant, "name": name, "version": version,
                "base_model": self.base.model_id, "served_base_model": self.base.served_name,
                "rank": info.rank, "lora_alpha": info.alpha, "target_modules": list(info.target_modules),
                "files": files, "size_bytes": sum(f["size"] for f in files.values()),
                "created": datetime.now(timezone.utc).isoformat(), "source": origin,
            }
            _write_synced(work / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
            _fsync_dir(work)
            final = self.version_path(tenant, name, version)
            if final.exists():
                continue  # left by a crash between rename and database row; its number stays burnt
            work.chmod(0o755)
            os.rename(work, final)  # atomic: the version appears whole or not at all
            # Durable: the entry in its folder, and the entries of the folders made above it just now.
            for folder in {adapter_dir, *(p.parent for p in created)}:
                _fsync_dir(folder)
            try:
                active = self.store.add_version(
                    tenant, name, version, rank=info.rank, size_bytes=manifest["size_bytes"], source=origin,
                    activate=activate, max_adapters=self.quota.max_adapters, max_bytes=self.quota.max_bytes,
                )
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                for folder in reversed(created):  # a refused first version leaves no empty folders
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise
            return PublishedVersion(tenant, name, version, final, manifest, active)

    def manifest(self, tenant: str, name: str, version: int) -> dict:
        return json.loads((self.version_path(tenant, name, version) / MANIFEST_FILE).read_text())

    def remove(self, tenant: str, name: str | None = None, version: int | None = None) -> None:
        """Remove a version, an adapter or a whole tenant from disk. The folder is first renamed into
        staging (atomic: the engine can no longer find it), then deleted. A version takes its adapter's and
        tenant's folders with it when it leaves them empty.

        A deleted version that an engine may still read is removed only once no engine holds it (see
        `EnginePool.discard`, and `mark_deleted`)."""
        target = self.root / check_name(tenant, "tenant")
        if name is not None:
            target = target / check_name(name, "adapter")
            if version is not None:
                target = target / str(int(version))
        if target.exists():
            self.staging.mkdir(parents=True, exist_ok=True)
            doomed = Path(tempfile.mkdtemp(prefix="delete-", dir=self.staging))
            os.rename(target, doomed / "x")
            shutil.rmtree(doomed, ignore_errors=True)
        if version is not None:
            _remove_if_empty(target.parent, target.parent.parent)

    def mark_deleted(self, tenant: str, name: str, version: int) -> None:
        """Note that a version left the database while its folder stays for the engines: its folder's time
        becomes now, so that `sweep_deleted` on another gateway sharing the registry leaves it an hour."""
        with contextlib.suppress(OSError):
            os.utime(self.version_path(tenant, name, version))

    def sweep_deleted(self) -> None:
        """At start-up: remove version folders the database no longer lists, once an hour old. They are what
        a gateway that stopped before the engines let go of a deleted version left, or a crash between a
        publish's rename and its database row; younger ones may be held or being published by another
        gateway sharing this registry. Emptied adapter and tenant folders go too."""
        cutoff = time.time() - _STALE_AFTER_SECONDS

        def stale(path: Path) -> bool:
            with contextlib.suppress(OSError):
                return path.is_dir() and not path.is_symlink() and path.lstat().st_mtime < cutoff
            return False

        for tenant_dir in _named_dirs(self.root):
            for adapter_dir in _named_dirs(tenant_dir):
                adapter = self.store.get_adapter(tenant_dir.name, adapter_dir.name)
                listed = set(adapter.versions) if adapter else set()
                for version_dir in _named_dirs(adapter_dir):
                    number = version_dir.name
                    if number.isascii() and number.isdecimal() and int(number) not in listed and stale(version_dir):
                        self.remove(tenant_dir.name, adapter_dir.name, int(number))
                if stale(adapter_dir):
                    _remove_if_empty(adapter_dir)
            if stale(tenant_dir):
                _remove_if_empty(tenant_dir)


def _named_dirs(folder: Path) -> list[Path]:
    """The sub-folders of `folder` with valid tenant/adapter names or version numbers (never `.staging`...)."""
    with contextlib.suppress(OSError):
        return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()
                and (p.name.isdecimal() or is_valid_name(p.name))]
    return []


def _remove_if_empty(*folders: Path) -> None:
    """rmdir each in turn, stopping at the first that is not empty (or gone): a publish into it wins."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _stage_entry(src: Path, dst: Path) -> None:
    """Copy an adapter file; anything else is staged as an empty stand-in of the same name and kind,
    which is all validation needs to judge it (and no bytes of it are read)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
    elif src.is_file() and src.name in ADAPTER_FILES:
        shutil.copyfile(src, dst)
    else:
        dst.touch()


def _file_digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size}


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
