"""The HTTP service: ``genrec serve --checkpoint DIR`` (FastAPI + uvicorn), see ``genrec.serve.app``."""

from genrec.serve.app import create_app

__all__ = ["create_app"]
