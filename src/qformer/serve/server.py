"""What ``qformer serve`` runs once its options are read: the model behind a name, ready to
serve (:func:`load_served`), and the app run with uvicorn until SIGTERM or Ctrl-C (the requests
in flight finish, then the server exits)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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


def load_served(name: str, device: str | None, dtype: str, gallery: str | None, gallery_index: str | None):
    """The model behind ``name`` (stage 1 or stage 2, told by its config) ready to serve."""
    from qformer.devices import default_device, parse_device, parse_dtype
    from qformer.loading import model_fingerprint, resolve_checkpoint
    from qformer.pretrained.stage1 import Blip2Stage1, stage1_layout_of
    from qformer.pretrained.stage2 import Blip2
    from qformer.serve.gallery import Gallery
    from qformer.serve.service import ServedModel

    options = {"dtype": parse_dtype(dtype), "device": parse_device(device or default_device())}
    directory = Path(resolve_checkpoint(name))
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{name} holds no config.json: expected a model directory (a training run's final/, "
                                "transformers' BLIP-2, InstructBLIP or Blip2ForImageTextRetrieval, qformer export's)")
    if stage1_layout_of(json.loads((directory / "config.json").read_text(encoding="utf-8"))) is None:
        if gallery is not None:  # the stage-2 loader names what it is if not stage 2 either
            raise ValueError(f"--gallery is searched by a stage-1 model; {name} is not one")
        return ServedModel(Blip2.from_pretrained(directory, **options), name)
    model = Blip2Stage1.from_pretrained(directory, **options)
    index = None if gallery is None else Gallery(model, gallery, model_fingerprint(directory), gallery_index)
    return ServedModel(model, name, index)


def run_server(served, limits: Limits, host: str, port: int) -> None:
    """Serve ``served`` (a :class:`~qformer.serve.service.ServedModel`) on ``host:port`` until
    SIGTERM or Ctrl-C; the requests in flight get ``limits.request_timeout_s`` (and 5 s) to finish."""
    uvicorn, create_app = server_parts()
    logger.info("serving %s (%s) on http://%s:%d", served.name, served.kind, host, port)
    uvicorn.run(create_app(served, limits), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=int(limits.request_timeout_s) + 5)
