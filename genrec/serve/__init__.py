"""The HTTP service: ``genrec serve --checkpoint DIR [--ranker DIR]`` (FastAPI + uvicorn).

    app        the app: routes, status codes (``create_app``)
    schemas    request / response bodies, their bounds, parsing a raw body (400 / 415 / 422)
    batching   micro-batching of concurrent requests into forward passes
    two_stage  retrieve -> rank: a Recommender's top retrieve_k re-ranked by a Ranker (``genrec serve --ranker``)
    metrics    Prometheus metrics, one process or summed over worker processes
    middleware the body size limit (413), internal errors (500), request metrics
    workers    running the server: one process, or N worker processes under a supervisor
"""

from genrec.serve.app import create_app

__all__ = ["create_app"]
