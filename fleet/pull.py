"""Pulling images: which images an operation must pull (the `pull` policy), how a pull's
progress reads (one line per layer and step, downloads throttled), and what a failed pull
says. Pure: the engine streams Docker's pull events in, lines come out through `say`.

Docker's pull stream is a sequence of JSON events: `{"status": "Pulling fs layer", "id":
"LAYER"}`, `{"status": "Downloading", "id": ..., "progressDetail": {"current": N, "total":
M}}`, then "Verifying Checksum", "Download complete", "Extracting", "Pull complete"; a
failure is `{"error": "...", "errorDetail": {"message": "..."}}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fleet.registry import ModelSpec, Registry
from fleet.states import PullPolicy

# Steps that repeat with byte counts: shown at most every THROTTLE_SECONDS per layer.
_REPEATING = frozenset({"Downloading", "Extracting"})
THROTTLE_SECONDS = 2.0


def pull_policy(registry: Registry, model: ModelSpec) -> PullPolicy:
    """The model's `pull` setting, else `[defaults].pull` (default: missing)."""
    return model.pull or registry.defaults.pull


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}GB"  # pragma: no cover


class PullProgress:
    """Turns one image's pull events into lines for `say`: each layer's step changes
    ("layer 3f2a1b: Pulling fs layer", "... Download complete", "... Pull complete") and
    its downloads/extraction with sizes, at most one such line per layer every
    THROTTLE_SECONDS (`clock` returns seconds)."""

    def __init__(self, image: str, say: Callable[[str], None],
                 clock: Callable[[], float]) -> None:
        self.image = image
        self.say = say
        self.clock = clock
        self._step: dict[str, str] = {}
        self._shown_at: dict[str, float] = {}

    def __call__(self, event: Mapping[str, Any]) -> None:
        status = str(event.get("status") or "")
        layer = str(event.get("id") or "")
        if not status or "error" in event:
            return
        if not layer or layer == self._tag():
            # Image-wide news: "Pulling from ...", "Digest: ...", "Status: Downloaded ...".
            self.say(f"pull {self.image}: {status}")
            return
        now = self.clock()
        repeating = status in _REPEATING
        if repeating and self._step.get(layer) == status and \
                now - self._shown_at.get(layer, -1e9) < THROTTLE_SECONDS:
            return
        self._step[layer] = status
        self._shown_at[layer] = now
        detail = event.get("progressDetail") or {}
        sizes = ""
        if repeating and detail.get("total"):
            sizes = f" {_size(float(detail.get('current') or 0))}/{_size(float(detail['total']))}"
        self.say(f"pull {self.image}: layer {layer}: {status}{sizes}")

    def _tag(self) -> str:
        return self.image.rsplit(":", 1)[-1] if ":" in self.image.rsplit("/", 1)[-1] else "latest"


def pull_failed_message(image: str, answer: str) -> str:
    """What a failed pull says: the image, the registry's (or daemon's) answer, what to do."""
    registry = image.split("/", 1)[0] if "/" in image and any(
        c in image.split("/", 1)[0] for c in ".:") else "docker.io"
    hint = ("check the image name and tag (a tag that does not exist is answered "
            "\"not found\" or \"manifest unknown\")")
    low = answer.lower()
    if "unauthorized" in low or "denied" in low or "authentication required" in low:
        hint = (f"log in to {registry} with `docker login {registry}` (the fleet uses Docker's "
                f"own credentials) or check that this account may read the image")
    elif any(s in low for s in ("no such host", "connection refused", "timeout",
                                "dial tcp", "network is unreachable")):
        hint = f"check that {registry} is reachable from the Docker daemon's host"
    return (f"cannot pull image {image}: {registry} answered: {answer.strip()}; {hint}; or "
            f"build or load the image on this host yourself (this project's own images: "
            f"scripts/build-images.sh) and set pull = \"never\" for the model")
