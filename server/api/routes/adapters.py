"""A tenant's own adapters: their versions, the golden set they are evaluated on, the promotion policy, and the
evaluation reports.

Everything is scoped to the caller's tenant: another tenant's adapter is a 404, as if it did not exist.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from adapters.names import check_name
from server.api.deps import ServicesDep, TenantDep
from server.api.paging import AdminLimit, After
from server.evaluation import runs
from server.publishing import canary
from server.wire.openai import AdapterOut, AdapterUpdate
from server.wire.pages import Page

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
ReportFormat = Annotated[Literal["json", "csv"], Query(description="`csv`: one row per set and model.")]


def report_response(report: dict, format: str) -> dict | Response:
    return report if format == "json" else Response(runs.report_csv(report), media_type="text/csv")


@router.get("")
def list_adapters(tenant: TenantDep, services: ServicesDep, limit: AdminLimit = 100,
                  after: After = None) -> Page[AdapterOut]:
    adapters, more = services.store.adapter_page(tenant.id, limit, after)
    return Page.of([AdapterOut.of(a) for a in adapters], more, id_of=lambda adapter: adapter.name)


@router.get("/{name}")
def get_adapter(name: str, tenant: TenantDep, services: ServicesDep) -> AdapterOut:
    return _adapter_out(services, tenant.id, name)


@router.patch("/{name}")
async def update_adapter(name: str, body: AdapterUpdate, tenant: TenantDep, services: ServicesDep) -> AdapterOut:
    """The golden set its versions are evaluated on, and the promotion policy that decides which one serves."""
    await runs.configure(services, tenant.id, check_name(name, "adapter"), body.changes())
    return await run_in_threadpool(_adapter_out, services, tenant.id, name)


@router.post("/{name}/versions/{version}/evaluate")
async def evaluate_version(name: str, version: int, tenant: TenantDep, services: ServicesDep) -> dict:
    """Evaluate the version on the adapter's golden set now, on the engine that serves it; the report is stored."""
    return await canary.evaluate(services, tenant.id, check_name(name, "adapter"), version)


@router.get("/{name}/versions/{version}/evaluation", response_model=None)
def version_evaluation(name: str, version: int, tenant: TenantDep, services: ServicesDep,
                       format: ReportFormat = "json") -> dict | Response:
    return report_response(runs.stored_report(services, tenant.id, check_name(name, "adapter"), version), format)


def _adapter_out(services, tenant: str, name: str) -> AdapterOut:
    return AdapterOut.of(services.store.require_adapter(tenant, check_name(name, "adapter")))
