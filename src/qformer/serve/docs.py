"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) with their scripts, styles and icon served by this
server, not by a CDN: FastAPI's own pages load them from cdn.jsdelivr.net (and ReDoc's fonts from
Google), so on a machine without internet, where a model server often runs, they showed a blank page.

The files come from the PyPI package drf-spectacular-sidecar (in the ``serve`` extra): it republishes
npm's swagger-ui-dist and redoc every month, and its Swagger UI (5.x) renders the OpenAPI 3.1 that
FastAPI writes, which swagger-ui-bundle's Swagger UI 4 refuses. It is a Django app, but only its
static files are read here: Django is installed with it and never imported. Without the package the
server still starts; the two pages answer 404 naming it, and ``/openapi.json`` is served as ever.

ReDoc's script still asks cdn.redoc.ly for the small logo of its "API docs by Redocly" link, which
it hides when that fails; nothing the pages need comes from anywhere but this server.
"""

from __future__ import annotations

import importlib.util
import logging

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles

logger = logging.getLogger(__name__)
PACKAGE = "drf_spectacular_sidecar"
ASSETS_URL = "/docs-assets"  # its own first path segment: the metrics count these files apart from the pages
MISSING = ("{page} needs the package drf-spectacular-sidecar (its scripts are served from here, not from a CDN): "
           "pip install 'qformer[serve]'; /openapi.json describes the API meanwhile")


def add_docs(app: FastAPI) -> None:
    """``/docs``, ``/redoc`` and the files they load (under ``ASSETS_URL``) on ``app``, which must
    have been made with ``docs_url=None, redoc_url=None``; a 404 in words on both pages when the
    package is missing (a warning in the log at start)."""
    found = importlib.util.find_spec(PACKAGE) is not None  # located, not imported: importing it imports Django
    if found:
        app.mount(ASSETS_URL, StaticFiles(packages=[(PACKAGE, f"static/{PACKAGE}")]), name="docs-assets")
    else:
        logger.warning("/docs and /redoc are off: %s is not installed (pip install 'qformer[serve]')", PACKAGE)

    def base(request: Request) -> str:
        """The path prefix a proxy serves the app under (``root_path``), as FastAPI's own pages use it."""
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/docs", include_in_schema=False, response_model=None)
    async def swagger_ui(request: Request) -> HTMLResponse | JSONResponse:
        if not found:
            return JSONResponse({"error": MISSING.format(page="/docs")}, status_code=404)
        assets = base(request) + ASSETS_URL
        return get_swagger_ui_html(openapi_url=base(request) + app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{assets}/swagger-ui-dist/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui-dist/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/swagger-ui-dist/favicon-32x32.png")

    @app.get("/redoc", include_in_schema=False, response_model=None)
    async def redoc(request: Request) -> HTMLResponse | JSONResponse:
        if not found:
            return JSONResponse({"error": MISSING.format(page="/redoc")}, status_code=404)
        assets = base(request) + ASSETS_URL
        return get_redoc_html(openapi_url=base(request) + app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{assets}/redoc/bundles/redoc.standalone.js",
                              redoc_favicon_url=f"{assets}/swagger-ui-dist/favicon-32x32.png",
                              with_google_fonts=False)
