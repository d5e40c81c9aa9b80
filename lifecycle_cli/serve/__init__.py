"""`llmcycle serve`: the one decoder (`generate.Engine`, continuous batching) behind LitGPT's
`/predict` and the OpenAI API.

In the order a request meets them:

    requests.py  each body checked field by field into a job (ids + SamplingParams) or a 4xx
                 JSON error naming the field (HTTP process, no torch)
    app.py       the routes, API-key middleware, the engine's events -> responses / SSE
    worker.py    the LitServe inference worker: EngineAPI (loads the model), EngineLoop (steps
                 the engine; why not LitServe's ContinuousBatchingLoop is said there), and the
                 only uses of LitServe internals
    server.py    build_server / run_server: address checks, the LitServer, signals
"""

from lifecycle_cli.serve.app import BATCH_HEADER, SHUTDOWN_GRACE_S, BearerAuth, Front
from lifecycle_cli.serve.requests import ModelInfo, RequestError, Requests, error_response
from lifecycle_cli.serve.server import build_server, check_address, model_names, run_server
from lifecycle_cli.serve.worker import API_PATH, CANCEL, MAILBOX, EngineAPI, EngineLoop

__all__ = [
    "API_PATH",
    "BATCH_HEADER",
    "BearerAuth",
    "CANCEL",
    "EngineAPI",
    "EngineLoop",
    "Front",
    "MAILBOX",
    "ModelInfo",
    "RequestError",
    "Requests",
    "SHUTDOWN_GRACE_S",
    "build_server",
    "check_address",
    "error_response",
    "model_names",
    "run_server",
]
