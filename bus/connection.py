"""The NATS connection every process opens: settings from the environment, reconnect forever, logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nats.aio.client import PING_PROTO, Client
from nats.errors import SlowConsumerError

from bus.parser import MessageParser

log = logging.getLogger("bitnexus.bus")

DEFAULT_URL = "nats://127.0.0.1:4222"
reconnect_wait_s_min = 0.5
reconnect_wait_s_max = 2.0
connect_timeout_s = 2
slow_consumer_log_interval_s = 5.0

_SUBSCRIPTION_REFUSED = re.compile(r'permissions violation for subscription to "([^"]*)"', re.IGNORECASE)
"""The server's `-ERR` for a refused SUB, as nats-py hands it on (lower-cased)."""


_LOGIN_REFUSED = re.compile(r"authorization violation", re.IGNORECASE)
"""What the server answers a CONNECT whose credentials it refuses, as nats-py hands it on (not
"Authentication Timeout": a CONNECT that came late, say on a busy machine, is worth retrying)."""


class SubscriptionRefused(Exception):
    """The server does not let this connection's user subscribe where it must: a setting to fix."""


class LoginRefused(Exception):
    """The server refused this connection's credentials at its first connect: a setting to fix."""


class MeshClient(Client):
    """nats-py's client, parsing with `MessageParser`, and with a `flush` that means what NATS
    says it means: every command written before it has reached the server when it returns.

    nats-py 2.16 writes a flush's PING straight to the socket, ahead of the commands still
    queued for its flusher task, such as the SUB just made: the server answers the PONG before
    it has seen the SUB. Measured: a message published from another connection right after
    `subscribe(); flush()` was lost 239 times in 2,000 (tests/test_bus.py), and a refused SUB's
    `-ERR` could come after the flush had returned. Here the PING queues behind them, as
    nats-py's Tornado client has done since 2017 (nats-io/nats.py2#24).

    It also keeps what its error callback (`connect`) learns: messages dropped per
    subscription, and the subjects the server refused it."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = MessageParser(self)
        self.dropped: Counter[int] = Counter()
        """Messages dropped per subscription id because its pending queue was full."""
        self.refused: set[str] = set()
        """Subjects the server refused this connection a subscription to (lower-cased)."""

    async def _send_ping(self, future: asyncio.Future | None = None) -> None:
        self._pongs.append(future if future is not None else asyncio.get_running_loop().create_future())
        await self._send_command(PING_PROTO)
        await self._flush_pending()


CREDENTIALS = ("NATS_CREDS", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN")
CLIENT_INBOX = "_INBOX"
"""nats-py's inbox prefix, which clients keep."""
MESH_INBOX = "_MESH_INBOX"
"""Where a mesh process gets its replies: `_MESH_INBOX.<service>.>`, outside the clients'
`_INBOX.>`, so that neither a client nor another service may read them (accounts.conf)."""


@dataclass(frozen=True)
class Settings:
    servers: list[str]
    creds: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    inbox_prefix: str = CLIENT_INBOX

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, service: str | None = None) -> Settings:
        """`service`'s own credentials (`NATS_USER_LEDGER`, `NATS_PASSWORD_LEDGER`, ...), when any
        is set, replace the shared ones (`NATS_USER`, ...) as a whole: each service can have a
        NATS user allowed only what it does (deploy/nats/accounts.conf). A service's replies
        come to an inbox of its own, `_MESH_INBOX.<service>`."""
        env = dict(os.environ if env is None else env)
        urls = env.get("NATS_URL") or DEFAULT_URL
        own = [f"{name}_{service.upper()}" for name in CREDENTIALS] if service else []
        names = own if any(env.get(name) for name in own) else list(CREDENTIALS)
        creds, user, password, token = (env.get(name) or None for name in names)
        return cls(
            servers=[url.strip() for url in urls.split(",") if url.strip()],
            creds=creds,
            user=user,
            password=password,
            token=token,
            tls_ca=env.get("NATS_TLS_CA") or None,
            tls_cert=env.get("NATS_TLS_CERT") or None,
            tls_key=env.get("NATS_TLS_KEY") or None,
            inbox_prefix=f"{MESH_INBOX}.{service}" if service else CLIENT_INBOX,
        )

    def client_options(self) -> dict:
        """nats-py `connect` options for who this is and how it talks: credentials, TLS, inbox."""
        options: dict = {"tls": self.tls_context(), "inbox_prefix": self.inbox_prefix}
        if self.creds:
            options["user_credentials"] = self.creds
        if self.user:
            options["user"], options["password"] = self.user, self.password
        if self.token:
            options["token"] = self.token
        return options

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def without_secrets(urls: str) -> str:
    """NATS URLs as they may be logged or said: any `user:password@` hidden."""
    return re.sub(r"//[^/@,]*@", "//***@", urls)


