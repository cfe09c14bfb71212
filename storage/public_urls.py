"""The public-host rule for every URL fetched on someone else's behalf: the images a downloaded image
list names (storage/listed_urls.py) and the URL a visitor gives the captioner's page (pipeline/app.py).

Such a URL may reach public internet hosts only: not loopback, private, link-local, carrier-grade
NAT, unspecified, reserved or multicast addresses (cloud metadata services included), whether the host
is written as an address or is a name that resolves to one; `localhost` and `*.localhost` always count
as loopback. A name is judged by every address it resolves to, and the connection is then made to one
of those very addresses: `PublicHostTransport` resolves inside the connection itself (an httpcore
network backend), so a DNS server that answers a public address to a check and a private one a moment
later (DNS rebinding) cannot swap it. The URL, the Host header and the TLS server name (SNI and
certificate check) stay the name's. Every request goes through the transport, so each redirect hop
is judged when it connects. A refused address is refused before any connection is opened, so
nothing a private address would answer (refused, 404, 403) can be told apart.

`allowed` names (host, port) pairs reachable whatever their address (an image list's own origin);
`private_allowed` lifts the rule (`ituning app --allow-private-urls` on the user's own machine).
`resolver` is how names become addresses: the system's by default (tests give a table of their own).
"""

import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable

import httpcore
import httpx

from storage.downloads import DownloadError

Resolver = Callable[[str], list[str]]  # a host name -> its addresses, as text
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own defaults


class NotPublicAddress(DownloadError):
    """A host whose address the rule does not allow; nothing was sent to it."""


class UnresolvedHost(DownloadError):
    """A host name that does not resolve to any address."""


def system_resolver(host: str) -> list[str]:
    """The addresses the system's resolver gives for `host`, in its order of preference."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise UnresolvedHost(f"cannot resolve {host} ({error})") from error
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_loopback_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def is_public_address(address: str) -> bool:
    parsed = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone id ("fe80::1%eth0") is not part of it
    plain = getattr(parsed, "ipv4_mapped", None) or parsed
    return plain.is_global and not plain.is_multicast


class PublicHosts:
    """The rule above, for one fetch or one download of many."""

    def __init__(self, resolver: Resolver | None = None, allowed: Iterable[tuple[str, int]] = (),
                 private_allowed: bool = False):
        self.resolver = resolver or system_resolver
        self.allowed = {(host.lower().rstrip("."), port) for host, port in allowed}
        self.private_allowed = private_allowed

    def host_refusal(self, host: str, port: int | None = None) -> str | None:
        """Why `host` may not be reached, or None when it may; UnresolvedHost when a name does not resolve."""
        try:
            self.addresses(host, port)
        except NotPublicAddress as refusal:
            return str(refusal)
        return None

    def addresses(self, host: str, port: int | None = None) -> list[str]:
        """The addresses to connect to for `host`, every one of them judged; NotPublicAddress when any
        is refused (a name answering both a public and a private address is refused)."""
        host = host.lower().rstrip(".").strip("[]")
        trusted = self.private_allowed or (host, port) in self.allowed
        if is_loopback_name(host) and not trusted:
            raise NotPublicAddress(f"{host} is a loopback host")
        try:
            found = [str(ipaddress.ip_address(host.split("%")[0]))]
        except ValueError:
            found = self.resolver(host)
        if not found:
            raise UnresolvedHost(f"cannot resolve {host}")
        for address in found if not trusted else ():
            if not is_public_address(address):
                raise NotPublicAddress(f"{host} is not a public address ({address})")
        return found

    def transport(self, **options) -> httpx.HTTPTransport:
        return PublicHostTransport(self, **options)


class _CheckedBackend(httpcore.NetworkBackend):
    """Connects to the checked addresses of a host, never to a second resolution of its name."""

    def __init__(self, rule: PublicHosts):
        self.rule = rule
        self.plain = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            addresses = self.rule.addresses(host, port)
        except UnresolvedHost as error:  # as httpx reports it (a download retries it)
            raise httpcore.ConnectError(str(error)) from error
        failure = None
        for address in addresses:
            try:
                return self.plain.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:  # the next address, as browsers do
                failure = error
        raise failure

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise NotPublicAddress("a Unix socket is not a public host")

    def sleep(self, seconds: float) -> None:
        self.plain.sleep(seconds)


class PublicHostTransport(httpx.HTTPTransport):
    """httpx's own transport whose connections go through the rule; no proxy (a proxy would connect
    on the rule's behalf to hosts it never saw)."""

    def __init__(self, rule: PublicHosts, verify: ssl.SSLContext | bool = True, limits: httpx.Limits = DEFAULT_LIMITS):
        super().__init__(verify=verify, limits=limits, trust_env=False)
        # httpx's transport takes no network backend: its pool is built again with ours, same settings.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections, max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=_CheckedBackend(rule))
