"""Harness for the appliance tests: build the .debs, boot Debian 12/13 with systemd-nspawn.

What works on these machines is in ``shared/notes/nspawn.md``; in short:

* no system D-Bus or machined on the host: ``--register=no --keep-unit``, and commands run
  inside through ``nsenter -t <container PID 1> -a`` (not machinectl / systemd-run -M);
* ``/run`` on the host is not a tmpfs, which breaks nspawn at exit: it runs in a private
  mount namespace with a tmpfs on ``/run/systemd/nspawn``;
* with ``--keep-unit`` nspawn makes ``payload/`` and ``supervisor/`` cgroups under its own
  cgroup, so each container gets its own cgroup (v1 ``name=systemd`` and v2 ``unified``),
  removed afterwards together with anything left in it;
* ``--volatile=overlay``: the cached root filesystem is never written, each boot starts clean;
* trixie's systemd (257) no longer boots on cgroup v1, and nspawn 252 on this hybrid host
  would give it the hybrid layout: ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` asks for the
  unified (v2) hierarchy for the trixie container.

Fixtures: ``deb`` / ``runtime_rootfs`` / ``container`` are bookworm's (revision 1, in
``dist/``); ``debs`` maps each release to its package, ``next_debs`` to the same tree
repacked as revision 2 ("N+1", in ``dist/next/``) for the upgrade tests, and
``runtime_rootfs_for(release)`` gives a release's booted test root filesystem.

Skips when the machine cannot do this (not root, no debootstrap or nspawn); in CI
(``CI`` set) that is a failure instead, since .ci/run installs everything it needs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.releases import RELEASES, deb_path
from tests.util import require, wait_for

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist"
NEXT_DIST = DIST / "next"         # revision 2 of the same tree: the upgrade tests' "N+1"
TOOLS = REPO / "tests" / "tools"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _why_not_runnable() -> str | None:
    """Reason this machine cannot run the appliance test, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, systemd-nspawn)"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "unshare", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (run: sh packaging/deps.sh)"
    if not all(p.is_dir() for p in CGROUP_ROOTS) and not Path("/sys/fs/cgroup/cgroup.procs").exists():
        return "no usable cgroup hierarchy for systemd-nspawn"
    return None