async def connect(
    settings: Settings, name: str, on_subscription_refused: Callable[[], object] | None = None
) -> MeshClient:
    """Connect, reconnecting forever; each process waits its own random 0.5-2 s between attempts.

    nats-py has no jitter option, so the spread comes from drawing the fixed wait per client:
    after a server restart the mesh's clients come back spread out, not as one herd.
    `on_subscription_refused` is called each time the server refuses or takes away one of the
    connection's subscriptions: at a SUB, or at a reload of its permissions (it then sends the
    same `-ERR` and drops the subscription).

    Credentials any server of the list refuses at the first connect raise `LoginRefused` at once: nats-py
    would try them again forever, and the process would hang unready, saying only
    "Authorization Violation" every 1.5 s. Once connected, a refusal at a reconnect (a password
    changed on the server) is retried like any other failure.
    """
    nc = MeshClient()
    last_logged: dict[str, float] = {}
    login_refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            nc.dropped[exc.sid] += 1
            now = time.monotonic()
            if now - last_logged.get(exc.subject, 0.0) >= slow_consumer_log_interval_s:
                last_logged[exc.subject] = now
                log.warning("slow consumer: dropping messages on %s (%d so far)", exc.subject, nc.dropped[exc.sid])
            return
        if match := _SUBSCRIPTION_REFUSED.search(str(exc)):
            nc.refused.add(match[1].lower())
            if on_subscription_refused is not None:
                on_subscription_refused()
        elif not login_refused.done() and _LOGIN_REFUSED.search(str(exc)):
            login_refused.set_result(exc)
            return  # said by `LoginRefused`
        log.error("nats error: %r", exc)

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats disconnected")

    async def on_reconnected() -> None:
        log.warning("nats reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    async def on_closed() -> None:
        log.info("nats connection closed")

    options: dict = {
        "servers": settings.servers,
        "name": name,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "closed_cb": on_closed,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": random.uniform(reconnect_wait_s_min, reconnect_wait_s_max),
        "connect_timeout": connect_timeout_s,
        **settings.client_options(),
    }
    connecting = asyncio.ensure_future(nc.connect(**options))
    try:
        await asyncio.wait({connecting, login_refused}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        connecting.cancel()  # refused, or the caller cancelled: nothing left trying
        with contextlib.suppress(asyncio.CancelledError):
            await connecting  # connected: its own outcome; refused: ended here
    if not connecting.cancelled():
        connecting.result()  # raises what the connect raised
        login_refused.cancel()  # later refusals (at a reconnect) are only logged
        return nc
    await nc.close()
    who = f"user {settings.user!r}" if settings.user else "these credentials"
    raise LoginRefused(
        f"the NATS server at {without_secrets(','.join(settings.servers))} refused {who}: {login_refused.result()}"
    )


async def require_subscriptions(nc: MeshClient, subjects: Iterable[str]) -> None:
    """`SubscriptionRefused` if the server refused any of these subscriptions, made before this
    call: it answers a SUB it refuses with `-ERR` before the PONG that ends the flush (which, on a
    `MeshClient`, goes out after the SUBs). Without it
    a service whose user may not read its subjects would run, say it serves, and answer nothing."""
    await nc.flush()
    refused = sorted(subject for subject in subjects if subject.lower() in nc.refused)
    if refused:
        raise subscription_refused(nc, refused)


def subscription_refused(nc: Client, subjects: list[str]) -> SubscriptionRefused:
    user = nc.options.get("user")
    return SubscriptionRefused(
        f"the NATS server does not let {f'user {user!r}' if user else 'this connection'} subscribe to "
        f"{', '.join(subjects)}: each service needs its own user, which may (deploy/nats/accounts.conf)"
    )
