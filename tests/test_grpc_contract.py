"""The gRPC API as a contract other teams build on: error reasons a program can switch on
(the ``ErrorReason`` enum and ``google.rpc.RetryInfo``), and the proto module itself, checked
by ``buf lint`` and by ``buf breaking`` against an earlier commit.

buf comes from the ``@bufbuild/buf`` npm package, pinned below and installed on first use
into ``.venv/buf``. Without ``npm`` the buf tests skip on a laptop and fail in CI
(``CI=true``). ``buf breaking`` compares the working tree's protos with those of
``IMAGEGEN_PROTO_BASE`` (a git revision; default ``HEAD~1``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagegen_service import errors, grpc_errors
from imagegen_service.gen import errors_pb2, images_pb2, images_pb2_grpc
from tests.conftest import ADMIN_TOKEN, Stack
from tests.services import IN_CI

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
BUF_VERSION = "1.75.0"
BUF_DIR = ROOT / ".venv" / "buf"
BUF = BUF_DIR / "node_modules" / ".bin" / "buf"
BUF_TIMEOUT = 120
_PACKAGE = f"@bufbuild/buf@{BUF_VERSION}"


def _all_reasons() -> set[str]:
    seen: set[str] = set()
    pending: list[type[errors.ImagegenError]] = [errors.ImagegenError]
    while pending:
        cls = pending.pop()
        seen.add(cls.reason)
        pending.extend(cls.__subclasses__())
    return seen


def test_every_reason_sent_is_an_error_reason_name_and_every_name_is_sent() -> None:
    names = {v.name for v in errors_pb2.ErrorReason.DESCRIPTOR.values} - {
        "ERROR_REASON_UNSPECIFIED"
    }
    assert _all_reasons() == names
    # Every reason but INTERNAL has its own status code in the one table.
    assert set(grpc_errors._CODES) == names - {"INTERNAL"}


def _details(exc: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[float]]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    delays: list[float] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delays.append(retry.retry_delay.ToTimedelta().total_seconds())
    return info, delays


async def test_a_rate_limited_call_carries_retry_info_beside_the_error_info(
    stack: Stack,
) -> None:
    _, key, key_id = await stack.new_account(100_000)
    await stack.running.ledger.set_key_limits(key_id, 1, None)
    images = images_pb2_grpc.ImageGenerationStub(stack.channel)
    request = images_pb2.GenerateImagesRequest(model="local-sketch", prompt="p", size="256x256")
    auth = (("authorization", f"Bearer {key}"),)
    assert [m.WhichOneof("event") async for m in images.GenerateImages(request, metadata=auth)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in images.GenerateImages(request, metadata=auth):
            pass
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, delays = _details(refused.value)
    assert errors_pb2.ErrorReason.Value(info.reason) == errors_pb2.RATE_LIMITED
    assert delays == [float(info.metadata["retry_after_seconds"])]
    assert 1 <= delays[0] <= 60


async def test_a_refusal_retrying_cannot_help_carries_no_retry_info(stack: Stack) -> None:
    images = images_pb2_grpc.ImageGenerationStub(stack.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await images.ListModels(
            images_pb2.ListModelsRequest(), metadata=(("authorization", "Bearer sk-nope"),)
        )
    info, delays = _details(refused.value)
    assert errors_pb2.ErrorReason.Value(info.reason) == errors_pb2.INVALID_API_KEY
    assert delays == []


@pytest.mark.parametrize(
    "error",
    [
        errors.ServiceUnavailable("database away"),
        errors.IdempotencyInProgress("still running"),
        errors.RateLimited("decode budget", retry_after_seconds=2),
    ],
)
def test_every_retryable_refusal_says_when_to_retry(error: errors.ImagegenError) -> None:
    status = grpc_errors.to_status(error)
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    message = status_pb2.Status.FromString(raw)  # type: ignore[arg-type]
    kinds = [d.type_url.rsplit("/", 1)[-1] for d in message.details]
    assert kinds == ["google.rpc.ErrorInfo", "google.rpc.RetryInfo"]
    retry = error_details_pb2.RetryInfo()
    message.details[1].Unpack(retry)
    assert retry.retry_delay.seconds == int(error.metadata()["retry_after_seconds"])


# -- the proto module ----------------------------------------------------------------------


def _unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def buf() -> Path:
    """The pinned buf binary, installed from npm on first use."""
    if BUF.exists():
        version = subprocess.run([BUF, "--version"], capture_output=True, text=True, check=False)
        if version.stdout.strip() == BUF_VERSION:
            return BUF
    npm = shutil.which("npm")
    if npm is None:
        _unavailable("npm is not installed: buf comes from the @bufbuild/buf npm package")
    BUF_DIR.mkdir(parents=True, exist_ok=True)
    installed = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(BUF_DIR), _PACKAGE],
        capture_output=True,
        text=True,
        timeout=BUF_TIMEOUT,
        check=False,
    )
    if installed.returncode != 0 or not BUF.exists():
        _unavailable(f"npm could not install {_PACKAGE}: {installed.stderr}")
    return BUF


def _run(*args: str | Path, cwd: Path = PROTO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=BUF_TIMEOUT,
        check=False,
    )


def test_buf_lint_passes() -> None:
    result = _run(buf(), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


_BREAKING_RULES = "    breaking:\n      use:\n        - FILE\n"
_FIRST_FILE_OPTIONS = "".join(
    f"      except:\n        - {rule}\n" if i == 0 else f"        - {rule}\n"
    for i, rule in enumerate(
        (
            "FILE_SAME_GO_PACKAGE",
            "FILE_SAME_JAVA_PACKAGE",
            "FILE_SAME_JAVA_MULTIPLE_FILES",
            "FILE_SAME_JAVA_OUTER_CLASSNAME",
            "FILE_SAME_CSHARP_NAMESPACE",
        )
    )
)


def test_no_breaking_change_against_the_base_commit(tmp_path: Path) -> None:
    base = os.environ.get("IMAGEGEN_PROTO_BASE", "HEAD~1")
    # The base's own API files, built with today's buf.yaml and vendored imports, so a base
    # from before the module existed compares too.
    listed = _run("git", "ls-tree", "-r", "--name-only", base, "proto/imagegen", cwd=ROOT)
    if listed.returncode != 0:
        _unavailable(f"git cannot read {base}: {listed.stderr.strip()}")
    old = tmp_path / "base"
    for name in listed.stdout.split():
        shown = subprocess.run(
            ["git", "show", f"{base}:{name}"], cwd=ROOT, capture_output=True, check=True
        )
        target = old / Path(name).relative_to("proto")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shown.stdout)
    shutil.copytree(PROTO / "third_party", old / "third_party")
    shutil.copy(PROTO / "buf.yaml", old / "buf.yaml")
    config = (PROTO / "buf.yaml").read_text()
    if _run("git", "cat-file", "-e", f"{base}:proto/buf.yaml", cwd=ROOT).returncode != 0:
        # The base predates the buf module, whose commit gave every file its language
        # options (go_package, java_package, ...): only that first setting is allowed.
        assert _BREAKING_RULES in config
        config = config.replace(_BREAKING_RULES, _BREAKING_RULES + _FIRST_FILE_OPTIONS)
    result = _run(buf(), "breaking", "--against", old, "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_protos_in_the_package_are_those_of_proto() -> None:
    """`make proto` copies the .proto files into the package, which ships them in the
    wheel; a stale copy would give consumers another API than the one served."""
    shipped = ROOT / "imagegen_service" / "gen" / "proto"
    sources = sorted(p.relative_to(PROTO / "imagegen") for p in PROTO.glob("imagegen/**/*.proto"))
    assert sources == sorted(
        p.relative_to(shipped / "imagegen") for p in shipped.glob("imagegen/**/*.proto")
    )
    for path in sources:
        assert (shipped / "imagegen" / path).read_bytes() == (
            PROTO / "imagegen" / path
        ).read_bytes()
    for vendored in (PROTO / "third_party").glob("google/**/*.proto"):
        relative = vendored.relative_to(PROTO / "third_party")
        assert (shipped / relative).read_bytes() == vendored.read_bytes()


# -- docs/grpc.md ---------------------------------------------------------------------------

DOC = ROOT / "docs" / "grpc.md"


def _doc_commands() -> list[str]:
    blocks = DOC.read_text().split("```sh\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


def test_the_doc_shows_a_public_and_an_admin_call() -> None:
    commands = "".join(_doc_commands())
    assert "imagegen.v1.ImageGeneration/ListModels" in commands
    assert "imagegen.v1.Admin/ListAccounts" in commands


async def test_the_docs_buf_curl_commands_work_against_a_real_server(stack: Stack) -> None:
    account_id, key, _ = await stack.new_account(1_000_000)
    env = {
        **os.environ,
        "PATH": f"{buf().parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "GRPC": stack.grpc_address,
        "API_KEY": key,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "ACCOUNT_ID": account_id,
    }
    # Twice: the doc's retry-safe credit must be applied once.
    for block in _doc_commands() * 2:
        ran = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", block],
            env=env,
            capture_output=True,
            text=True,
            timeout=BUF_TIMEOUT,
            check=False,
        )
        assert ran.returncode == 0, f"{block}\n{ran.stdout}\n{ran.stderr}"
    credits = [e for e in await stack.ledger(account_id) if e.credit_id]
    assert [(e.credit_id, e.available_delta_micros) for e in credits] == [
        ("invoice-2026-117", 5_000_000)
    ]