class Container:
    """One booted Debian container (systemd as PID 1), driven from the host."""

    def __init__(self, rootfs: Path, binds_ro: dict[Path, str], logdir: Path,
                 unified_cgroup: bool = False) -> None:
        self.rootfs = rootfs
        self.binds_ro = binds_ro
        self.unified_cgroup = unified_cgroup
        self.name = f"rma-test-{uuid.uuid4().hex[:8]}"
        self.log_path = logdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self._log = None
        # Hybrid hosts have both roots; a pure v2 host only the unified one at the top.
        roots = [p for p in CGROUP_ROOTS if p.is_dir()] or [Path("/sys/fs/cgroup")]
        self.cgroups = [root / self.name for root in roots]

    # -- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        for cg in self.cgroups:
            cg.mkdir()
        Path("/run/systemd/nspawn").mkdir(parents=True, exist_ok=True)
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs tmpfs /run/systemd/nspawn && exec "$@"', "sh",
               "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-b",
               f"--directory={self.rootfs}", f"--machine={self.name}",
               "--private-network", "--console=pipe", "--volatile=overlay"]
        cmd += [f"--bind-ro={host}:{inner}" for host, inner in self.binds_ro.items()]
        cgroups = self.cgroups

        def into_own_cgroup() -> None:  # runs in the child between fork and exec
            for cg in cgroups:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        env = dict(os.environ)
        if self.unified_cgroup:
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        self._log = open(self.log_path, "wb")  # closed in stop()
        # unshare (without --fork) and sh exec in place: Popen's pid is nspawn's.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=into_own_cgroup,
                                     env=env)
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        # 1. nspawn forks the container's PID 1, which execs systemd
        self.pid1 = wait_for(self._pid1_unless_exited, left(), 0.05,
                             f"container {self.name}: systemd as its PID 1 "
                             f"(nspawn log: {self.log_path})")
        # 2. the manager listens on its private socket (a moment after the exec): seen
        # from the host through PID 1's root, so nothing is run inside before it exists
        private = Path(f"/proc/{self.pid1}/root/run/systemd/private")
        wait_for(private.exists, left(), 0.05,
                 f"container {self.name}: systemd's private socket {private}")
        # 3. boot finished: ``is-system-running --wait`` blocks until it has (a retry
        # only if systemctl could not reach the manager yet: "offline" or nothing)
        state = wait_for(lambda: self._boot_state(left()), left(), 0.2,
                         f"container {self.name}: an answer from is-system-running --wait")
        if state not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", "--no-pager", check=False).stdout
            raise AssertionError(f"container {self.name} did not boot: is-system-running "
                                 f"says {state!r}; failed units:\n{failed[-2000:]}")

    def _pid1_unless_exited(self) -> int | None:
        """The container's PID 1 once it runs systemd; fails at once if nspawn exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.proc.returncode} before the "
                                 f"container booted: "
                                 f"{self.log_path.read_text(errors='replace')[-2000:]}")
        return self._find_pid1()

    def _boot_state(self, timeout: float) -> str | None:
        """What ``systemctl is-system-running --wait`` says once boot is over, or None
        while the manager cannot be reached."""
        try:
            r = self.run("systemctl", "is-system-running", "--wait", check=False,
                         timeout=timeout)
        except subprocess.TimeoutExpired:
            jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False).stdout
            raise AssertionError(f"container {self.name}: boot not finished after "
                                 f"{timeout:.0f} s; jobs left:\n{jobs[-2000:]}") from None
        state = r.stdout.strip()
        return None if state in ("", "offline") else state

    def _find_pid1(self) -> int | None:
        """The container's PID 1: the child of nspawn that runs systemd."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                continue
        return None

    def stop(self) -> None:
        """Clean halt (SIGTERM to nspawn), then make sure nothing is left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._reap_cgroups()

    def _reap_cgroups(self) -> None:
        """Kill whatever is still in our cgroups (only processes this container made) and
        remove the cgroup trees, deepest first."""
        for _ in range(50):
            pids = set()
            for cg in self.cgroups:
                if cg.is_dir():
                    for procs in cg.rglob("cgroup.procs"):
                        try:
                            pids.update(int(p) for p in procs.read_text().split())
                        except OSError:
                            pass
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for cg in self.cgroups:
            if not cg.is_dir():
                continue
            for d in sorted((p for p in cg.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                cg.rmdir()
            except OSError:
                pass

    def leftovers(self) -> list[str]:
        """Cgroup dirs that still exist after stop() (the test asserts none)."""
        return [str(cg) for cg in self.cgroups if cg.exists()]

    # -- commands inside --------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (all its namespaces, its root, clean env)."""
        assert self.pid1 is not None
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={INNER_PATH}",
               "LANG=C.UTF-8", *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"in container: {' '.join(argv)} -> {r.returncode}\n"
                                 f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def sh(self, script: str, check: bool = True, timeout: float = 60.0) -> str:
        return self.run("sh", "-ec", script, check=check, timeout=timeout).stdout

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("sh", "-c", f'cat > "$1" && chmod {mode} "$1"', "sh", path, input=text)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-P", prop, unit).stdout.strip()

    def journal(self, unit: str, since_cursor: str | None = None) -> list[dict]:
        """The unit's journal entries as dicts (journalctl -o json)."""
        args = ["journalctl", "-u", unit, "-o", "json", "--no-pager"]
        if since_cursor:
            args += ["--after-cursor", since_cursor]
        out = self.run(*args, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def cursor(self) -> str:
        out = self.run("journalctl", "-n", "0", "--show-cursor", "--no-pager", check=False).stdout
        for line in out.splitlines():
            if line.startswith("-- cursor: "):
                return line.removeprefix("-- cursor: ").strip()
        return ""

    def curl(self, url: str, timeout: float = 10.0) -> tuple[int, str]:
        """(HTTP status, body) of a GET inside the container; 0 when nothing answered."""
        r = self.run("curl", "-s", "-m", str(int(timeout)), "-o", "/dev/stdout", "-w",
                     "\n%{http_code}", url, check=False, timeout=timeout + 5)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    def wait_for(self, what: str, predicate, timeout: float = 30.0, interval: float = 0.3):
        """Poll ``predicate()`` until truthy; its last value on success, AssertionError else."""
        return wait_for(predicate, timeout, interval, what)


@pytest.fixture(scope="session")
def appliance_ready() -> None:
    # .ci/run installs everything this needs: in CI a skip would hide a broken setup
    why = _why_not_runnable()
    require(f"appliance test: {why}" if why else None)


def _runtime_rootfs_cmd(release: str = "bookworm") -> list[str]:
    return ["sh", str(REPO / "packaging" / "rootfs.sh"), "runtime", release]


# Runtime root filesystems being made in the background (release -> job), started as soon
# as a package build starts: on a cold cache debootstrap and the build overlap.
_rootfs_jobs: dict[str, subprocess.Popen[str]] = {}
_rootfs_done: dict[str, Path] = {}


def _start_rootfs(release: str) -> None:
    if release not in _rootfs_jobs and release not in _rootfs_done:
        _rootfs_jobs[release] = subprocess.Popen(
            _runtime_rootfs_cmd(release), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)


def runtime_rootfs_for(release: str) -> Path:
    """The cached runtime root filesystem of ``release`` (debootstrapped once)."""
    if release in _rootfs_done:
        return _rootfs_done[release]
    _start_rootfs(release)
    job = _rootfs_jobs.pop(release)
    try:
        out, err = job.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        job.kill()
        job.communicate()
        pytest.fail(f"rootfs.sh runtime {release} took more than 15 min")
    if job.returncode != 0:
        pytest.fail(f"rootfs.sh runtime {release} failed:\n{err[-4000:]}")
    _rootfs_done[release] = Path(out.strip().splitlines()[-1])
    return _rootfs_done[release]


def build_debs(releases: tuple[str, ...], revision: int = 1, out: Path = DIST,
               lintian: bool = True) -> dict[str, Path]:
    """packaging/build-deb.sh --if-changed for ``releases``; {release: .deb}."""
    for release in releases:
        _start_rootfs(release)
    release_arg = releases[0] if len(releases) == 1 else "all"
    cmd = ["bash", str(REPO / "packaging" / "build-deb.sh"), "--if-changed",
           "--release", release_arg, "--revision", str(revision), "--out", str(out)]
    if not lintian:
        cmd.append("--no-lintian")
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.fail(f"build-deb.sh failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    print(f"build-deb.sh {' '.join(cmd[3:])}: {time.monotonic() - t0:.0f} s")
    debs = {release: deb_path(release, revision, out) for release in releases}
    for path in debs.values():
        assert path.is_file(), f"build-deb.sh did not make {path}"
    return debs


@pytest.fixture(scope="session")
def debs(appliance_ready) -> dict[str, Path]:
    """Revision 1 for both releases, in dist/ (reused while the inputs are unchanged)."""
    return build_debs(RELEASES)


@pytest.fixture(scope="session")
def next_debs(debs) -> dict[str, Path]:
    """The same tree as ``debs`` with revision 2 ("N+1"), in dist/next/: the cached venv is
    repacked with the new version, nothing is rebuilt. Lintian ran on revision 1."""
    return build_debs(RELEASES, revision=2, out=NEXT_DIST, lintian=False)


@pytest.fixture(scope="session")
def deb(appliance_ready) -> Path:
    """The bookworm .deb under test (packaging/build-deb.sh, reused while its inputs are
    unchanged: the script keeps a hash of them next to the package). Builds bookworm only,
    so a run of the bookworm tests alone does not pay for trixie."""
    return build_debs(("bookworm",))["bookworm"]


@pytest.fixture(scope="session")
def runtime_rootfs(appliance_ready) -> Path:
    return runtime_rootfs_for("bookworm")


def boot(release: str, binds_ro: dict[Path, str], logdir: Path) -> Container:
    """Boot ``release``'s runtime root filesystem (the caller stops it)."""
    c = Container(runtime_rootfs_for(release), binds_ro, logdir,
                  unified_cgroup=release != "bookworm")
    try:
        c.start()
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture(scope="module")
def container(deb: Path, runtime_rootfs: Path, tmp_path_factory) -> Iterator[Container]:
    """A booted bookworm with the package directory at /srv/pkg and the test tools
    (the cloudflared stand-in) at /srv/tools, both read-only."""
    logdir = tmp_path_factory.mktemp("nspawn")
    c = Container(runtime_rootfs, {deb.parent: "/srv/pkg", TOOLS: "/srv/tools"}, logdir)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert not c.leftovers(), f"cgroups left behind: {c.leftovers()}"
