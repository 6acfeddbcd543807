"""What the real processes do when the world around them is wrong: an unreachable database, a
port another process holds, a typo in the configuration, a log setting nobody knows, Redis or
PostgreSQL going away while they run.

Every start that cannot succeed ends with a non-zero status and ONE line on stderr (one JSON
object when the logs are JSON) that names what is wrong and never a password. Outages at
runtime are logged once when they begin and once when they end, show in the metrics, and
heal by themselves. The processes run as an operator runs them: ``imagegen-service``,
``imagegen-gateway``, ``imagegen-admin`` and ``imagegen-run`` as subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from http_gateway.app import create_app
from http_gateway.config import GatewayConfig, load_gateway_config
from imagegen_service.config import PROVIDER_OPTIONS, load_config
from imagegen_service.gen import admin_pb2, admin_pb2_grpc, images_pb2, images_pb2_grpc
from imagegen_service.stores.ledger_sql import LedgerStore
from tests.conftest import assert_openai_error
from tests.fakes.loopback import free_port
from tests.services import scratch_postgres_database, scratch_redis_url

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PASSWORD = "hunter2-never-printed"
ADMIN_TOKEN = "faults-admin-token"
STARTUP_SECONDS = 20.0

LOCAL_ONLY = """
[service]
health_check_seconds = 0.2

[rate_limits]
requests_per_minute = 1000

[providers.local]
type = "local"

[models.local-sketch]
provider = "local"
sizes = ["256x256"]

