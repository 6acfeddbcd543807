"""The container image is built and run: the Dockerfile, for real, with the dev overlay's settings.

`buildah` builds the Dockerfile (vfs storage, chroot isolation: no daemon, no privileges
beyond root). Where the Dockerfile's base image cannot be pulled, the base is made locally
with `debootstrap`: Debian bookworm (minbase) with Python 3.11, its venv module and
`python` on PATH, which is what the Dockerfile asks of `python:3.11-slim-bookworm`. It is
passed as the `PYTHON_IMAGE` build argument (set IMAGEGEN_TEST_PYTHON_IMAGE to build from
another base, e.g. the real one where a registry is reachable).

Then the image's filesystem runs the three containers of `k8s/overlays/dev` as the pods do:
the command, the literal environment and the secrets the rendered Deployments and Job name,
as uid/gid 10001 from the pod securityContext, on a read-only root with only the data
directory and /tmp writable, and the ConfigMap file `k8s/base/imagegen.toml` mounted at
IMAGEGEN_CONFIG. The migration runs first (on the service's data directory, so that the
schema it makes is the one the service uses), then the service and the gateway; the image's
`imagegen-admin` makes an account and a key, and a generation through the gateway must
answer 200 with a PNG. Listen ports are moved to free ones and the gateway is pointed at
the service on loopback (no cluster DNS here).

Built images are tagged by a digest of the build context, so an unchanged tree reuses its
image, and `--layers` keeps the dependency layer while only the code changes. Needs root
(debootstrap, mounts, chroot), buildah and debootstrap; skips without them, fails in CI.

    python -m tests.test_container_image     # build (or reuse) the image, print its name
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STORAGE = ["--storage-driver", "vfs"]
IMAGE_REPO = "localhost/imagegen"
BASE_REPO = "localhost/imagegen-base"
MIRROR = os.environ.get("IMAGEGEN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the Dockerfile uses of its base: python 3.11 as `python`, `python -m venv` (ensurepip),
# TLS roots for pip, groupadd/useradd (passwd, in minbase).
BASE_PACKAGES = ["python3.11", "python3.11-venv", "python3-distutils", "python-is-python3"]
BASE_PACKAGES.append("ca-certificates")
# The build context (.dockerignore is an allowlist of these).
CONTEXT = ["Dockerfile", ".dockerignore", "pyproject.toml", "README.md"]
CONTEXT_DIRS = ["imagegen_service", "http_gateway"]
SECRETS = {
    "database-url": "sqlite:////var/lib/imagegen/imagegen.db",
    "signing-key": "container-test-signing-key",
    "admin-token": "container-test-admin-token",
}


def buildah(*args: str, capture: bool = True) -> str:
    result = subprocess.run(
        ["buildah", *STORAGE, *args],
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return (result.stdout or "").strip()


def image_exists(name: str) -> bool:
    probe = subprocess.run(
        ["buildah", *STORAGE, "inspect", "--type", "image", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return probe.returncode == 0


def missing() -> str | None:
    """Why the image cannot be built and run here, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (debootstrap, mount namespaces, chroot)"
    for tool in ("buildah", "debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y buildah debootstrap)"
    return None


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _host_trust() -> list[Path]:
    """Extra CAs this machine trusts (an egress proxy's): the local base trusts them too."""
    return sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))


