"""The one public-host rule (storage/public_urls.py) as a fetch meets it: real HTTP and HTTPS servers on
127.0.0.1, a URL that names them by a host name.

This machine reaches no internet host, so these tests give the rule a resolver of their own: a table
of names (photos.example ...) to addresses, used here only. "photos.example" stands for a public host
by being named in `allowed`; its table address is 127.0.0.1, where the test's server listens. No DNS
server knows these names, so a fetch that succeeds can only have connected to the address the rule
resolved and judged, never to a second resolution of the name.
"""

import datetime
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from pipeline.image_urls import ImageFetchError, fetch_image
from storage.public_urls import NotPublicAddress, PublicHosts, UnresolvedHost

PUBLIC = "93.184.215.14"  # a global unicast address; nothing is fetched from it


def mapping_resolver(addresses: dict[str, str]):
    """The test's resolver: answers from a fixed {name: address} table; other names do not resolve."""
    def resolve(host: str) -> list[str]:
        if host not in addresses:
            raise UnresolvedHost(f"cannot resolve {host} (not in the table)")
        return [addresses[host]]
    return resolve


class _Recording(BaseHTTPRequestHandler):
    """Answers /moved with a redirect to the server's `target`, any other path with a few bytes;
    records (path, Host header) of every request."""

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Host")))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", self.server.target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"image")

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """Starts recording servers on 127.0.0.1 (HTTPS with `context`); stops them after the test."""
    servers = []

    def start(target: str = "", context: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
        server.seen, server.target = [], target
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def port(server) -> int:
    return server.server_address[1]


def test_a_name_is_fetched_from_the_address_judged_with_its_own_host_header(serve, tmp_path):
    photos = serve()
    hosts = PublicHosts(mapping_resolver({"photos.example": "127.0.0.1"}), allowed=[("photos.example", port(photos))])
    fetched = fetch_image(f"http://photos.example:{port(photos)}/cat.jpg", tmp_path / "cat.jpg", hosts=hosts)
    assert fetched.read_bytes() == b"image"
    assert photos.seen == [("/cat.jpg", f"photos.example:{port(photos)}")]


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/secret", "http://intranet.example:{port}/secret",
                                    "http://localhost:{port}/secret", "http://169.254.169.254/latest/meta-data/"])
def test_a_redirect_from_a_public_name_to_a_private_address_is_refused_before_connecting(serve, tmp_path, target):
    internal = serve()
    photos = serve(target=target.format(port=port(internal)))
    resolver = mapping_resolver({"photos.example": "127.0.0.1", "intranet.example": "10.0.0.5"})
    hosts = PublicHosts(resolver, allowed=[("photos.example", port(photos))])
    with pytest.raises(ImageFetchError) as refused:
        fetch_image(f"http://photos.example:{port(photos)}/moved", tmp_path / "image", hosts=hosts)
    assert refused.value.reason == "not a public address"
    assert photos.seen == [("/moved", f"photos.example:{port(photos)}")] and internal.seen == []
    assert not (tmp_path / "image").exists()


def test_a_name_that_rebinds_to_loopback_after_the_check_is_refused_at_the_connection(serve, tmp_path):
    """A DNS server answering a public address first and 127.0.0.1 after: the connection judges its own answer."""
    internal = serve()
    answers = iter([PUBLIC, "127.0.0.1"])
    hosts = PublicHosts(lambda host: [next(answers)])
    assert hosts.host_refusal("rebind.example") is None  # the first answer: public
    with pytest.raises(ImageFetchError) as refused:
        fetch_image(f"http://rebind.example:{port(internal)}/secret", tmp_path / "image", hosts=hosts)
    assert refused.value.reason == "not a public address" and internal.seen == []


def test_a_name_with_one_private_address_among_public_ones_is_refused():
    hosts = PublicHosts(lambda host: [PUBLIC, "192.168.1.4"])
    with pytest.raises(NotPublicAddress, match="192.168.1.4"):
        hosts.addresses("mixed.example", 80)
    assert PublicHosts(lambda host: [PUBLIC]).addresses("cdn.example", 443) == [PUBLIC]


def test_the_command_lines_own_fetch_reaches_loopback(serve, tmp_path):
    local = serve()
    assert fetch_image(f"http://127.0.0.1:{port(local)}/a.jpg", tmp_path / "a.jpg").read_bytes() == b"image"


def _certificate_for(name: str, folder) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the server's context, a client context trusting it) for a self-signed certificate of `name`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return server, ssl.create_default_context(cafile=str(folder / "cert.pem"))


def test_https_checks_the_certificate_against_the_name_while_connecting_to_the_judged_address(serve, tmp_path):
    server_context, trusting = _certificate_for("photos.example", tmp_path)
    photos = serve(context=server_context)
    resolver = mapping_resolver({"photos.example": "127.0.0.1", "other.example": "127.0.0.1"})
    hosts = PublicHosts(resolver, allowed=[("photos.example", port(photos)), ("other.example", port(photos))])
    with httpx.Client(transport=hosts.transport(verify=trusting)) as client:
        assert client.get(f"https://photos.example:{port(photos)}/cat.jpg").content == b"image"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|match"):
            client.get(f"https://other.example:{port(photos)}/cat.jpg")  # the same address, another name
    assert photos.seen == [("/cat.jpg", f"photos.example:{port(photos)}")]
