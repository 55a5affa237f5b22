"""Experiment tracking: Weights & Biases (online or offline) or nothing.

The mode is decided before ``wandb.init`` so a job never hangs on a dead network:
``auto`` is online only with an API key and a reachable server, else offline; a
forced ``online`` whose server cannot be reached (or whose ``init`` times out)
falls back to offline with a warning, so a sweep on nodes without internet still
runs and can be synced later.

Naming, for finding runs in the dashboard:
- group: the sweep (``logger.group`` if set, else a name derived from the sweep dir
  and pinned in ``<sweep>/.cells/group.txt``), so re-runs and requeues land in it;
- name: ``{method}-{dataset}-{model}``, plus ``-seed{N}`` when the sweep varies the seed;
- id: kept in ``<run dir>/wandb_run_id.txt``, so a resumed job continues the same run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import uuid
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from peft_lab import runfiles as rf
from peft_lab.schemas import plain

log = logging.getLogger(__name__)

SINGLE_RUN_GROUP = "single-runs"
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
# api_key, hf_token, access_token, token, password, client_secret, ... (not tokens_per_s or tokenizer)
_SECRET_KEY = re.compile(r"(api[_-]?key|secret|passw(or)?d|credential|(^|[_-])token$)", re.I)
REDACTED = "<redacted>"


class NullTracker:
    run_id: Optional[str] = None
    mode: str = "disabled"

    def log(self, data: dict, step: int) -> None:
        pass

    def summary(self, data: dict) -> None:
        pass

    def log_adapter(self, path: Path, name: str) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, run: Any, mode: str) -> None:
        self.run = run
        self.run_id = run.id
        self.mode = mode
        self._finished = False

    def log(self, data: dict, step: int) -> None:
        """``{"loss": ..}`` -> ``train/loss``; keys already prefixed (``eval/accuracy``) stay as they are."""
        row = {(k if "/" in k else f"train/{k}"): v for k, v in data.items() if k != "step"}
        self.run.log(row, step=step)

    def summary(self, data: dict) -> None:
        """The run's summary is metrics.json: the same keys, nested dicts kept nested."""
        self.run.summary.update(redact(json.loads(json.dumps(data, default=str))))

    def log_adapter(self, path: Path, name: str) -> None:
        import wandb

        art = wandb.Artifact(re.sub(r"[^\w.-]", "_", name), type="model")
        art.add_dir(str(path))
        self.run.log_artifact(art)

    def finish(self, failed: bool = False) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=1 if failed else 0)


# ----------------------------------------------------------------------------- mode


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def server_reachable(timeout: float = 3.0) -> bool:
    """Does the W&B server answer HTTP within ``timeout`` s? Any HTTP status counts; a refused or silent
    connection (a compute node without internet, a proxy that accepts but never answers) does not."""
    import urllib.error
    import urllib.request

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts, resets, a malformed URL
        return False


def resolve_mode(mode: str, timeout: float = 3.0) -> str:
    """auto/online -> online (API key + reachable server) or offline; offline/disabled pass through.

    Bounded by ``timeout`` seconds: decided before ``wandb.init``, which could otherwise wait ~90 s.
    """
    mode = plain(mode)  # a LoggerMode member from the config -> the plain string wandb takes
    if mode not in ("auto", "online"):
        return mode
    if not api_key_configured():
        if mode == "online":
            log.warning(
                "W&B: logger.mode=online but no API key is configured (WANDB_API_KEY or `wandb login`); logging offline"
            )
        return "offline"
    if server_reachable(timeout):
        return "online"
    log.warning("W&B: an API key is set but the server is unreachable; logging offline")
    return "offline"


# ----------------------------------------------------------------------------- naming


def derive_group(sweep_dir: Path) -> str:
    """A readable, path-free group name: the sweep dir relative to the working dir, else its last two parts."""
    p = Path(sweep_dir).absolute()
    try:
        name = p.relative_to(Path.cwd().absolute()).as_posix()
    except ValueError:
        name = "/".join(p.parts[-2:])
    return re.sub(r"[^\w.=,-]+", "_", name).strip("_") or "sweep"


