"""The web UI (``video-infinity serve``): a Gradio app on the same launcher as the command line.

Modules: ``form`` (the form as a run config, with the server's ceilings), ``runs`` (past runs under
``base_path``), ``jobs`` (one generation in a child process), ``studio`` (what the UI does, without
the web), ``app`` (the Gradio wiring). Gradio is an optional dependency (``pip install
'video-infinity[ui]'``): only :func:`serve` and ``app`` import it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..run.config import RunConfig
from .form import Limits
from .studio import Studio

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class MissingUIDependency(UserError):
    """Gradio is not installed."""


def require_gradio() -> None:
    """Raise a one-line :class:`MissingUIDependency` when Gradio cannot be imported."""
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise MissingUIDependency(
            f"the web UI needs Gradio, which is not installed ({exc}): pip install 'video-infinity[ui]'") from None


def exposure_warning(host: str) -> str | None:
    """The warning for a server reachable from other machines (None on a loopback address)."""
    if host in LOCAL_HOSTS:
        return None
    return (f"serving on {host}: anyone who can reach this address can start generations on this machine and "
            "watch the videos under base_path (there is no login); use --host 127.0.0.1 to keep it local")


def serve(*, base_path: str | Path, host: str = "127.0.0.1", port: int = 7860, limits: Limits | None = None,
          template: RunConfig | None = None, block: bool = True, step_sleep_s: float = 0.0) -> object:
    """Start the web UI; returns the Gradio app (``block=False``: without waiting for it to close).
    ``step_sleep_s``: test only, see :attr:`video_infinity.run.contract.RunRequest.step_sleep_s`."""
    require_gradio()
    from .app import PAGE_CSS, build_app

    warning = exposure_warning(host)
    if warning is not None:
        logger.warning(warning)
    studio = Studio(base_path, limits=limits, template=template, step_sleep_s=step_sleep_s)
    studio.base.mkdir(parents=True, exist_ok=True)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    # Only base_path is served: the videos and contact sheets the app shows come from there.
    try:
        app.launch(server_name=host, server_port=port, allowed_paths=[str(studio.base)], prevent_thread_lock=not block,
                   show_error=True, quiet=False, footer_links=["api"], css=PAGE_CSS)
    finally:
        if block:  # the server is closing (Ctrl-C): a run in progress stops with it, its checkpoint kept
            studio.cancel()
    return app


__all__ = ["LOCAL_HOSTS", "Limits", "MissingUIDependency", "Studio", "exposure_warning", "require_gradio", "serve"]