def base_image() -> str:
    """The Dockerfile's base: the given one, or a debootstrapped stand-in, made once."""
    given = os.environ.get("IMAGEGEN_TEST_PYTHON_IMAGE")
    if given:
        return given
    cas = _host_trust()
    recipe = [MIRROR.encode(), " ".join(BASE_PACKAGES).encode(), *(p.read_bytes() for p in cas)]
    name = f"{BASE_REPO}:bookworm-py311-{_digest(recipe)}"
    if image_exists(name):
        return name
    with tempfile.TemporaryDirectory(prefix="imagegen-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        cache = Path(tempfile.gettempdir()) / "imagegen-debootstrap-cache"
        cache.mkdir(exist_ok=True)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--cache-dir={cache}",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(rootfs),
                MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for ca in cas:
            shutil.copy(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
        if cas:
            subprocess.run(
                ["chroot", str(rootfs), "update-ca-certificates"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists", "debootstrap"):
            for path in (rootfs / leftovers).glob("*"):
                if path.is_file():
                    path.unlink()
        container = buildah("from", "scratch")
        try:
            mount = buildah("mount", container)
            subprocess.run(["cp", "-a", f"{rootfs}/.", mount], check=True)
            buildah(
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env",
                "LANG=C.UTF-8",
                # pip's own CA bundle does not know the machine's extra roots.
                "--env",
                "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                "--cmd",
                "python3",
                container,
            )
            buildah("commit", "--quiet", container, name)
        finally:
            buildah("rm", container)
    return name


def context_digest() -> str:
    files = [ROOT / p for p in CONTEXT]
    for directory in CONTEXT_DIRS:
        files += [
            p
            for p in (ROOT / directory).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
        ]
    parts = []
    for path in sorted(files):
        parts += [str(path.relative_to(ROOT)).encode(), path.read_bytes()]
    return _digest(parts)


def build_image() -> str:
    """Build the Dockerfile (or reuse the image of an identical context); return its name."""
    base = base_image()
    name = f"{IMAGE_REPO}:test-{_digest([context_digest().encode(), base.encode()])}"
    if image_exists(name):
        return name
    buildah(
        "bud",
        "--isolation",
        "chroot",
        "--layers",
        "--pull=false",
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "--tag",
        name,
        str(ROOT),
        capture=False,
    )
    # Older test images only fill the disk; the layer cache keeps what can be reused.
    for line in buildah("images", "--format", "{{.Name}}:{{.Tag}}").splitlines():
        if line.startswith(f"{IMAGE_REPO}:test-") and line != name:
            subprocess.run(["buildah", *STORAGE, "rmi", line], check=False, capture_output=True)
    return name


# -- running the dev overlay's containers from the image ------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rendered_dev() -> list[dict[str, Any]]:
    kubectl = Path(sys.executable).with_name("kubectl")
    out = subprocess.run(
        [str(kubectl), "kustomize", str(ROOT / "k8s" / "overlays" / "dev")],
        check=True,
        text=True,
        capture_output=True,
    ).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def workload(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"{kind} {name} is not in the dev overlay")


class Pod:
    """One container of a rendered workload, run from the image's root filesystem."""

    def __init__(self, spec: dict[str, Any], rootfs: Path, image: dict[str, Any]) -> None:
        pod = spec["spec"]["template"]["spec"]
        self.container = pod["containers"][0]
        security = pod["securityContext"]
        self.uid, self.gid = (
            security["runAsUser"],
            security.get("runAsGroup", security["runAsUser"]),
        )
        assert self.container["securityContext"]["readOnlyRootFilesystem"] is True
        self.rootfs = rootfs
        self.workdir = image.get("WorkingDir") or "/"
        self.env = dict(e.split("=", 1) for e in image.get("Env") or [])
        self.env.setdefault("HOME", self.workdir)
        for var in self.container.get("env", []):
            if "value" in var:
                self.env[var["name"]] = var["value"]
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                if ref["key"] in SECRETS:
                    self.env[var["name"]] = SECRETS[ref["key"]]
                else:
                    assert ref.get("optional"), ref
        self.volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = self.container.get("volumeMounts", [])
        self.read_only = {m["mountPath"] for m in mounts if m.get("readOnly")}

    def argv(self, mounts: dict[str, Path], command: list[str]) -> list[str]:
        """A mount namespace: the image's root read-only, the pod's volumes bound in."""
        r = shlex.quote(str(self.rootfs))
        script = ["set -e", f"mount --bind {r} {r}", f"mount -t proc proc {r}/proc"]
        script.append(f"mount --rbind /dev {r}/dev")
        for target, source in mounts.items():
            script.append(f"mount --bind {shlex.quote(str(source))} {r}{shlex.quote(target)}")
            if target in self.read_only:
                script.append(f"mount -o remount,bind,ro {r}{shlex.quote(target)}")
        script.append(f"mount -o remount,bind,ro {r}")
        env = [f"{k}={v}" for k, v in self.env.items()]
        run = ["/usr/bin/env", "-i", *env, "/usr/bin/unshare", f"--root={self.rootfs}"]
        run += [f"--wd={self.workdir}", f"--setuid={self.uid}", f"--setgid={self.gid}"]
        script.append("exec " + shlex.join([*run, *command]))
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)]

    def mounts(self, configmaps: dict[str, Path], data: Path, tmp: Path) -> dict[str, Path]:
        out = {}
        for mount in self.container.get("volumeMounts", []):
            volume = self.volumes[mount["name"]]
            if "configMap" in volume:
                out[mount["mountPath"]] = configmaps[volume["configMap"]["name"]]
            elif mount["mountPath"] == "/tmp":
                out["/tmp"] = tmp
            else:
                assert "emptyDir" in volume, volume
                out[mount["mountPath"]] = data
        return out


@contextlib.contextmanager
def image_rootfs(image: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    container = buildah("from", "--quiet", "--pull=never", image)
    try:
        rootfs = Path(buildah("mount", container))
        config = json.loads(buildah("inspect", "--type", "image", image))["OCIv1"]["config"]
        yield rootfs, config
    finally:
        buildah("rm", container)


def http(url: str, body: dict[str, Any] | None = None, key: str = "") -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


skip_reason = missing()


@pytest.mark.timeout(3600)
@pytest.mark.skipif(
    skip_reason is not None and not os.environ.get("CI"),
    reason=f"container image test: {skip_reason}",
)
def test_the_image_builds_and_serves_a_generation_as_the_dev_overlay_runs_it() -> None:
    assert skip_reason is None, f"CI must build the image: {skip_reason}"
    image = build_image()
    objects = rendered_dev()
    with (
        image_rootfs(image) as (rootfs, config),
        tempfile.TemporaryDirectory(prefix="imagegen-pods-") as tmp,
    ):
        assert config.get("User") == "10001:10001"
        scratch = Path(tmp)
        data, tmps = scratch / "data", {n: scratch / f"tmp-{n}" for n in ("svc", "gw", "job")}
        for directory in (data, *tmps.values()):
            directory.mkdir()
            os.chown(directory, 10001, 10001)
        data.chmod(0o750)
        # The ConfigMaps as their volumes show them: one file per key.
        configmap: dict[str, Path] = {}
        for o in objects:
            if o["kind"] == "ConfigMap":
                directory = configmap[o["metadata"]["name"]] = scratch / o["metadata"]["name"]
                directory.mkdir()
                for key, text in o["data"].items():
                    (directory / key).write_text(text)
        # Mount points, as a container runtime makes them.
        made = [p for p in (rootfs / "etc/imagegen",) if not p.exists()]
        for path in made:
            path.mkdir()
        grpc, metrics, http_port = free_port(), free_port(), free_port()

        job = Pod(workload(objects, "Job", "imagegen-db-upgrade"), rootfs, config)
        service = Pod(workload(objects, "Deployment", "imagegen-service"), rootfs, config)
        gateway = Pod(workload(objects, "Deployment", "imagegen-gateway"), rootfs, config)
        assert service.env["IMAGEGEN_IMAGE_STORE"] == "local"
        service.env |= {"IMAGEGEN_GRPC_PORT": str(grpc), "IMAGEGEN_METRICS_PORT": str(metrics)}
        gateway.env |= {
            "IMAGEGEN_HTTP_PORT": str(http_port),
            "IMAGEGEN_SERVICE_ADDRESS": f"127.0.0.1:{grpc}",
        }

        def run(pod: Pod, tmp_dir: Path, command: list[str]) -> str:
            argv = pod.argv(pod.mounts(configmap, data, tmp_dir), command)
            done = subprocess.run(argv, text=True, capture_output=True, timeout=300, check=False)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            return done.stdout

        # The root filesystem is read-only for the processes, and they are not root.
        probe = "import os; open('/opt/x', 'w')"
        denied = subprocess.run(
            service.argv(service.mounts(configmap, data, tmps["svc"]), ["python", "-c", probe]),
            capture_output=True,
            text=True,
            check=False,
        )
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied
        assert run(service, tmps["svc"], ["id", "-u"]).strip() == "10001"

        run(job, tmps["job"], job.container["command"])
        processes: list[subprocess.Popen[str]] = []
        try:
            for pod, tmp_dir in ((service, tmps["svc"]), (gateway, tmps["gw"])):
                argv = pod.argv(pod.mounts(configmap, data, tmp_dir), pod.container["command"])
                processes.append(
                    subprocess.Popen(
                        argv,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                        start_new_session=True,
                    )
                )
            base = f"http://127.0.0.1:{http_port}"
            deadline = time.monotonic() + 120
            while True:
                for p in processes:
                    assert p.poll() is None, p.communicate()[1][-4000:]
                with contextlib.suppress(OSError):
                    if http(f"{base}/readyz")[0] == 200:
                        break
                assert time.monotonic() < deadline, "the gateway never became ready"
                time.sleep(0.5)

            admin = ["imagegen-admin", "--json"]
            create = [*admin, "accounts", "create", "ci", "--balance", "5"]
            account_id = json.loads(run(service, tmps["svc"], create))["id"]
            key = json.loads(run(service, tmps["svc"], [*admin, "keys", "create", account_id]))
            status, body = http(
                f"{base}/v1/images/generations",
                {
                    "model": "local-sketch",
                    "prompt": "a lighthouse at dusk",
                    "size": "256x256",
                    "response_format": "b64_json",
                },
                key=key["secret"],
            )
            assert status == 200, body
            image_bytes = base64.b64decode(json.loads(body)["data"][0]["b64_json"])
            assert image_bytes.startswith(b"\x89PNG\r\n\x1a\n")
        finally:
            for p in processes:
                if p.poll() is None:
                    os.killpg(p.pid, 15)
                try:
                    p.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.communicate()
        for path in made:
            path.rmdir()
        # The pods saw the ConfigMap file of the repository.
        assert service.env["IMAGEGEN_CONFIG"] == "/etc/imagegen/config.toml"
        rendered = configmap[service.volumes["config"]["configMap"]["name"]] / "config.toml"
        assert rendered.read_text() == (ROOT / "k8s" / "base" / "imagegen.toml").read_text()


if __name__ == "__main__":
    reason = missing()
    if reason:
        sys.exit(f"cannot build the image here: {reason}")
    print(build_image())
