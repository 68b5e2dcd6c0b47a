"""How a checkpoint reaches a vLLM server (docs/evaluation.md, "The vLLM backend").

Two kinds of server, one interface (`VLLMServer`):

- `ManagedServer` (the default): the evaluator starts vLLM's OpenAI-compatible server as its own child
  process, bound to 127.0.0.1, on the first checkpoint it evaluates, and keeps it. For each further checkpoint
  of the same architecture and tokenizer it reloads the weights in place (`reload_weights` through the
  server's `/collective_rpc`, then `/reset_prefix_cache`), which takes a fraction of a second where a new
  server takes 25-40 s on this CPU and minutes on a GPU. A checkpoint whose config or tokenizer differs, a
  failed reload, or a server that died (killed, out of memory) gets a fresh server started on that checkpoint.
  The server runs in its own process group, with an environment that carries no secrets, and is killed as
  a group.
- `RemoteServer`: a server someone else runs (`POISE_VLLM_URL`, `poise run --vllm-url`). It must be able to
  read the checkpoint paths and have its development endpoints on (`VLLM_SERVER_DEV_MODE=1`), so the
  evaluator can reload weights into it; this evaluator must be its only client while it evaluates.

Why reload rather than a server per checkpoint: start-up dominates evaluation on small models (30 s against
seconds of sampling here), and on GPUs a 1.5B model loads in a minute while the weights alone reload in
seconds. Why a child process rather than a shared server: the reload switches the weights under every
client, so a server belongs to exactly one evaluator; each evaluator replica owns its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import httpx

log = logging.getLogger("poise." + __name__)

SERVED_NAME = "policy"
# {python}, {model}, {port}, {served_name} and {dtype} (the checkpoint's own, from its config.json) are filled in;
# every sampling parameter comes with the requests, so the checkpoint's generation defaults never sneak in
# (--generation-config vllm).
DEFAULT_COMMAND = ("{python} -m vllm.entrypoints.openai.api_server --model {model} --served-model-name {served_name}"
                   " --host 127.0.0.1 --port {port} --dtype {dtype} --generation-config vllm --seed 0")
PLACEHOLDERS = ("python", "model", "port", "served_name", "dtype")
# What the server's environment may inherit from the evaluator's: nothing else (API keys stay out).
PASSED_ENV_PREFIXES = ("VLLM_", "CUDA_", "NVIDIA_", "HF_", "OMP_", "KMP_", "LD_", "TORCH", "NCCL_", "XDG_", "TRITON_")
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "TRANSFORMERS_OFFLINE")
# Files that must be equal for a checkpoint to be reloaded into a server started on another one.
ARCHITECTURE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


class ServerError(RuntimeError):
    """The vLLM server cannot serve: it did not start, died, or refused the checkpoint. The message says why."""


def default_python() -> str:
    """The interpreter that has vLLM: POISE_VLLM_PYTHON, else the repository's .vllm-venv
    (scripts/vllm_venv.sh), else this interpreter (the GPU image installs vLLM beside POISE)."""
    if os.environ.get("POISE_VLLM_PYTHON"):
        return os.environ["POISE_VLLM_PYTHON"]
    venv = Path(__file__).resolve().parent.parent / ".vllm-venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def architecture_key(checkpoint: Path) -> str:
    """sha256 over the files that fix the architecture and tokenizer; equal keys can be reloaded in place."""
    digest = hashlib.sha256()
    for name in ARCHITECTURE_FILES:
        path = checkpoint / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"-") + b"\0")
    return digest.hexdigest()


def checkpoint_dtype(checkpoint: Path) -> str:
    """The dtype the checkpoint was saved in (config.json), so vLLM serves what was trained; "auto" if unsaid
    (vLLM's CPU backend would otherwise downcast a float32 checkpoint to bfloat16)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "auto"


def check_checkpoint(checkpoint: Path) -> None:
    if not (checkpoint / "config.json").is_file():
        raise ServerError(f"checkpoint {checkpoint} has no config.json: vLLM needs the Hugging Face layout "
                          "(testbed checkpoints written by this version have it)")


class VLLMServer(ABC):
    """A server that serves one checkpoint at a time under the name `SERVED_NAME`."""

    name = "vllm"
    base_url: str | None = None   # where it listens now (no /v1); a restarted managed server moves

    @abstractmethod
    def ensure(self, checkpoint: Path) -> str:
        """Make the server serve `checkpoint`; returns its base URL (no /v1). Raises ServerError."""

    def recover(self) -> bool:
        """After a connection error: make the server serve its current checkpoint again if possible;
        False when this kind of server cannot be recovered from here (the caller retries or gives up)."""
        return False

    @abstractmethod
    def check(self) -> str | None:
        """None when healthy (or idle), else the problem in words (for /healthz)."""

    @abstractmethod
    def close(self) -> None:
        """Stop what this object started (a managed server) and release its connections."""


def _reload(client: httpx.Client, base_url: str, checkpoint: Path, timeout_s: float) -> str | None:
    """Reload the weights of `checkpoint` into a running server; None on success, else why it failed."""
    try:
        response = client.post(f"{base_url}/collective_rpc", timeout=timeout_s, json={
            "method": "reload_weights", "kwargs": {"weights_path": str(checkpoint)}})
        if response.status_code == 404:
            return "the server has no /collective_rpc (start it with VLLM_SERVER_DEV_MODE=1)"
        if response.status_code != 200:
            return f"reload_weights answered {response.status_code}: {response.text[:300]}"
        response = client.post(f"{base_url}/reset_prefix_cache", timeout=timeout_s)
        if response.status_code != 200:
            return f"reset_prefix_cache answered {response.status_code}: {response.text[:300]}"
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _healthy(client: httpx.Client, base_url: str) -> bool:
    try:
        return client.get(f"{base_url}/health", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedServer(VLLMServer):
    """vLLM started and owned by this evaluator (module docstring)."""

    def __init__(self, work_dir: Path, command: str = DEFAULT_COMMAND, python: str | None = None,
                 env: Mapping[str, str] | None = None, startup_timeout_s: float = 600.0,
                 reload_timeout_s: float = 300.0) -> None:
        self.work_dir = Path(work_dir)
        self.command = command
        self.python = python or default_python()
        self.extra_env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.reload_timeout_s = reload_timeout_s
        self.process: subprocess.Popen | None = None
        self.base_url: str | None = None
        self.checkpoint: Path | None = None      # what the server serves now
        self.arch_key: str | None = None         # of the checkpoint it was started on
        self.starts = 0
        self.reloads = 0
        self.last_error: str | None = None
        self._lock = threading.RLock()
        self._http = httpx.Client()
        for token in shlex.split(command):
            if "{" in token and not any(f"{{{key}}}" in token for key in PLACEHOLDERS):
                raise ValueError(f"the vLLM command {command!r} has an unknown placeholder in {token!r}; "
                                 f"known: {' '.join('{' + key + '}' for key in PLACEHOLDERS)}")
        if "{model}" not in command or "{port}" not in command:
            raise ValueError(f"the vLLM command {command!r} must contain {{model}} and {{port}}")

    def preflight(self) -> None:
        """ServerError unless the interpreter can import vLLM: said at start-up, not at the first checkpoint."""
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        try:
            found = subprocess.run([self.python, "-c", probe], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ServerError(f"cannot run {self.python} to look for vLLM: {err}") from err
        if not found:
            raise ServerError(f"{self.python} has no vLLM: on a CPU machine run scripts/vllm_venv.sh (it makes "
                              ".vllm-venv, found on its own), else install vllm or set POISE_VLLM_PYTHON")

    # --------------------------------------------------------------------------------------- lifecycle
    def ensure(self, checkpoint: Path) -> str:
        checkpoint = Path(checkpoint).resolve()
        check_checkpoint(checkpoint)
        with self._lock:
            if self._alive() and self.checkpoint == checkpoint:
                return self.base_url
            if self._alive() and self.arch_key == architecture_key(checkpoint):
                problem = _reload(self._http, self.base_url, checkpoint, self.reload_timeout_s)
                if problem is None:
                    self.checkpoint = checkpoint
                    self.reloads += 1
                    return self.base_url
                log.warning("vLLM: reloading %s failed (%s); starting a fresh server on it", checkpoint, problem)
            self._start(checkpoint)
            return self.base_url

    def recover(self) -> bool:
        with self._lock:
            if self.checkpoint is None:
                return False
            if self._alive() and _healthy(self._http, self.base_url):
                return True
            log.warning("vLLM server (pid %s) is gone or unhealthy; starting a fresh one on %s",
                        self.process.pid if self.process else None, self.checkpoint)
            self._start(self.checkpoint)
            return True

    def check(self) -> str | None:
        # no lock: /healthz must answer while an evaluation holds the server (a start can take minutes)
        process, base_url = self.process, self.base_url
        if process is None:
            # idle: it starts on the next evaluation. A start that failed is that node's failure (its reason
            # carries the server's log), not the service's: a restarted evaluator would fail the same way.
            return None
        if process.poll() is not None:
            return f"the vLLM server exited with status {process.returncode}"
        if self.checkpoint is None:
            return None  # starting
        if not _healthy(self._http, base_url):
            return f"the vLLM server at {base_url} does not answer /health"
        return None

    def close(self) -> None:
        with self._lock:
            self._stop()
            self._http.close()

    # -------------------------------------------------------------------------------------- internals
    def _alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _argv(self, checkpoint: Path, port: int) -> list[str]:
        values = {"python": self.python, "model": str(checkpoint), "port": str(port), "served_name": SERVED_NAME,
                  "dtype": checkpoint_dtype(checkpoint)}
        return [token.format(**values) for token in shlex.split(self.command)]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIXES)}
        env.update({
            "VLLM_SERVER_DEV_MODE": "1",          # /collective_rpc: weights reloaded in place
            "VLLM_HOST_IP": "127.0.0.1",          # nothing announced or bound beyond loopback
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "VLLM_CACHE_ROOT": env.get("VLLM_CACHE_ROOT", str(self.work_dir / "cache")),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def _start(self, checkpoint: Path) -> None:
        self._stop()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        port = free_port()
        argv = self._argv(checkpoint, port)
        # replicas may share the work volume: host and pid keep their logs apart
        log_path = self.work_dir / f"server-{socket.gethostname()}-{os.getpid()}-{self.starts}.log"
        log.info("vLLM: starting %s (log %s)", " ".join(argv), log_path)
        started = time.monotonic()
        with open(log_path, "wb") as log_file:
            try:
                self.process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=self._env(),
                                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.work_dir)
            except OSError as err:
                self.process = None
                self.last_error = f"cannot start the vLLM server ({argv[0]}): {err}"
                raise ServerError(self.last_error) from err
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = started + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = _tail(log_path)
                self.last_error = (f"the vLLM server exited with status {self.process.returncode} while starting "
                                   f"on {checkpoint} ({tail.splitlines()[-1] if tail else 'no output'}); last lines "
                                   f"of {log_path}:\n{tail}")
                self._stop()
                raise ServerError(self.last_error)
            if _healthy(self._http, self.base_url):
                self.checkpoint, self.arch_key, self.last_error = checkpoint, architecture_key(checkpoint), None
                log.info("vLLM: serving %s on %s after %.1f s", checkpoint, self.base_url, time.monotonic() - started)
                return
            time.sleep(0.5)
        self._stop()
        self.last_error = (f"the vLLM server did not become healthy within {self.startup_timeout_s:.0f} s on "
                           f"{checkpoint} (POISE_VLLM_STARTUP_TIMEOUT_S); last lines of {log_path}:\n{_tail(log_path)}")
        raise ServerError(self.last_error)

    def _stop(self) -> None:
        process, self.process = self.process, None
        self.checkpoint = self.arch_key = None
        if process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the engine's children share the group; none may outlive the server
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RemoteServer(VLLMServer):
    """A server at a given URL that can read the checkpoints and reload weights (module docstring)."""

    def __init__(self, url: str, reload_timeout_s: float = 300.0) -> None:
        self.base_url = url.rstrip("/").removesuffix("/v1")
        self.reload_timeout_s = reload_timeout_s
        self.checkpoint: Path | None = None
        self._lock = threading.Lock()
        self._http = httpx.Client()

    def ensure(self, checkpoint: Path) -> str:
        checkpoint = Path(checkpoint).resolve()
        check_checkpoint(checkpoint)
        with self._lock:
            if self.checkpoint == checkpoint:
                return self.base_url
            # always reloaded, even onto the path the server started on: another client may have reloaded since
            self._served_root()
            problem = _reload(self._http, self.base_url, checkpoint, self.reload_timeout_s)
            if problem is not None:
                raise ServerError(f"the vLLM server at {self.base_url} cannot load {checkpoint}: {problem}")
            self.checkpoint = checkpoint
            return self.base_url

    def _served_root(self) -> str | None:
        try:
            response = self._http.get(f"{self.base_url}/v1/models", timeout=10.0)
            response.raise_for_status()
            models = response.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as err:
            raise ServerError(f"the vLLM server at {self.base_url} does not answer /v1/models "
                              f"({type(err).__name__}: {err}); check POISE_VLLM_URL") from err
        names = [m.get("id") for m in models]
        if SERVED_NAME not in names:
            raise ServerError(f"the vLLM server at {self.base_url} serves {names}, not {SERVED_NAME!r}: start it "
                              f"with --served-model-name {SERVED_NAME}")
        return next(m.get("root") for m in models if m.get("id") == SERVED_NAME)

    def recover(self) -> bool:
        return _healthy(self._http, self.base_url)

    def check(self) -> str | None:
        return None if _healthy(self._http, self.base_url) else f"the vLLM server at {self.base_url} does not " \
                                                                  "answer /health"

    def close(self) -> None:
        self._http.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return "\n".join(text[-lines:])
