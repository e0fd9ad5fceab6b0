"""The one guarded fetcher for media a caller names by URL (images of vision chat, audio of the
gateway dialects' speech to text).

A URL in a request makes the server open a connection on the caller's behalf, so every fetch
is vetted: `data:` URIs are decoded locally (the expected media types only, size-capped); otherwise
only http(s) is fetched, and only from public addresses unless `fetch_allow_private` is set.

DNS rebinding: the host is resolved once here, every address it resolves to is vetted, and
the connection goes to the vetted address itself (the URL's host is swapped for the IP, with
the original name kept in the Host header and as the TLS SNI / certificate name), so a second
lookup that answers differently is never made. Redirects are followed by hand, at most
`MAX_REDIRECTS`, each target vetted the same way. Proxies from the environment are ignored
(`trust_env=False`): a proxy would connect on our behalf to an address we never vetted.
The body is streamed and cut off at `fetch_max_bytes`; the whole fetch, DNS and redirects
included, must finish within `fetch_timeout_s`. Every refusal is a 400 naming the field.

`vet_media_url` is what can be checked without connecting anywhere (the scheme, the host and
every address it resolves to, a data: URI's type and size); callers run it before they look the
model up, so a bad URL is refused even when the model is missing, and fetch only afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import httpx

from engine.core.errors import InvalidRequestError
from engine.core.settings import Settings

MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Well-known NAT64 prefixes (RFC 6052, RFC 8215): they embed an IPv4 address in the low bits.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


@dataclass(frozen=True)
class MediaKind:
    """What a fetch accepts: media-type prefixes (of the data: URI or the Content-Type)."""

    name: str  # "image", "audio": for messages
    noun: str  # "an image", "audio"
    prefixes: tuple[str, ...]
    examples: str  # shown in refusals


IMAGE = MediaKind("image", "an image", ("image/",), "an image/* type (image/png, image/jpeg, ...)")
# Audio often comes as a video container (webm, mp4) or application/ogg; PyAV decodes them all.
AUDIO = MediaKind("audio", "audio", ("audio/", "video/", "application/ogg"),
                  "an audio/* type (audio/mpeg, audio/wav, ...)")


def _translated_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address packets to `ip` really go to: IPv4-mapped (::ffff:a.b.c.d) and NAT64
    addresses. These sit in ranges Python calls reserved, so they are judged by it alone."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _tunnelled_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 endpoint of a 6to4 or Teredo address; judged together with the IPv6 one."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo is not None else None


def address_refusal(ip: IPAddress) -> str | None:
    """Why a connection to `ip` is refused (e.g. 'a loopback address'), or None if it is a
    public unicast address. IPv6 addresses that carry an IPv4 one are judged by it too."""
    if isinstance(ip, ipaddress.IPv6Address):
        if (target := _translated_ipv4(ip)) is not None:
            reason = address_refusal(target)
            return None if reason is None else f"{reason} (as {ip})"
        if (endpoint := _tunnelled_ipv4(ip)) is not None and (
            reason := address_refusal(endpoint)
        ):
            return f"{reason} (inside {ip})"
    checks = [
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "an address that is not publicly routable"),
    ]
    return next((reason for failed, reason in checks if failed), None)


def decode_data_uri(url: str, param: str, max_bytes: int, kind: MediaKind = IMAGE) -> bytes:
    """The bytes of a `data:image/...;base64,...` URI (percent-encoded data also accepted)."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise InvalidRequestError("the data URI has no ',' before its data", param=param)
    media_type, *attributes = header.split(";")
    if not media_type.strip().lower().startswith(kind.prefixes):
        raise InvalidRequestError(
            f"the data URI's media type is {media_type or 'missing'!r}; {kind.examples} "
            "is required",
            param=param,
        )
    is_base64 = "base64" in (a.strip().lower() for a in attributes)
    # Check the size before decoding: base64 takes 4 characters per 3 bytes.
    estimated = len(payload) * 3 // 4 if is_base64 else len(payload)
    if estimated > max_bytes:
        raise InvalidRequestError(
            f"the data URI holds about {estimated} bytes; the limit is {max_bytes} bytes",
            param=param,
        )
    if not is_base64:
        data = unquote_to_bytes(payload)
    else:
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequestError(f"the data URI is not valid base64: {exc}",
                                      param=param) from exc
    if not data:
        raise InvalidRequestError("the data URI holds no data", param=param)
    if len(data) > max_bytes:
        raise InvalidRequestError(
            f"the {kind.name} is {len(data)} bytes; the limit is {max_bytes} bytes", param=param
        )
    return data


async def _resolve(host: str, port: int | None, param: str) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidRequestError(f"cannot resolve the host {host!r}: {exc}", param=param) from exc
    # sockaddr[0] may carry an IPv6 scope ("fe80::1%eth0"); the scope does not change what
    # kind of address it is.
    addresses = list(dict.fromkeys(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos
    ))
    if not addresses:
        raise InvalidRequestError(f"the host {host!r} has no address", param=param)
    return addresses


