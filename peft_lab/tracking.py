"""Experiment tracking: Weights & Biases (online or offline) or nothing.

The mode is decided before ``wandb.init`` so a job never hangs on a dead network:
``auto`` is online only with an API key and a reachable server, else offline.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.I)


class NullTracker:
    run_id: Optional[str] = None

    def log(self, data: dict, step: int) -> None:
        pass

    def summary(self, data: dict) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_id = run.id

    def log(self, data: dict, step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in data.items() if k != "step"}, step=step)

    def summary(self, data: dict) -> None:
        for key, value in _flatten(data).items():
            self.run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str, timeout: float = 3.0) -> str:
    """auto -> online (key + reachable server) or offline; other modes pass through."""
    if mode != "auto":
        return mode
    if not api_key_configured():
        return "offline"
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return "online"
    except OSError:
        log.warning("W&B: an API key is set but the server is unreachable; logging offline")
        return "offline"


def make_tracker(cfg: Any, run_dir: Path, group: str, name: str, config: dict) -> NullTracker:
    lc = cfg.logger
    if lc.backend == "none":
        return NullTracker()
    mode = resolve_mode(lc.mode)
    if mode == "disabled":
        return NullTracker()
    import wandb

    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    run = wandb.init(
        project=lc.project,
        entity=lc.entity,
        group=group,
        name=name,
        job_type="train",
        id=run_id,
        resume="allow",
        mode=mode,
        dir=str(run_dir),
        config=redact(config),
        tags=[cfg.method.name, cfg.dataset.name, cfg.model.name],
        settings=wandb.Settings(console="off", silent=True),
    )
    if mode == "offline":
        log.info(f"W&B offline run in {run_dir / 'wandb'}; upload later with: wandb sync {run_dir}/wandb/offline-run-*")
    return WandbTracker(run)


def redact(data: Any) -> Any:
    """Drop values whose key looks like a secret (API keys, tokens, passwords)."""
    if isinstance(data, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) else redact(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
