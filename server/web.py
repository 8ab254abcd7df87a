"""The browser client (clients/web) at `/` and `/static/<file>`.

No API-key check here: the page is public and the key is typed into it; the WebSocket it opens
(`/v1/realtime`) checks the key. Only the files shipped in clients/web are served (no directory
walking); they are installed as package data of `clients`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

WEB_DIR = Path(str(files("clients") / "web"))
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# Revalidate every time: a browser must not keep an old app.js after the server is upgraded.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = WEB_DIR / name
    suffix = Path(name).suffix
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in _TYPES or not path.is_file():
        raise HTTPException(status_code=404, detail="not found")
    return FileResponse(path, media_type=_TYPES[suffix], headers=_HEADERS)


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    return _file(name)
