"""GET /docs: Swagger UI for /openapi.json, every byte of it served by this API.

The page used to load Swagger UI from a CDN, without integrity: a machine without internet saw
a blank page, and whoever served the CDN's script ran code in the page. Swagger UI's files now
come from the `flask-swagger-ui` package (its `dist/`, Swagger UI's own release files), served
under /docs/assets/ from a fixed list; the page starts Swagger UI from a script of its own (no
inline script), so the page works under a Content-Security-Policy that allows this origin only
(api/security_headers.py's DOCS_CSP).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from flask import Blueprint, Response, abort, send_file

from api.security_headers import DOCS_CSP

blp = Blueprint("docs", __name__)

ASSETS_URL = "/docs/assets/"
SPEC_URL = "/openapi.json"
# The release files the page uses: name -> content type. Nothing else under dist/ is served.
SWAGGER_UI_FILES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}
INIT_SCRIPT = "shoal-docs.js"
ASSET_MAX_AGE_S = 86400

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Shoal API</title>
<link rel="icon" type="image/png" href="{ASSETS_URL}favicon-32x32.png">
<link rel="stylesheet" href="{ASSETS_URL}swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_URL}swagger-ui-bundle.js"></script>
<script src="{ASSETS_URL}{INIT_SCRIPT}"></script>
</body>
</html>
"""

# validatorUrl null: Swagger UI would otherwise send the document to validator.swagger.io.
INIT_JS = f"""window.ui = SwaggerUIBundle({{
  url: "{SPEC_URL}",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true
}});
"""


def swagger_ui_dir() -> Path:
    """Swagger UI's release files, as the flask-swagger-ui package ships them."""
    return Path(str(files("flask_swagger_ui") / "dist"))


@blp.get("/docs")
def page() -> Response:
    response = Response(PAGE, mimetype="text/html")
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response


@blp.get("/docs/assets/<name>")
def asset(name: str) -> Response:
    if name == INIT_SCRIPT:
        response = Response(INIT_JS, content_type="text/javascript; charset=utf-8")
    elif name in SWAGGER_UI_FILES:
        response = send_file(
            swagger_ui_dir() / name, mimetype=SWAGGER_UI_FILES[name], max_age=ASSET_MAX_AGE_S
        )
    else:
        abort(404)
    response.headers["Cache-Control"] = f"public, max-age={ASSET_MAX_AGE_S}"
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response