async def vetted_address(url: httpx.URL, param: str, allow_private: bool,
                         kind: MediaKind = IMAGE) -> str:
    """Resolve the URL's host (without blocking the loop) and return an address to connect
    to; refuse if any address it resolves to is not public (unless private ones are allowed)."""
    host = url.host
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await _resolve(host, url.port, param)
    if not allow_private:
        for address in addresses:
            if (reason := address_refusal(address)) is not None:
                shown = host if str(address) == host else f"{host!r} resolves to {address}, which"
                raise InvalidRequestError(
                    f"refusing to fetch {url}: {shown} is {reason}. {kind.name.capitalize()} "
                    "URLs must point at public addresses (a server operator can allow private "
                    "ones with the fetch_allow_private setting).",
                    param=param,
                )
    return str(addresses[0])


def _checked_url(raw: str | httpx.URL, param: str, kind: MediaKind = IMAGE) -> httpx.URL:
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"not a valid URL: {exc}", param=param) from exc
    if url.scheme not in ("http", "https"):
        raise InvalidRequestError(
            f"the {url.scheme!r} scheme is not fetched; an {kind.name} URL must be an http(s) URL "
            "or a data: URI",
            param=param,
        )
    if not url.host:
        raise InvalidRequestError(f"the {kind.name} URL has no host", param=param)
    if url.userinfo:
        raise InvalidRequestError(f"{kind.name} URLs with credentials are not fetched",
                                  param=param)
    return url


async def _get(
    client: httpx.AsyncClient, url: httpx.URL, param: str, settings: Settings, kind: MediaKind
) -> tuple[httpx.URL | None, bytes]:
    """One request to the vetted address: (redirect target, b"") or (None, body)."""
    address = await vetted_address(url, param, settings.fetch_allow_private, kind)
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    request = client.build_request(
        "GET", url.copy_with(host=address),
        headers={"Host": url.netloc.decode("ascii"), "Accept": f"{kind.name}/*",
                 "Accept-Encoding": "identity"},
        extensions=extensions,
    )
    response = await client.send(request, stream=True)
    try:
        if response.status_code in _REDIRECTS and "location" in response.headers:
            return url.join(response.headers["location"]), b""
        if response.status_code != 200:
            raise InvalidRequestError(
                f"fetching {url} answered HTTP {response.status_code}", param=param
            )
        media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if not media_type.startswith(kind.prefixes):
            raise InvalidRequestError(
                f"{url} is {media_type or 'of no stated type'}, not {kind.noun} "
                f"(its Content-Type must be {kind.examples})",
                param=param,
            )
        max_bytes = settings.fetch_max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise InvalidRequestError(
                f"{url} is {declared} bytes; the limit is {max_bytes} bytes", param=param
            )
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > max_bytes:
                raise InvalidRequestError(
                    f"{url} is larger than the limit of {max_bytes} bytes", param=param
                )
        if not body:
            raise InvalidRequestError(f"{url} returned no data", param=param)
        return None, bytes(body)
    finally:
        await response.aclose()


async def vet_media_url(url: str, settings: Settings, param: str,
                        kind: MediaKind = IMAGE) -> bytes | None:
    """Everything about a caller's media URL that is checked without a connection: a data: URI
    is decoded (its bytes returned); an http(s) URL has its scheme, host and credentials checked
    and its host resolved, every address vetted, and None is returned: `fetch_media` fetches it
    later, vetting again each address it really connects to. Raises InvalidRequestError."""
    if url[:5].lower() == "data:":
        return decode_data_uri(url, param, settings.fetch_max_bytes, kind)
    checked = _checked_url(url, param, kind)
    timeout_s = settings.fetch_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            await vetted_address(checked, param, settings.fetch_allow_private, kind)
    except TimeoutError as exc:
        raise InvalidRequestError(
            f"resolving the host of {url} took longer than {timeout_s:g}s", param=param
        ) from exc
    return None


async def fetch_image(url: str, settings: Settings, param: str = "url") -> bytes:
    """The bytes of the image at `url` (a data: URI or an http(s) URL), fetched under the
    rules in the module docstring. Raises InvalidRequestError (400) naming `param`."""
    return await fetch_media(url, settings, param, IMAGE)


async def fetch_media(url: str, settings: Settings, param: str, kind: MediaKind) -> bytes:
    """`fetch_image` for any media kind."""
    if url[:5].lower() == "data:":
        return decode_data_uri(url, param, settings.fetch_max_bytes, kind)
    current = _checked_url(url, param, kind)
    timeout_s = settings.fetch_timeout_s
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=timeout_s
        ) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target, body = await _get(client, current, param, settings, kind)
                if target is None:
                    return body
                current = _checked_url(target, param, kind)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise InvalidRequestError(
            f"fetching {url} took longer than {timeout_s:g}s", param=param
        ) from exc
    except httpx.HTTPError as exc:
        raise InvalidRequestError(
            f"fetching {url} failed: {type(exc).__name__}: {exc}", param=param
        ) from exc
    raise InvalidRequestError(
        f"fetching {url} was redirected more than {MAX_REDIRECTS} times", param=param
    )
