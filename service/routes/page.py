"""The web page at `/` (static files, nothing from the internet), its sample photos, and `/stats`, the live
panel's per-model request rate and latency percentiles."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.recent import RECENT

router = APIRouter(tags=["page"])
STATIC = files("service") / "static"
PHOTOS = files("fpet") / "assets" / "photos"  # read here directly: fpet.pretrained imports torch


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text())


@router.get("/stats", summary="Request rate and p50/p95 latency per model over the last minute")
async def stats() -> dict:
    return RECENT.summary()


@router.get("/samples", summary="The packaged sample photos the page offers")
async def samples() -> list[str]:
    return sorted(item.name for item in PHOTOS.iterdir() if item.name.endswith(".jpg"))


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.mount("/samples/files", StaticFiles(directory=str(PHOTOS)), name="samples")