[models.local-sketch.price_usd]
default = "0.001"
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without its IMAGEGEN_* settings, with a data directory,
    ports nobody else uses and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.update(
        IMAGEGEN_DATA_DIR=str(tmp_path / "data"),
        IMAGEGEN_GRPC_PORT=str(free_port()),
        IMAGEGEN_HTTP_PORT=str(free_port()),
        IMAGEGEN_METRICS_PORT="0",
        IMAGEGEN_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass(frozen=True)
class Exit:
    status: int
    stdout: str
    stderr: str

    def one_line(self) -> str:
        """The process failed, and said so in exactly one line."""
        assert self.status not in (0, None), (self.status, self.stderr)
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert "Traceback" not in self.stderr
        return lines[0]

    def one_json_error(self, logger: str) -> str:
        """The process failed with one JSON log line, ``startup.failed``; its message."""
        line = orjson.loads(self.one_line())
        assert line["event"] == "startup.failed", line
        assert line["level"] == "error" and line["logger"] == logger, line
        assert "timestamp" in line
        message: str = line["error"]
        return message


async def run(command: str, *args: str, env: Mapping[str, str], seconds: float = 60) -> Exit:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / command),
        *args,
        env=dict(env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Exit(proc.returncode, out.decode(), err.decode())


async def run_all(*runs: Awaitable[Exit]) -> list[Exit]:
    """Several processes at once: each start costs a second of imports."""
    return list(await asyncio.gather(*runs))


@contextlib.asynccontextmanager
async def background(
    command: str, env: Mapping[str, str], log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``command`` running, its stderr in ``log_path``; stopped when the block ends."""
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / command), cwd=ROOT, env=dict(env), stdout=log, stderr=log
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def log_lines(log_path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in log_path.read_bytes().splitlines() if raw.strip()]


def events(log_path: Path, event: str) -> list[dict[str, Any]]:
    return [line for line in log_lines(log_path) if line["event"] == event]


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, seconds: float = STARTUP_SECONDS
) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def health_of(channel: grpc.aio.Channel, service: str = "") -> str:
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=1
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def serving(
    channel: grpc.aio.Channel, proc: asyncio.subprocess.Process, log_path: Path
) -> None:
    async def up() -> bool:
        assert proc.returncode is None, log_lines(log_path)
        return await health_of(channel) == "SERVING"

    await eventually(up, "the service to serve")


def write_config(tmp_path: Path, text: str, name: str = "imagegen.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- an unreachable database ---------------------------------------------------------------


async def test_an_unreachable_database_is_one_line_naming_the_url_without_its_password(
    tmp_path: Path,
) -> None:
    dead = free_port()
    url = f"postgresql://imagegen:{PASSWORD}@127.0.0.1:{dead}/imagegen"
    shown = f"postgresql://imagegen:***@127.0.0.1:{dead}/imagegen"
    env = _env(tmp_path, IMAGEGEN_DATABASE_URL=url)
    # Started side by side: each service needs a port of its own.
    plain = {**env, "IMAGEGEN_LOG_FORMAT": "console", "IMAGEGEN_GRPC_PORT": str(free_port())}

    service, service_plain, admin, admin_json, upgrade = await run_all(
        run("imagegen-service", env=env),
        run("imagegen-service", env=plain),
        run("imagegen-admin", "accounts", "create", "acme", env=plain),
        run("imagegen-admin", "accounts", "create", "acme", env=env),
        run("imagegen-admin", "db", "upgrade", env=plain),
    )

    for message in (
        service.one_json_error("imagegen-service"),
        service_plain.one_line().removeprefix("imagegen-service: "),
        admin.one_line().removeprefix("imagegen-admin: "),
        admin_json.one_json_error("imagegen-admin"),
        upgrade.one_line().removeprefix("imagegen-admin: "),
    ):
        # The URL, the cause, and the fix.
        assert shown in message, message
        assert "connection refused" in message
        assert "IMAGEGEN_DATABASE_URL" in message
    for result in (service, service_plain, admin, admin_json, upgrade):
        assert PASSWORD not in result.stderr + result.stdout
    assert service_plain.stderr.startswith("imagegen-service: cannot use the database ")


async def test_a_database_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory")
    sqlite = await run(
        "imagegen-service",
        env=_env(tmp_path, IMAGEGEN_DATABASE_URL=f"sqlite:///{in_the_way}/imagegen.db"),
    )
    message = sqlite.one_json_error("imagegen-service")
    assert f"sqlite:///{in_the_way}/imagegen.db" in message
    assert "IMAGEGEN_DATA_DIR" in message

    wrong_scheme = await run(
        "imagegen-service",
        env=_env(tmp_path, IMAGEGEN_DATABASE_URL=f"mysql://root:{PASSWORD}@db/imagegen"),
    )
    message = wrong_scheme.one_json_error("imagegen-service")
    assert "IMAGEGEN_DATABASE_URL must start with sqlite:/// or postgresql://" in message
    assert PASSWORD not in wrong_scheme.stderr


# -- taken ports -------------------------------------------------------------------------


async def test_a_second_service_on_the_same_port_refuses_to_start(tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    env = _env(tmp_path, IMAGEGEN_GRPC_PORT=str(grpc_port), IMAGEGEN_METRICS_PORT=str(metrics_port))
    log_path = tmp_path / "first.log"
    async with (
        background("imagegen-service", env, log_path) as first,
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        await serving(channel, first, log_path)

        # gRPC's default SO_REUSEPORT would let a second socket share the port, and the
        # kernel split the connections between two services with two sets of counters.
        with socket.socket() as intruder:
            intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError) as taken:
                intruder.bind(("127.0.0.1", grpc_port))
        assert taken.value.errno == errno.EADDRINUSE

        other_data = tmp_path / "second"
        second, metrics_taken, gateway, gateway_plain = await run_all(
            run(
                "imagegen-service",
                env={**env, "IMAGEGEN_DATA_DIR": str(other_data), "IMAGEGEN_METRICS_PORT": "0"},
            ),
            run(
                "imagegen-service",
                env={
                    **env,
                    "IMAGEGEN_DATA_DIR": str(other_data),
                    "IMAGEGEN_GRPC_PORT": str(free_port()),
                },
            ),
            run("imagegen-gateway", env={**env, "IMAGEGEN_HTTP_PORT": str(grpc_port)}),
            run(
                "imagegen-gateway",
                env={
                    **env,
                    "IMAGEGEN_HTTP_PORT": str(grpc_port),
                    "IMAGEGEN_LOG_FORMAT": "console",
                },
            ),
        )
        message = second.one_json_error("imagegen-service")
        assert f"127.0.0.1:{grpc_port} (gRPC)" in message
        assert "another process is already listening" in message
        assert "IMAGEGEN_GRPC_PORT" in message
        message = metrics_taken.one_json_error("imagegen-service")
        assert f"127.0.0.1:{metrics_port} (metrics)" in message
        assert "IMAGEGEN_METRICS_PORT" in message
        message = gateway.one_json_error("imagegen-gateway")
        assert f"127.0.0.1:{grpc_port} (HTTP)" in message
        assert "IMAGEGEN_HTTP_PORT" in message
        assert gateway_plain.one_line().startswith(
            f"imagegen-gateway: cannot listen on 127.0.0.1:{grpc_port} (HTTP): "
        )

        # The first one never noticed.
        assert await health_of(channel) == "SERVING"
        assert first.returncode is None
    assert not events(log_path, "startup.failed")


@contextlib.contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """Some other program listening on ``port``."""
    with socket.create_server(("127.0.0.1", port)) as sock:
        yield sock


async def test_make_run_says_which_port_is_taken_and_starts_nothing(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    env = _env(tmp_path, IMAGEGEN_HTTP_PORT=str(http_port), IMAGEGEN_GRPC_PORT=str(grpc_port))
    plain = {**env, "IMAGEGEN_LOG_FORMAT": "console"}
    with listening(http_port):
        http_taken, http_taken_json = await run_all(
            run("imagegen-run", env=plain), run("imagegen-run", env=env)
        )
    with listening(grpc_port):
        grpc_taken = await run("imagegen-run", env=plain)

    line = http_taken.one_line()
    assert line.startswith(f"imagegen-run: cannot listen on 127.0.0.1:{http_port} (HTTP)")
    assert "IMAGEGEN_HTTP_PORT" in line
    assert "(HTTP)" in http_taken_json.one_json_error("imagegen-run")
    line = grpc_taken.one_line()
    assert line.startswith(f"imagegen-run: cannot listen on 127.0.0.1:{grpc_port} (gRPC)")
    for result in (http_taken, http_taken_json, grpc_taken):
        assert "imagegen is up" not in result.stdout
        assert "Bearer" not in result.stdout
    # Nothing was started: no account, no key printed, the ports free again.
    assert not (tmp_path / "data" / "dev-account").exists()
    for port in (http_port, grpc_port):
        with socket.create_server(("127.0.0.1", port)):
            pass


# -- configuration typos -----------------------------------------------------------------

GOOD_MODEL = """
[providers.local]
type = "local"

[models.local-sketch]
provider = "local"
sizes = ["256x256"]

[models.local-sketch.price_usd]
default = "0.001"
"""

# (the file, the processes that must refuse it, what the one line must say)
CONFIG_TYPOS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "service key": (
        "[service]\nurl_tl_seconds = 60\n" + GOOD_MODEL,
        ("imagegen-service", "imagegen-admin"),
        ("[service]", "'url_tl_seconds'", "did you mean 'url_ttl_seconds'?"),
    ),
    "table": (
        "[gatway]\nhttp_port = 8081\n" + GOOD_MODEL,
        ("imagegen-service", "imagegen-gateway"),
        ("[gatway]", "did you mean", "gateway"),
    ),
    "model key": (
        GOOD_MODEL.replace('sizes = ["256x256"]', 'sizes = ["256x256"]\nmax_prompt_char = 100'),
        ("imagegen-service",),
        ("[models.local-sketch]", "'max_prompt_char'", "did you mean 'max_prompt_chars'?"),
    ),
    "wrong type": (
        '[service]\nurl_ttl_seconds = "an hour"\n' + GOOD_MODEL,
        ("imagegen-service",),
        ("[service] url_ttl_seconds must be an integer", "'an hour'"),
    ),
    "provider option": (
        GOOD_MODEL
        + '[providers.azure]\ntype = "azure-openai"\nbase_url = "https://x.invalid"\n'
        + 'deploymnt = "images"\n',
        ("imagegen-service",),
        ("[providers.azure]", "'azure-openai'", "'deploymnt'", "did you mean 'deployment'?"),
    ),
    "option of another provider type": (
        GOOD_MODEL + '[providers.gemini]\ntype = "gemini"\nproject = "my-project"\n',
        ("imagegen-service",),
        ("[providers.gemini]", "'gemini'", "unknown key 'project'"),
    ),
    "gateway key": (
        "[gateway]\nhttp_prot = 8081\n" + GOOD_MODEL,
        ("imagegen-gateway",),
        ("[gateway]", "'http_prot'", "did you mean 'http_port'?"),
    ),
    "gateway type": (
        '[gateway]\nhttp_port = "8081"\n' + GOOD_MODEL,
        ("imagegen-gateway",),
        ("[gateway] http_port must be an integer", "'8081'"),
    ),
}


# The typos of the report run through the processes; the rest through the same loaders
# in this process, which is what the processes run (and a second faster).
THROUGH_PROCESSES = {"service key", "table", "model key"}


async def test_configuration_typos_are_refused_with_the_file_the_key_and_the_nearest_name(
    tmp_path: Path,
) -> None:
    cases = []
    in_process = []
    for i, (name, (text, programs, wanted)) in enumerate(CONFIG_TYPOS.items()):
        path = write_config(tmp_path, text, f"case{i}.toml")
        for program in programs:
            if name in THROUGH_PROCESSES:
                args = ("db", "current") if program == "imagegen-admin" else ()
                cases.append((name, program, path, wanted, args))
            else:
                in_process.append((name, program, path, wanted))
    results = await run_all(
        *(
            run(program, *args, env=_env(tmp_path, IMAGEGEN_CONFIG=str(path)))
            for _, program, path, _, args in cases
        )
    )
    messages = [
        (name, program, path, wanted, result.one_json_error(program))
        for (name, program, path, wanted, _), result in zip(cases, results, strict=True)
    ]
    for name, program, path, wanted in in_process:
        load = load_gateway_config if program == "imagegen-gateway" else load_config
        with pytest.raises(ValueError) as refused:
            load({"IMAGEGEN_CONFIG": str(path)})
        messages.append((name, program, path, wanted, str(refused.value)))
    assert {name for name, *_ in messages} == set(CONFIG_TYPOS)
    for name, program, path, wanted, message in messages:
        assert message.startswith(f"{path}: "), (name, program, message)
        for part in wanted:
            assert part in message, (name, program, message)


def test_every_provider_option_the_code_reads_is_known() -> None:
    """The list the strict reading checks against follows the code: each option a provider
    adapter reads is known. (The gateway and the service read one list of tables.)"""
    read = set()
    for source in (ROOT / "imagegen_service" / "providers").glob("*.py"):
        text = source.read_text()
        read |= set(re.findall(r"options\.get\(\s*\"(\w+)\"", text))
        read |= set(re.findall(r"_option_\w+\(\s*(?:config|options), \"(\w+)\"", text))
        read |= set(re.findall(r"\boption\(\"(\w+)\"\)", text))
    assert read, "the pattern found no option at all"
    known = set().union(*PROVIDER_OPTIONS.values())
    assert read <= known, read - known


async def test_a_log_setting_nobody_knows_is_one_line_naming_the_variable(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path, IMAGEGEN_LOG_LEVEL="LOUD")
    service, gateway, admin, run_ = await run_all(
        run("imagegen-service", env=env),
        run("imagegen-gateway", env=env),
        run("imagegen-admin", "db", "current", env={**env, "IMAGEGEN_LOG_FORMAT": "console"}),
        run("imagegen-run", env=env),
    )
    for message in (
        service.one_json_error("imagegen-service"),
        gateway.one_json_error("imagegen-gateway"),
        admin.one_line().removeprefix("imagegen-admin: "),
        run_.one_json_error("imagegen-run"),
    ):
        assert message == (
            "IMAGEGEN_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got 'LOUD'"
        )
    bad_format = await run("imagegen-gateway", env={**env, "IMAGEGEN_LOG_FORMAT": "xml"})
    assert "IMAGEGEN_LOG_FORMAT must be one of json, console; got 'xml'" in bad_format.one_line()


# -- outages at runtime: a TCP hop the test can cut ----------------------------------------


class Cuttable:
    """A TCP forwarder from a local port to ``target``: ``cut()`` closes the port and every
    connection through it, as a crashed server or a lost network would; ``mend()`` listens
    on the same port again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    async def mend(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            await self.cut()


@contextlib.asynccontextmanager
async def cuttable(url: str) -> AsyncIterator[Cuttable]:
    host_port = re.search(r"@?([\w.]+):(\d+)/", url.split("://", 1)[1] + "/")
    assert host_port, url
    hop = Cuttable(host_port.group(1), int(host_port.group(2)))
    await hop.mend()
    try:
        yield hop
    finally:
        await hop.close()


def through(url: str, hop: Cuttable, password: str | None = None) -> str:
    """``url`` pointed at the hop (and given ``password``, which the server ignores)."""
    scheme, rest = url.split("://", 1)
    userinfo, _, location = rest.rpartition("@")
    path = location.split("/", 1)[1] if "/" in location else ""
    if password is not None:
        userinfo = f"{userinfo.split(':')[0] or 'postgres'}:{password}"
    at = f"{userinfo}@" if userinfo else ""
    return f"{scheme}://{at}127.0.0.1:{hop.port}/{path}"


async def scrape(http: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def new_key(channel: grpc.aio.Channel) -> tuple[str, str]:
    admin = admin_pb2_grpc.AdminStub(channel)
    metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    account = await admin.CreateAccount(
        admin_pb2.CreateAccountRequest(name="faults", initial_balance_micros=1_000_000),
        metadata=metadata,
    )
    created = await admin.CreateKey(
        admin_pb2.CreateKeyRequest(account_id=account.id), metadata=metadata
    )
    return account.id, created.secret


async def generate(channel: grpc.aio.Channel, key: str) -> dict[str, str]:
    """One generation over gRPC; its trailing metadata (the x-ratelimit-* values)."""
    call = images_pb2_grpc.ImageGenerationStub(channel).GenerateImages(
        images_pb2.GenerateImagesRequest(model="local-sketch", prompt="p", size="256x256"),
        metadata=(("authorization", f"Bearer {key}"),),
        timeout=10,
    )
    assert [m.WhichOneof("event") async for m in call] == ["image", "summary"]
    return {k: str(v) for k, v in await call.trailing_metadata()}


async def test_redis_going_away_is_logged_once_counted_and_healed(tmp_path: Path) -> None:
    async with scratch_redis_url() as redis_url, cuttable(redis_url) as hop:
        grpc_port, metrics_port = free_port(), free_port()
        env = _env(
            tmp_path,
            IMAGEGEN_CONFIG=str(write_config(tmp_path, LOCAL_ONLY)),
            IMAGEGEN_GRPC_PORT=str(grpc_port),
            IMAGEGEN_METRICS_PORT=str(metrics_port),
            IMAGEGEN_REDIS_URL=through(redis_url, hop),
            IMAGEGEN_ADMIN_TOKEN=ADMIN_TOKEN,
        )
        log_path = tmp_path / "service.log"
        async with (
            background("imagegen-service", env, log_path) as service,
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
            aiohttp.ClientSession() as http,
        ):
            await serving(channel, service, log_path)
            _, key = await new_key(channel)
            counted = await generate(channel, key)
            assert counted["x-ratelimit-remaining-requests"] == "999"
            assert (await scrape(http, metrics_port))["imagegen_rate_limit_backend_up"] == 1

            await hop.cut()
            for _ in range(20):
                # Served, without limits.
                assert "x-ratelimit-remaining-requests" in await generate(channel, key)

            async def reported_down() -> bool:
                metrics = await scrape(http, metrics_port)
                return metrics["imagegen_rate_limit_backend_up"] == 0

            await eventually(reported_down, "the metric to show Redis down", seconds=5)
            metrics = await scrape(http, metrics_port)
            assert metrics["imagegen_rate_limit_failed_open_total"] == 20
            [down] = events(log_path, "ratelimit.unavailable")
            assert down["level"] == "warning"
            assert "exception" not in down and "Traceback" not in log_path.read_text()

            await hop.mend()

            async def reported_up() -> bool:
                metrics = await scrape(http, metrics_port)
                return metrics["imagegen_rate_limit_backend_up"] == 1

            await eventually(reported_up, "the metric to show Redis back", seconds=5)
            # Counted in Redis again, where the count stood (or afresh, if a new minute began).
            remaining = (await generate(channel, key))["x-ratelimit-remaining-requests"]
            assert remaining in ("998", "999")
            [up] = events(log_path, "ratelimit.recovered")
            assert up["requests_without_limits"] == 20
            assert len(events(log_path, "ratelimit.unavailable")) == 1
            assert service.returncode is None


async def test_postgres_going_away_turns_the_service_unready_and_503_until_it_is_back(
    tmp_path: Path,
) -> None:
    async with scratch_postgres_database() as database_url, cuttable(database_url) as hop:
        store = LedgerStore(database_url)
        try:
            await store.upgrade()
        finally:
            await store.close()
        grpc_port, metrics_port = free_port(), free_port()
        env = _env(
            tmp_path,
            IMAGEGEN_CONFIG=str(write_config(tmp_path, LOCAL_ONLY)),
            IMAGEGEN_GRPC_PORT=str(grpc_port),
            IMAGEGEN_METRICS_PORT=str(metrics_port),
            IMAGEGEN_DATABASE_URL=through(database_url, hop, password=PASSWORD),
            IMAGEGEN_ADMIN_TOKEN=ADMIN_TOKEN,
        )
        address = f"127.0.0.1:{grpc_port}"
        log_path = tmp_path / "service.log"
        async with (
            background("imagegen-service", env, log_path) as service,
            grpc.aio.insecure_channel(address) as channel,
            aiohttp.ClientSession() as http,
        ):
            await serving(channel, service, log_path)
            gateway = web.AppRunner(create_app(GatewayConfig(service_address=address)))
            await gateway.setup()
            try:
                await web.TCPSite(gateway, "127.0.0.1", 0).start()
                host, port = gateway.addresses[0][:2]
                await _outage(f"http://{host}:{port}", channel, http, hop, metrics_port, log_path)
            finally:
                await gateway.cleanup()
            assert service.returncode is None
    assert PASSWORD not in log_path.read_text()


async def _outage(
    gateway_url: str,
    channel: grpc.aio.Channel,
    http: aiohttp.ClientSession,
    hop: Cuttable,
    metrics_port: int,
    log_path: Path,
) -> None:
    account_id, key = await new_key(channel)
    body = {"model": "local-sketch", "prompt": "p", "size": "256x256"}
    headers = {"Authorization": f"Bearer {key}"}
    url = gateway_url + "/v1/images/generations"
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
    assert (await scrape(http, metrics_port))["imagegen_database_up"] == 1

    await hop.cut()

    async def unready() -> bool:
        return await health_of(channel, "imagegen.v1.ImageGeneration") == "NOT_SERVING"

    await eventually(unready, "the service to report NOT_SERVING", seconds=5)
    # Liveness: the process itself is fine, and restarting it would not bring PostgreSQL back.
    assert await health_of(channel) == "SERVING"
    assert await health_of(channel, "imagegen.v1.Admin") == "NOT_SERVING"
    # The gateway's readiness follows the image service: the pod leaves the load balancer.
    async with http.get(gateway_url + "/readyz") as resp:
        assert resp.status == 503, await resp.text()
    async with http.get(gateway_url + "/healthz") as resp:
        assert resp.status == 200
    for _ in range(5):
        async with http.post(url, json=body, headers=headers) as resp:
            await assert_openai_error(resp, 503, "service_unavailable", should_retry=True)
    assert (await scrape(http, metrics_port))["imagegen_database_up"] == 0
    [down] = events(log_path, "database.unavailable")
    assert f"127.0.0.1:{hop.port}" in down["database"] and "***" in down["database"]
    # Why, in words (refused, reset or closed, by when the check ran), not a traceback.
    assert down["error"].startswith("cannot use the database "), down
    assert "exception" not in down

    await hop.mend()

    async def ready() -> bool:
        return await health_of(channel, "imagegen.v1.ImageGeneration") == "SERVING"

    await eventually(ready, "the service to serve again", seconds=5)
    async with http.get(gateway_url + "/readyz") as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert (await scrape(http, metrics_port))["imagegen_database_up"] == 1
    assert len(events(log_path, "database.recovered")) == 1
    assert len(events(log_path, "database.unavailable")) == 1
    # Two images charged; the refused requests cost nothing.
    admin = admin_pb2_grpc.AdminStub(channel)
    account = await admin.GetAccount(
        admin_pb2.GetAccountRequest(account_id=account_id),
        metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
    )
    assert (account.available_micros, account.held_micros) == (1_000_000 - 2 * 1_000, 0)
    assert not events(log_path, "rpc.failed")


async def test_a_database_gone_before_the_health_checks_notice_is_503_not_500(
    tmp_path: Path,
) -> None:
    # Health checks an hour apart: the service learns of the outage only from the calls.
    config = LOCAL_ONLY.replace("health_check_seconds = 0.2", "health_check_seconds = 3600")
    async with scratch_postgres_database() as database_url, cuttable(database_url) as hop:
        store = LedgerStore(database_url)
        try:
            await store.upgrade()
        finally:
            await store.close()
        grpc_port = free_port()
        env = _env(
            tmp_path,
            IMAGEGEN_CONFIG=str(write_config(tmp_path, config)),
            IMAGEGEN_GRPC_PORT=str(grpc_port),
            IMAGEGEN_DATABASE_URL=through(database_url, hop, password=PASSWORD),
            IMAGEGEN_ADMIN_TOKEN=ADMIN_TOKEN,
        )
        address = f"127.0.0.1:{grpc_port}"
        log_path = tmp_path / "service.log"
        async with (
            background("imagegen-service", env, log_path) as service,
            grpc.aio.insecure_channel(address) as channel,
            aiohttp.ClientSession() as http,
        ):
            await serving(channel, service, log_path)
            account_id, key = await new_key(channel)
            gateway = web.AppRunner(create_app(GatewayConfig(service_address=address)))
            await gateway.setup()
            try:
                await web.TCPSite(gateway, "127.0.0.1", 0).start()
                host, port = gateway.addresses[0][:2]
                url = f"http://{host}:{port}/v1/images/generations"
                body = {"model": "local-sketch", "prompt": "p", "size": "256x256"}
                headers = {"Authorization": f"Bearer {key}"}
                async with http.post(url, json=body, headers=headers) as resp:
                    assert resp.status == 200
                await hop.cut()
                for _ in range(3):
                    async with http.post(url, json=body, headers=headers) as resp:
                        await assert_openai_error(
                            resp, 503, "service_unavailable", should_retry=True
                        )
            finally:
                await gateway.cleanup()
            assert service.returncode is None
        # One line per refused call, no traceback, no password.
        text = log_path.read_text()
        assert not events(log_path, "rpc.failed")
        assert events(log_path, "rpc.database_unavailable")
        assert "Traceback" not in text
        assert PASSWORD not in text
        await hop.mend()
        store = LedgerStore(database_url)
        try:
            account = await store.get_account(account_id)
        finally:
            await store.close()
        # The one image before the outage is the only charge.
        assert (account.available_micros, account.held_micros) == (1_000_000 - 1_000, 0)
