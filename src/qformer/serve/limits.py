"""The limits of ``qformer serve``: what one request may ask, how requests queue, and how long
and how many connections are kept. No torch here: the command line reads them before anything
heavy is imported."""

from __future__ import annotations

from dataclasses import asdict, dataclass

RETRY_AFTER_S = 1  # what a 503 (a full queue, the connection cap) tells the client to wait, in seconds


@dataclass(frozen=True)
class Limits:
    """What one request may ask, how the server queues them, and what a connection may take
    (``qformer serve --help``)."""

    max_upload_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 1000
    max_new_tokens: int = 60
    max_num_beams: int = 5
    max_choices: int = 8
    max_texts: int = 32
    max_top: int = 50
    request_timeout_s: float = 60.0
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def public(self) -> dict[str, int]:
        """The limits a client can act on (``/info``)."""
        keys = ("max_upload_bytes", "max_image_pixels", "max_prompt_chars", "max_new_tokens", "max_num_beams",
                "max_choices", "max_texts", "max_top")
        return {key: getattr(self, key) for key in keys}
