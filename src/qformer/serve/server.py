"""What ``qformer serve`` runs once its options are read: the model behind a name, ready to
serve (:func:`load_served`), and the app run with uvicorn until SIGTERM or Ctrl-C (the requests
in flight finish, then the server exits), its connections bounded by the limits."""

from __future__ import annotations

import logging

from qformer.pretrained.auto import ModelDirectory, find_model, load_pretrained
from qformer.serve.limits import Limits

logger = logging.getLogger(__name__)


def server_parts():
    """uvicorn and the app's factory, or one line saying what to install."""
    try:
        import uvicorn

        from qformer.serve.app import create_app
    except ModuleNotFoundError as err:
        raise ImportError(f"qformer serve needs {err.name}: pip install 'qformer[serve]' (FastAPI, uvicorn, "
                          "python-multipart, prometheus_client)") from err
    return uvicorn, create_app


def load_served(name: str | ModelDirectory, device: str | None, dtype: str, gallery: str | None,
                gallery_index: str | None):
    """The model behind ``name`` (a directory or hub id, or what
    :func:`~qformer.pretrained.auto.find_model` found there: stage 1 or stage 2, told by its
    config) ready to serve."""
    from qformer.devices import default_device, parse_device, parse_dtype
    from qformer.loading import model_fingerprint
    from qformer.serve.gallery import Gallery
    from qformer.serve.service import ServedModel

    options = {"dtype": parse_dtype(dtype), "device": parse_device(device or default_device())}
    found = find_model(name)  # a directory holding no model fails here, as for every command
    if found.kind != "stage1":
        if gallery is not None:
            raise ValueError(f"--gallery is searched by a stage-1 model; {found.name} is not one")
        return ServedModel(load_pretrained(found, **options), found.name)
    model = load_pretrained(found, **options)
    index = None if gallery is None else Gallery(model, gallery, model_fingerprint(found.directory), gallery_index)
    return ServedModel(model, found.name, index)


def run_server(served, limits: Limits, host: str, port: int, openai=None) -> None:
    """Serve ``served`` (a :class:`~qformer.serve.service.ServedModel`) on ``host:port`` until
    SIGTERM or Ctrl-C; the requests in flight get ``limits.request_timeout_s`` (and 5 s) to finish.
    The connections are bounded as :mod:`qformer.serve.connections` says; ``openai`` (a
    :class:`~qformer.serve.chat.OpenAIOptions`) sets the OpenAI routes of a stage-2 model."""
    uvicorn, create_app = server_parts()
    from qformer.serve.connections import server_options

    logger.info("serving %s (%s) on http://%s:%d", served.name, served.kind, host, port)
    if served.kind == "stage2" and (openai is None or openai.api_key is None) and not is_loopback(host):
        logger.warning("the /v1 routes ask for no API key, and %s is reachable from other machines: anyone who "
                       "reaches it can use the model; set --api-key (or QFORMER_API_KEY)", host)
    uvicorn.run(create_app(served, limits, openai), host=host, port=port, log_level="info", **server_options(limits))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine alone (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
