"""Docker for the deployment checks and the image bench: a daemon of our own, the base image, the
image built from the real Dockerfile, and a container run as a 512 MiB dyno.

* The daemon is Debian's ``docker.io`` (``make docker-test`` installs it): no bridge, no iptables, no
  forwarding, so builds and containers use the host's network and every connection stays on
  127.0.0.1. Its socket and exec root are in a fresh temporary directory; its data root (images,
  build cache) is under :data:`CACHE_DIR`, so a second run reuses the base image and the installed
  requirements. One daemon per cache at a time (a lock file). :func:`daemon` stops it by its pid
  when the block exits, however it exits, and the kernel stops it if the process that started it
  dies first.
* The client is Debian's ``docker`` beside ``dockerd``: build secrets need BuildKit, which a newer
  client without its buildx plugin refuses to drive.
* The base image is the official ``python:3.11-slim-bookworm`` when it can be pulled; otherwise a
  Debian stand-in made with ``debootstrap`` (bookworm, python3.11 at /usr/local/bin/python, as in the
  official image) and cached as a tarball.
* pip inside the build reaches the package index this machine's pip is configured with (http(s)
  indexes only) and gets its CA bundle as the build secret ``pip_cert``; neither is stored in the
  image.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("DEPLOY_CACHE_DIR") or Path.home() / ".cache" / "ml-inference-service" / "docker")
OFFICIAL_BASE = "python:3.11-slim-bookworm"
STANDIN_BASE = "local/python:3.11-slim-bookworm-debian"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the official slim image has that a minimal Debian lacks: Python 3.11 with venv, CA certificates,
# time zones and /etc/services.
STANDIN_PACKAGES = ("python3.11", "python3.11-venv", "python3-distutils", "ca-certificates", "tzdata", "netbase")
CONTAINER_USER_ID = 10001  # the Dockerfile's `app` user


class DockerError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Docker:
    """A started daemon and the client that talks to it."""

    client: str
    host: str
    pid: int
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    def run(self, *args: str, check: bool = True, timeout: float = 600.0,
            capture: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.client, *args], env=self.env, timeout=timeout, text=True,
                                capture_output=capture)
        if check and result.returncode != 0:
            raise DockerError(f"docker {shlex.join(args)} failed ({result.returncode}): "
                              f"{(result.stderr or result.stdout or '').strip()[-3000:]}")
        return result

    def output(self, *args: str, timeout: float = 600.0) -> str:
        return self.run(*args, timeout=timeout).stdout.strip()

    def image_exists(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def image_size_mib(self, tag: str) -> float:
        return int(self.output("image", "inspect", "-f", "{{.Size}}", tag)) / 2**20


def _client_for(dockerd: str) -> str:
    beside = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    return str(beside) if beside.exists() else (shutil.which("docker") or "docker")


@contextlib.contextmanager
def daemon(cache_dir: Path = CACHE_DIR, start_timeout: float = 60.0) -> Iterator[Docker]:
    """Start ``dockerd`` (see the module's docstring), yield its client, stop it by pid."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise DockerError("dockerd not found: `make docker-test` installs Debian's docker.io")
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = open(cache_dir / "daemon.lock", "w")  # noqa: SIM115 (held for the daemon's life)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another run's Docker daemon on {cache_dir} to stop ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        run_dir = Path(tempfile.mkdtemp(prefix="dockerd-"))
        socket_path = run_dir / "docker.sock"
        log_path = run_dir / "dockerd.log"
        command = [dockerd, "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
                   "--data-root", str(cache_dir / "data"), "--exec-root", str(run_dir / "exec"),
                   "--pidfile", str(run_dir / "dockerd.pid"), "--host", f"unix://{socket_path}"]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                       preexec_fn=_die_with_parent)
        docker = Docker(_client_for(dockerd), f"unix://{socket_path}", process.pid, log_path)
        try:
            deadline = time.monotonic() + start_timeout
            while docker.run("version", check=False, timeout=10).returncode != 0:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise DockerError(f"dockerd did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)
            yield docker
        finally:
            _stop_daemon(docker, process)
            _unmount_under(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        lock.close()


def _stop_daemon(docker: Docker, process: subprocess.Popen) -> None:
    """Remove this run's containers, then SIGTERM the daemon by its pid (SIGKILL after 30 s)."""
    with contextlib.suppress(Exception):
        ids = docker.output("ps", "-aq", "--filter", "label=ml-inference-service.check", timeout=30).split()
        if ids:
            docker.run("rm", "-f", *ids, check=False, timeout=60)
    with contextlib.suppress(Exception):  # keep the cache from growing: untagged images, old build cache
        docker.run("image", "prune", "-f", check=False, timeout=120)
        docker.run("builder", "prune", "-f", "--filter", "until=168h", check=False, timeout=120)
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _unmount_under(path: Path) -> None:
    """Unmount what the daemon left mounted under ``path`` (it binds its network namespace in the
    exec root and leaves it there), deepest first."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m == str(path) or m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


# ---- the base image ------------------------------------------------------------------------------

def base_image(docker: Docker, wanted: str = OFFICIAL_BASE, cache_dir: Path = CACHE_DIR) -> str:
    """``wanted`` when it is here or can be pulled; else the Debian stand-in (made once, cached)."""
    if docker.image_exists(wanted):
        return wanted
    pulled = docker.run("pull", "-q", wanted, check=False, timeout=300)
    if pulled.returncode == 0:
        return wanted
    print(f"{wanted} cannot be pulled ({pulled.stderr.strip()[:200]}); using a Debian stand-in", flush=True)
    if docker.image_exists(STANDIN_BASE):
        return STANDIN_BASE
    tarball = cache_dir / "standin-python3.11-bookworm.tar"
    if not tarball.exists():
        make_standin_tarball(tarball)
    with open(tarball, "rb") as source:
        subprocess.run([docker.client, "import",
                        "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]',
                        "-", STANDIN_BASE], stdin=source, env=docker.env, check=True,
                       capture_output=True, timeout=600)
    return STANDIN_BASE


def make_standin_tarball(tarball: Path, suite: str = "bookworm") -> None:
    """A minimal Debian ``suite`` with Python 3.11 laid out like the official slim image
    (``python``/``python3`` in /usr/local/bin), without apt lists, caches, docs or locales."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise DockerError("debootstrap not found: `make docker-test` installs it")
    started = time.monotonic()
    rootfs = Path(tempfile.mkdtemp(prefix="standin-"))
    try:
        result = subprocess.run([debootstrap, "--variant=minbase", f"--include={','.join(STANDIN_PACKAGES)}",
                                 suite, str(rootfs), DEBIAN_MIRROR], capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise DockerError(f"debootstrap failed:\n{(result.stdout + result.stderr)[-3000:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/locale", "debootstrap"):
            path = rootfs / junk
            if path.is_dir():
                for child in path.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    elif child.name != "partial":
                        child.unlink()
        for name in ("python", "python3"):
            link = rootfs / "usr" / "local" / "bin" / name
            link.unlink(missing_ok=True)
            link.symlink_to("/usr/bin/python3.11")
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
        print(f"Debian stand-in made in {time.monotonic() - started:.0f} s: {tarball}", flush=True)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


# ---- the build ------------------------------------------------------------------------------------

def pip_settings() -> dict[str, str]:
    """This machine's pip settings that matter to a build: ``cert``, ``index-url``, ``extra-index-url``
    (the environment's PIP_* first, then pip's configuration files)."""
    found: dict[str, str] = {}
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in ("cert", "index-url", "extra-index-url") and name not in found:
            found[name] = value.strip().strip("'\"")
    for name in ("cert", "index-url", "extra-index-url"):
        if os.environ.get("PIP_" + name.upper().replace("-", "_")):
            found[name] = os.environ["PIP_" + name.upper().replace("-", "_")]
    return found


def build_args(settings: dict[str, str]) -> list[str]:
    """``docker build`` arguments handing pip's index and CA bundle to the build: the indexes a
    container can reach (http and https; a file:// index is this machine's disk), the bundle as a
    secret."""
    args = []
    index = settings.get("index-url", "")
    if index.startswith(("http://", "https://")):
        args += ["--build-arg", f"PIP_INDEX_URL={index}"]
    extra = [u for u in settings.get("extra-index-url", "").split() if u.startswith(("http://", "https://"))]
    if extra:
        args += ["--build-arg", f"PIP_EXTRA_INDEX_URL={' '.join(extra)}"]
    cert = settings.get("cert", "")
    if cert and Path(cert).is_file():
        args += ["--secret", f"id=pip_cert,src={cert}"]
    return args


def build_image(docker: Docker, tag: str, base: str, context: Path = REPO_ROOT,
                log_path: Path | None = None) -> float:
    """Build ``context``'s Dockerfile on ``base`` as ``tag``; returns the seconds it took. The build
    output goes to ``log_path`` (printed on failure; a temporary file, removed after a success,
    when none is given)."""
    keep_log = log_path is not None
    log_path = log_path or Path(tempfile.mkstemp(prefix="docker-build-", suffix=".log")[1])
    command = [docker.client, "build", "--network", "host", "--progress", "plain",
               "--build-arg", f"BASE_IMAGE={base}", *build_args(pip_settings()),
               "--label", "ml-inference-service.check=1", "-t", tag, str(context)]
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        result = subprocess.run(command, env=docker.env, stdout=log_file, stderr=subprocess.STDOUT,
                                text=True, timeout=3600)
    if result.returncode != 0:
        raise DockerError(f"docker build failed ({result.returncode}):\n"
                          f"{log_path.read_text(errors='replace')[-6000:]}")
    if not keep_log:
        log_path.unlink()
    return time.monotonic() - started


# ---- a container run as a dyno --------------------------------------------------------------------

DYNO_LIMITS = ("--memory", "512m", "--memory-swap", "512m", "--cpus", "1")


@dataclass
class Container:
    docker: Docker
    name: str
    port: int
    started: float = field(default_factory=time.monotonic)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inspect(self) -> dict[str, Any]:
        return json.loads(self.docker.output("inspect", self.name))[0]

    def logs(self, tail: int = 60) -> str:
        result = self.docker.run("logs", "--tail", str(tail), self.name, check=False)
        return (result.stdout or "") + (result.stderr or "")

    def wait_healthy(self, timeout: float = 120.0) -> float:
        """Wait for Docker's own health status (the Dockerfile's HEALTHCHECK) to become ``healthy``;
        returns the seconds since the container started."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.inspect()["State"]
            status = (state.get("Health") or {}).get("Status")
            if status == "healthy":
                return time.monotonic() - self.started
            if not state["Running"] or status == "unhealthy" or time.monotonic() > deadline:
                raise DockerError(f"container {self.name} is {status or state['Status']} (exit "
                                  f"{state.get('ExitCode')}):\n{self.logs()}")
            time.sleep(0.5)

    def cgroup_dir(self) -> Path:
        """The container's memory cgroup on the host (cgroup v1 or v2)."""
        pid = self.inspect()["State"]["Pid"]
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        for line in lines:
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
        raise DockerError(f"no memory cgroup for pid {pid}: {lines}")

    def memory(self) -> dict[str, float]:
        """The cgroup's memory now (MiB): ``anon``, what the processes hold themselves (anonymous
        pages and tmpfs files: without swap, nothing the kernel can take back); ``working_set``,
        the usage less the inactive page cache (what ``docker stats`` shows); ``usage`` and the
        kernel's ``peak`` of it. The last three count page cache, which is charged to whichever
        cgroup first read a file, so they vary with what ran before by 100 MiB and more. Also the
        limit, and how many processes the kernel's OOM killer has killed in the cgroup."""
        cgroup = self.cgroup_dir()
        stat = {k: int(v) for k, v in (line.split() for line in (cgroup / "memory.stat").read_text().splitlines())}
        if (cgroup / "memory.max_usage_in_bytes").exists():  # v1
            usage = int((cgroup / "memory.usage_in_bytes").read_text())
            peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
            limit = int((cgroup / "memory.limit_in_bytes").read_text())
            anon, inactive_file = stat["total_rss"] + stat["total_shmem"], stat["total_inactive_file"]
            events = (cgroup / "memory.oom_control").read_text()
        else:  # v2
            usage = int((cgroup / "memory.current").read_text())
            peak = int((cgroup / "memory.peak").read_text())
            limit = int((cgroup / "memory.max").read_text())
            anon, inactive_file = stat["anon"] + stat["shmem"], stat["inactive_file"]
            events = (cgroup / "memory.events").read_text()
        oom = dict(line.split() for line in events.splitlines() if line.strip())
        return {"anon_mib": round(anon / 2**20, 1), "working_set_mib": round((usage - inactive_file) / 2**20, 1),
                "usage_mib": round(usage / 2**20, 1), "peak_usage_mib": round(peak / 2**20, 1),
                "limit_mib": round(limit / 2**20, 1), "oom_kills": int(oom.get("oom_kill", 0))}

    @contextlib.contextmanager
    def memory_sampled(self, interval: float = 0.02) -> Iterator[dict[str, float]]:
        """Sample :meth:`memory` in a thread while the block runs; the yielded dict ends with the
        last sample and the largest ``anon`` and ``working_set`` seen (``peak_anon_mib``...)."""
        import threading

        result: dict[str, float] = {"peak_anon_mib": 0.0, "peak_working_set_mib": 0.0}
        stop = threading.Event()

        def record() -> None:
            now = self.memory()
            result.update(now, peak_anon_mib=max(result["peak_anon_mib"], now["anon_mib"]),
                          peak_working_set_mib=max(result["peak_working_set_mib"], now["working_set_mib"]))

        def sample() -> None:
            while True:
                with contextlib.suppress(OSError, KeyError, ValueError):
                    record()
                if stop.wait(interval):
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield result
        finally:
            stop.set()
            thread.join()
            record()

    def stop(self, timeout: int = 30) -> float:
        """``docker stop -t timeout``; returns the seconds it took."""
        started = time.monotonic()
        self.docker.run("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        return time.monotonic() - started

    def remove(self) -> None:
        self.docker.run("rm", "-f", self.name, check=False)


@contextlib.contextmanager
def dyno(docker: Docker, image: str, port: int, *, name: str = "dyno-web-1", dyno_name: str = "web.1",
         env: dict[str, str] | None = None, limits: tuple[str, ...] = DYNO_LIMITS) -> Iterator[Container]:
    """Run ``image`` as a Heroku-sized dyno: 512 MiB and no swap, one CPU, a read-only root with
    tmpfs for /tmp and the SQLite log, the image's own user, ``PORT`` and ``DYNO`` set."""
    docker.run("rm", "-f", name, check=False)
    settings = {"PORT": str(port), "HOST": "127.0.0.1", "DYNO": dyno_name, **(env or {})}
    command = ["run", "-d", "--name", name, "--label", "ml-inference-service.check=1", "--network", "host",
               *limits, "--read-only", "--tmpfs", "/tmp:rw,size=64m",
               "--tmpfs", f"/app/var:rw,size=128m,uid={CONTAINER_USER_ID},gid={CONTAINER_USER_ID}"]
    for key, value in settings.items():
        command += ["-e", f"{key}={value}"]
    docker.run(*command, image)
    container = Container(docker, name, port)
    try:
        yield container
    finally:
        container.remove()
