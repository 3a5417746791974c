"""Serves the console's files: the page at `/console`, its scripts and styles under `/console/static/`.

The files hold no data and need no key; everything the page shows comes from the admin API, which the page
calls with the admin key it keeps in memory (a bearer header, never a cookie: no request of another site can
carry it, so there is nothing to forge). The headers forbid what a console must never do: run inline or foreign
scripts, be framed, leak its URL, or be cached with an operator's view in it.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

from server.errors import NotFound

router = APIRouter(prefix="/console", include_in_schema=False)

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8"}


def _static_files() -> dict[str, bytes]:
    """Every file the package ships under static/, by its path there: nothing else can be asked for."""
    files: dict[str, bytes] = {}

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif not entry.name.startswith("."):
                files[prefix + entry.name] = entry.read_bytes()

    walk(resources.files("server.console") / "static", "")
    return files


_FILES = _static_files()


def _serve(path: str) -> Response:
    body = _FILES.get(path)
    if body is None:
        raise NotFound("Unknown route.")
    suffix = path[path.rfind("."):]
    media_type = _TYPES.get(suffix, "application/octet-stream")
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("")
@router.get("/")
def console_page() -> Response:
    return _serve("index.html")


@router.get("/static/{path:path}")
def console_file(path: str) -> Response:
    return _serve(path)
