"""LDAP authentication (``clients.ldap``) with bonsai's asyncio client.

Owns parsing the ``clients.ldap`` section, binding as the user (the username escaped into the
DN template), searching the user's groups (the username escaped into each filter), mapping
groups to ACL segments and secure topics, and the per-credential cache. Every LDAP call is
bounded by a timeout; an unreachable directory makes authentication fail closed (logged) while
the daemon keeps serving. bonsai is imported only when this module is used.

``acl`` (and ``publish_topics``) keys name the entries the membership searches find, two ways:

* a DN (``"cn=syadmins,ou=teams,dc=example,dc=org"``, 0.7.4's keys): matched against the DN of
  each entry found, compared as DNs (the case of attribute names and values, and the spaces
  around ``,``, ``=`` and ``+``, do not matter);
* a plain name (``committers``): matched against the entries' ``group_attribute`` (``cn``).

Values take both shapes seen in 0.7.4: ``group: [topics]`` (its sample config; one segment) and
``group: {segment: [topics]}`` (what its code expected).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hub.router import Acl
from plugins.credcache import CredentialCache, Lookup
from server.auth import Principal
from server.config import Section
from server.errors import ConfigError

__all__ = ["LdapAuthenticator", "LdapConfig", "LdapPrincipal", "dn_key", "parse_ldap"]

logger = logging.getLogger(__name__)

#: seconds one authentication (connect, bind, searches) may take before it fails closed
DEFAULT_TIMEOUT = 5.0
#: seconds a (user, password) answer is reused; 0 disables the cache
DEFAULT_CACHE_TTL = 300.0
#: refusals are kept shorter: a password just set in LDAP should work soon
DEFAULT_NEGATIVE_TTL = 30.0
#: LDAP connections open at once; more logins wait (bounded load on the directory)
DEFAULT_MAX_CONNECTIONS = 16
#: longest username passed to LDAP (anything longer is refused before any LDAP call)
MAX_USERNAME = 256


@dataclass(frozen=True, slots=True)
class LdapPrincipal(Principal):
    """A principal vouched for by LDAP (with the groups that gave it its rights)."""

    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class LdapConfig:
    uri: str
    #: DN template, ``%s`` = the username (escaped as an attribute value)
    user_dn: str
    #: search base for group look-ups
    base_scope: str
    #: filter templates, ``%s`` = the username (escaped for a filter)
    membership_patterns: tuple[str, ...]
    #: group (a DN, or a ``group_attribute`` value) → the segments it grants
    acl: Mapping[str, Acl]
    #: group → the secure topics it may publish (0.7.4 could never grant these over LDAP)
    publish_topics: Mapping[str, frozenset[str]] = field(default_factory=dict)
    group_attribute: str = "cn"
    timeout: float = DEFAULT_TIMEOUT
    cache_ttl: float = DEFAULT_CACHE_TTL
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    max_connections: int = DEFAULT_MAX_CONNECTIONS


def _template(sec: Section, name: str, value: str | None) -> str:
    if not value:
        sec.report(name, "is required")
    elif value.count("%s") != 1:
        sec.report(name, f"must contain %s exactly once (the username), got {value!r}")
    return value or ""


def _group_acl(sec: Section, group: str) -> Acl:
    v = sec.raw(group)
    if isinstance(v, list):  # group: [topics] — one segment named after the group
        return frozenset({frozenset(sec.strings(group))})
    if isinstance(v, Mapping):  # group: {segment: [topics]}
        segs = sec.section(group)
        out = set()
        for seg in list(segs.data):
            if not isinstance(segs.raw(str(seg), []), list):
                segs.report(str(seg), "expected a list of topics")
                continue
            out.add(frozenset(segs.strings(str(seg))))
        return frozenset(out)
    sec.report(group, "expected a list of topics or a mapping of segment to topics")
    return frozenset()


def _patterns(sec: Section) -> tuple[str, ...]:
    """``membership_patterns``: filter templates.

    0.7.4's sample config writes its first pattern with a stray trailing ``:``, which YAML reads
    as a one-key mapping with no value; that is read as the pattern it was meant to be (warned).
    """
    raw = sec.raw("membership_patterns")
    if isinstance(raw, list):
        fixed: list[object] = []
        for i, v in enumerate(raw):
            if isinstance(v, Mapping) and len(v) == 1 and next(iter(v.values())) is None:
                key = str(next(iter(v)))
                logger.warning("%s: %s[%d]: read as %r (a trailing ':' made it a mapping)",
                               sec.file, sec.key("membership_patterns"), i, key)
                v = key
            fixed.append(v)
        return Section({"membership_patterns": fixed}, sec.file, sec.prefix).strings(
            "membership_patterns")
    return sec.strings("membership_patterns")


def parse_ldap(sec: Section) -> LdapConfig:
    """Validate ``clients.ldap``. Raises ConfigError naming the file and key (or, for a collecting
    section, records every error there)."""
    uri = sec.string("uri") or ""
    if not uri.lower().startswith(("ldap://", "ldaps://", "ldapi://")):
        sec.report("uri", f"must be an ldap://, ldaps:// or ldapi:// URI, got {uri!r}")
    base = sec.string("base_scope") or ""
    if not base:
        sec.report("base_scope", "is required (the search base for groups)")
    patterns = _patterns(sec)
    for i, p in enumerate(patterns):
        _template(sec, f"membership_patterns[{i}]", p)
    acl_sec = sec.section("acl")
    acl = {str(g): _group_acl(acl_sec, str(g)) for g in list(acl_sec.data)}
    pub_sec = sec.section("publish_topics")
    publish = {str(g): frozenset(pub_sec.strings(str(g))) for g in list(pub_sec.data)}
    ttl = sec.duration("cache_ttl", DEFAULT_CACHE_TTL)
    cfg = LdapConfig(
        uri=uri,
        user_dn=_template(sec, "user_dn", sec.string("user_dn")),
        base_scope=base,
        membership_patterns=patterns,
        acl=acl,
        publish_topics=publish,
        group_attribute=sec.string("group_attribute", "cn") or "cn",
        timeout=sec.duration("timeout", DEFAULT_TIMEOUT),
        cache_ttl=ttl,
        negative_ttl=min(ttl, sec.duration("negative_ttl", DEFAULT_NEGATIVE_TTL)),
        max_connections=sec.integer("max_connections", DEFAULT_MAX_CONNECTIONS, minimum=1),
    )
    if cfg.timeout <= 0:
        sec.report("timeout", "must be positive")
    if acl and not patterns:
        sec.report("membership_patterns", "is required when acl maps groups")
    sec.warn_unknown()
    return cfg


#: A DN compared as a DN: per RDN, its sorted (attribute type, value) pairs, case-folded.
DnKey = tuple[tuple[tuple[str, str], ...], ...]


#: spaces around an unescaped separator (``,`` ``=`` ``+``) of a DN, which carry no meaning
_SPACE_BEFORE = re.compile(r"(?<![\\\s])\s+(?=[,=+])")
_SPACE_AFTER = re.compile(r"(?<=[,=+])(?<!\\[,=+])\s+")


def dn_key(bonsai: Any, text: str) -> DnKey | None:
    """``text`` as a comparable DN, or None when it is not a DN (a plain group name).

    Attribute types and values are compared without case (the matching rule of the attributes
    DNs are made of: cn, ou, dc, uid, o) and without the spaces around separators.
    """
    if "=" not in text:
        return None
    tight = _SPACE_AFTER.sub("", _SPACE_BEFORE.sub("", text.strip()))
    try:
        rdns = bonsai.LDAPDN(tight).rdns
    except (bonsai.InvalidDN, ValueError):
        return None
    return tuple(tuple(sorted((t.strip().lower(), v.strip().lower()) for t, v in rdn))
                 for rdn in rdns)


class LdapAuthenticator:
    """Bind as the user, read its groups, map them to rights; cached per (user, password)."""

    def __init__(self, cfg: LdapConfig) -> None:
        import bonsai  # only when LDAP is configured

        self.cfg = cfg
        self._bonsai: Any = bonsai
        # acl/publish_topics keys that are DNs, by their normalised form; the rest by name
        self._dn_acl: dict[DnKey, Acl] = {}
        self._dn_topics: dict[DnKey, frozenset[str]] = {}
        for name, acl in cfg.acl.items():
            key = dn_key(bonsai, name)
            if key is not None:  # two spellings of one DN: their rights add up
                self._dn_acl[key] = self._dn_acl.get(key, frozenset()) | acl
        for name, topics in cfg.publish_topics.items():
            key = dn_key(bonsai, name)
            if key is not None:
                self._dn_topics[key] = self._dn_topics.get(key, frozenset()) | topics
        self.cache = CredentialCache(cfg.cache_ttl, cfg.negative_ttl, name="ldap")
        self._slots = asyncio.Semaphore(cfg.max_connections)
        #: bind attempts made (the cache's effect is measured with this)
        self.binds = 0
        self.failures = 0

    def stats(self) -> dict[str, float | dict[str, float]]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"ldap_binds_total": self.binds, "ldap_failures_total": self.failures,
                **self.cache.stats()}

    def user_dn(self, username: str) -> str:
        return self.cfg.user_dn.replace("%s", self._bonsai.escape_attribute_value(username))

    def filters(self, username: str) -> list[str]:
        esc = self._bonsai.escape_filter_exp(username)
        return [p.replace("%s", esc) for p in self.cfg.membership_patterns]

    async def authenticate(self, username: str, password: str) -> LdapPrincipal | None:
        # an empty password is an anonymous bind, which many servers accept: refuse it here
        if not password or not username or len(username) > MAX_USERNAME or "\0" in username:
            return None
        p = await self.cache.get(username, password, lambda: self._lookup(username, password))
        return p if isinstance(p, LdapPrincipal) else None

    async def _lookup(self, username: str, password: str) -> Lookup:
        bonsai = self._bonsai
        # bonsai bounds each operation itself (connect+bind, each search): its timeouts clean up
        # after themselves, while cancelling a bonsai call leaves a reader behind. The outer
        # bound is only a backstop in case bonsai does not honour its own.
        backstop = self.cfg.timeout * (2 + len(self.cfg.membership_patterns))
        try:
            async with self._slots:
                groups = await asyncio.wait_for(self._groups(username, password), backstop)
        except bonsai.AuthenticationError:
            logger.info("LDAP: wrong credentials for %r", username)
            return None, True
        except (TimeoutError, bonsai.LDAPError, OSError) as e:
            self.failures += 1
            logger.warning("LDAP: cannot authenticate %r, refusing (fail closed): %s: %s",
                           username, type(e).__name__, e or "timed out")
            return None, False
        return self.principal(username, groups), True

    async def _groups(self, username: str, password: str) -> frozenset[str]:
        """The DNs and ``group_attribute`` values of the entries the membership searches find."""
        bonsai = self._bonsai
        cfg = self.cfg
        client = bonsai.LDAPClient(cfg.uri)
        client.set_credentials("SIMPLE", user=self.user_dn(username), password=password)
        self.binds += 1
        found: set[str] = set()
        conn = client.connect(is_async=True, timeout=cfg.timeout)  # not yet open
        try:
            await conn  # connect and bind
            for flt in self.filters(username):
                res = await conn.search(cfg.base_scope, bonsai.LDAPSearchScope.SUBTREE, flt,
                                        attrlist=[cfg.group_attribute], timeout=cfg.timeout)
                for entry in res:
                    found.add(str(entry.dn))  # what 0.7.4 mapped by
                    found.update(str(v) for v in entry.get(cfg.group_attribute) or ())
        finally:
            conn.close()
        return frozenset(found)

    def principal(self, username: str, groups: frozenset[str]) -> LdapPrincipal:
        """The rights of ``groups`` (entry DNs and names, as :meth:`_groups` found them)."""
        cfg = self.cfg
        acl: set[frozenset[str]] = set()
        topics: set[str] = set()
        for g in groups:
            acl.update(cfg.acl.get(g, ()))
            topics.update(cfg.publish_topics.get(g, ()))
            key = dn_key(self._bonsai, g)
            if key is not None:
                acl.update(self._dn_acl.get(key, ()))
                topics.update(self._dn_topics.get(key, ()))
        return LdapPrincipal(user=username, acl=frozenset(acl), publish_topics=frozenset(topics),
                             groups=groups)

    async def close(self) -> None:
        # look-ups are bounded by the timeout and bonsai copes badly with cancellation: let
        # them end on their own first (a connect + bind at most, at shutdown)
        await self.cache.close(grace=self.cfg.timeout)


def build_ldap(sec: Section) -> LdapAuthenticator:
    """The authenticator for a ``clients.ldap`` section (ConfigError when it is invalid)."""
    cfg = parse_ldap(sec)
    try:
        return LdapAuthenticator(cfg)
    except ImportError as e:
        raise ConfigError(sec.file, sec.prefix, f"LDAP is configured but bonsai is missing: {e}") from None