def _pinned(sweep_dir: Path) -> Optional[str]:
    return rf.read_group(sweep_dir)


def pin_group(sweep_dir: Path, explicit: Optional[str]) -> str:
    """Called by the launcher: the sweep's group, written once so every later run (re-run, requeue) reuses it."""
    if not explicit and (pinned := _pinned(sweep_dir)):
        return pinned
    group = explicit or derive_group(sweep_dir)
    rf.write_group(sweep_dir, group)
    return group


def sweep_group(sweep_dir: Optional[Path], explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    if sweep_dir is None:
        return SINGLE_RUN_GROUP
    return _pinned(sweep_dir) or derive_group(sweep_dir)


_IN_NAME_ALREADY = ("method", "dataset", "model", "seed")
_NOT_IN_NAME = ("+protocol", "protocol", "logger", "cluster", "hydra.", "+hydra.")


def swept_overrides(sweep_dir: Optional[Path], own_overrides: list[str]) -> list[str]:
    """This cell's overrides whose key takes more than one value among the sweep's cells (read from
    its manifest; without one, all of the cell's own overrides), e.g. ``seed=1``, ``method.lr=0.0005``.
    Keys that cannot change a number (logger, cluster, hydra, the protocol) are left out."""
    if sweep_dir is None:
        return []
    manifest = rf.read_manifest(sweep_dir)
    values: dict[str, set] = {}
    for c in manifest.get("cells", []):
        for o in c.get("overrides", []):
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return [
        o
        for o in own_overrides
        if not o.startswith(_NOT_IN_NAME) and (not manifest or len(values.get(o.partition("=")[0], ())) > 1)
    ]


def run_name(method: str, dataset: str, model: str, swept: list[str]) -> str:
    """The W&B run name: method-dataset-model, then what tells this cell apart from the sweep's others
    (``swept_overrides``): ``lora-sst2-smollm2-135m-method.lr=0.0005-seed1``."""
    keys = {o.partition("=")[0]: o.partition("=")[2] for o in swept}
    extra = [f"{k}={v}" for k, v in keys.items() if k not in _IN_NAME_ALREADY]
    seed = [f"seed{keys['seed']}"] if "seed" in keys else []
    return "-".join([method, dataset, model, *extra, *seed])


# ----------------------------------------------------------------------------- init


def make_tracker(
    lc: Any, run_dir: Path, group: str, name: str, config: dict, tags: list[str], job_type: str = "train"
) -> NullTracker:
    if lc.backend == "none":
        return NullTracker()
    mode = resolve_mode(lc.mode)
    if mode == "disabled":
        return NullTracker()
    import wandb

    id_file = run_dir / rf.WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    kwargs = dict(
        project=lc.project,
        entity=lc.entity,
        group=group,
        name=name,
        job_type=job_type,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=redact(config),
        tags=[t for t in tags if t],
    )
    settings = dict(console="off", silent=True, init_timeout=float(lc.init_timeout))
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
    except Exception as err:  # online init failed or timed out: never lose the job over its logging
        if mode != "online":
            raise
        log.warning(f"W&B: online init failed ({type(err).__name__}: {err}); logging offline instead")
        mode = "offline"
        run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
    if mode == "offline":
        log.info(f"W&B offline run {run_id}; upload later with: wandb sync {run_dir}/wandb/offline-run-*")
    return WandbTracker(run, mode)


# ----------------------------------------------------------------------------- secrets


def secret_values() -> list[str]:
    """Secrets this process knows of (from the environment), to be scrubbed wherever they appear."""
    return [v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 8]


def redact(data: Any, secrets: Optional[list[str]] = None) -> Any:
    """Replace values whose key looks like a secret (API keys, tokens, passwords) and any known secret value."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(data, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) else redact(v, secrets)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v, secrets) for v in data]
    if isinstance(data, str):
        for s in secrets:
            data = data.replace(s, REDACTED)
    return data
