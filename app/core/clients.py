"""Who the client is behind a proxy: the address rate limits, upload caps and the access log use.

``FORWARDED_ALLOW_IPS`` names the peers whose ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are
believed: a comma-separated list of addresses or networks (default ``127.0.0.1``), or ``*`` for
any peer (Heroku, where only the router can reach a dyno).

A proxy *appends* the address it saw to ``X-Forwarded-For``; everything to the left of that was
written by the client and proves nothing. So the client is found from the right: entries that are
themselves trusted proxies are skipped, and the first other one is the client. With ``*`` every
peer is a proxy that appended exactly one entry, and the client is the rightmost entry. An entry
that is not an IP address is never used: the peer's own address stands instead.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:51234"
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class TrustedProxies:
    any_peer: bool
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, setting: str) -> TrustedProxies:
        items = [item.strip() for item in setting.split(",") if item.strip()]
        if "*" in items:
            return cls(True, ())
        networks = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"FORWARDED_ALLOW_IPS: {item!r} is not an address or a network") from None
        return cls(False, tuple(networks))

    def trusts(self, host: str | None) -> bool:
        if self.any_peer:
            return True
        address = _address(host) if host else None
        return address is not None and any(address in net for net in self.networks)

    def client(self, peer: str | None, forwarded_for: list[bytes]) -> str | None:
        """The client's address for a request from ``peer`` carrying these ``X-Forwarded-For``
        header values (in order); ``peer`` itself when it is not a trusted proxy."""
        if not forwarded_for or not self.trusts(peer):
            return peer
        entries = b",".join(forwarded_for).decode("latin-1").split(",")
        if self.any_peer:
            address = _address(entries[-1])
            return str(address) if address is not None else peer
        for entry in reversed(entries):
            address = _address(entry)
            if address is None:
                return peer
            if not any(address in net for net in self.networks):
                return str(address)
        address = _address(entries[0])  # every hop a trusted proxy: the first one
        return str(address) if address is not None else peer

    def scheme(self, peer: str | None, forwarded_proto: bytes | None, default: str) -> str:
        """``X-Forwarded-Proto`` from a trusted proxy (its rightmost value), else ``default``."""
        if forwarded_proto is None or not self.trusts(peer):
            return default
        value = forwarded_proto.decode("latin-1").split(",")[-1].strip().lower()
        return value if value in ("http", "https") else default
