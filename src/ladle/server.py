"""Running the app under uvicorn with the fastest event loop and HTTP parser available.

Owns process-level set-up (logging, uvicorn); everything else comes from create_app.
"""

from __future__ import annotations

import importlib.util

import uvicorn

from ladle.api.app import create_app
from ladle.config import ServerConfig
from ladle.logs import setup_logging


def serve(config: ServerConfig) -> int:
    setup_logging(config.http.log_level, config.http.log_format)
    app = create_app(config)
    has = importlib.util.find_spec
    uv_config = uvicorn.Config(
        app,
        host=config.http.host,
        port=config.http.port,
        loop="uvloop" if has("uvloop") else "asyncio",
        http="httptools" if has("httptools") else "h11",
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(uv_config)
    server.run()
    return 0 if server.started else 1
