"""The ACL file (0.7.4's ``pypubsub_acl.yaml``): users, their passwords, segments and secure topics.

Owns parsing and validating the file, verifying passwords (argon2id, bcrypt, or plaintext with a
startup warning) in constant time, making an unknown user cost as much as a wrong password, and
hashing a password for the ``--hash-password`` command. The format, unchanged from 0.7.4::

    janedoe:
      password: "$argon2id$v=19$m=65536,t=3,p=4$..."   # or $2b$..., or plaintext
      acl:                      # segment name -> topics; a private event is visible when all
        secrets: [foo, bar]     # topics of one segment are among the event's topics
      topics: [deploys]         # secure topics this user may publish (clients.secure_topics)

Knows nothing of HTTP or of streams; reloading is driven by ``plugins.auth``.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from hub.router import Acl
from server.auth import Principal
from server.config import Section
from server.errors import ConfigError

__all__ = [
    "HASH_SCHEMES",
    "AclFile",
    "FileAuthenticator",
    "FilePrincipal",
    "FileUser",
    "hash_password",
    "hash_password_cli",
    "load_acl_file",
    "parse_acl",
    "verify_password",
]

logger = logging.getLogger(__name__)

HASH_SCHEMES = ("argon2id", "bcrypt")
ARGON2_PREFIX = "$argon2id$"
BCRYPT_PREFIXES = ("$2b$", "$2a$", "$2y$")
#: hash verifications allowed to run at once: argon2id's default costs 64 MiB per run, so an
#: unbounded number of concurrent logins could exhaust memory
MAX_CONCURRENT_VERIFY = max(2, os.cpu_count() or 2)
#: seconds a verified (user, password) is remembered: reconnect storms cost one hash each
VERIFIED_TTL = 300.0
#: verified pairs remembered at most (then forgotten all at once): bounded memory
VERIFIED_MAX = 10_000


def _scheme(stored: str) -> str:
    if stored.startswith(ARGON2_PREFIX):
        return "argon2id"
    if stored.startswith(BCRYPT_PREFIXES):
        return "bcrypt"
    return "plaintext"


def hash_password(password: str, scheme: str = "argon2id", *, cost: int | None = None) -> str:
    """A hash of ``password`` to store in the ACL file.

    ``cost``: argon2id time cost or bcrypt rounds; None = the library's recommended default.
    """
    if scheme == "argon2id":
        import argon2

        ph = argon2.PasswordHasher() if cost is None else argon2.PasswordHasher(time_cost=cost)
        return ph.hash(password)
    if scheme == "bcrypt":
        import bcrypt

        salt = bcrypt.gensalt() if cost is None else bcrypt.gensalt(rounds=cost)
        return bcrypt.hashpw(password.encode("utf-8"), salt).decode("ascii")
    raise ValueError(f"unknown hash scheme {scheme!r}; use one of {', '.join(HASH_SCHEMES)}")


def _plain_equal(stored: str, given: str) -> bool:
    # compare fixed-length digests: compare_digest leaks the length of unequal inputs
    a = hashlib.sha256(stored.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(a, b)


def verify_password(stored: str, given: str) -> bool:
    """True when ``given`` matches ``stored`` (a hash or plaintext). CPU-bound for hashes."""
    scheme = _scheme(stored)
    if scheme == "argon2id":
        import argon2

        try:
            return bool(argon2.PasswordHasher().verify(stored, given))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            logger.warning("an argon2id password hash in the ACL file is malformed")
            return False
    if scheme == "bcrypt":
        import bcrypt

        try:
            return bool(bcrypt.checkpw(given.encode("utf-8", "surrogatepass"), stored.encode("ascii")))
        except ValueError:
            logger.warning("a bcrypt password hash in the ACL file is malformed")
            return False
    return _plain_equal(stored, given)


def _decoy_hash(stored: list[str]) -> str:
    """A hash of a random password made like most of ``stored``: the cost of a wrong password.

    Verifying an unknown user against it takes as long as a known user with a wrong password.
    """
    shapes: Counter[str] = Counter()
    for h in stored:
        scheme = _scheme(h)
        if scheme == "argon2id":
            shapes[h.rsplit("$", 2)[0]] += 1  # "$argon2id$v=19$m=...,t=...,p=..."
        elif scheme == "bcrypt":
            shapes[h[:7]] += 1  # "$2b$12$"
        else:
            shapes["plaintext"] += 1
    if not shapes:
        return secrets.token_urlsafe(16)
    shape = shapes.most_common(1)[0][0]
    decoy = secrets.token_urlsafe(24)
    if shape.startswith(ARGON2_PREFIX):
        import argon2

        params = argon2.extract_parameters(next(h for h in stored if h.startswith(shape + "$")))
        return argon2.PasswordHasher.from_parameters(params).hash(decoy)
    if shape.startswith(BCRYPT_PREFIXES):
        return hash_password(decoy, "bcrypt", cost=int(shape[4:6]))
    return decoy


@dataclass(frozen=True, slots=True)
class FilePrincipal(Principal):
    """A principal vouched for by the ACL file (what a reload re-authorises)."""


@dataclass(frozen=True, slots=True)
class FileUser:
    name: str
    password: str
    acl: Acl
    topics: frozenset[str]

    @property
    def scheme(self) -> str:
        return _scheme(self.password)

    def principal(self) -> FilePrincipal:
        return FilePrincipal(user=self.name, acl=self.acl, publish_topics=self.topics)


@dataclass(frozen=True, slots=True)
class AclFile:
    """A parsed ACL file: its users and the decoy hash an unknown user is checked against."""

    path: str
    users: Mapping[str, FileUser]
    decoy: str

    @property
    def plaintext_users(self) -> list[str]:
        return sorted(u.name for u in self.users.values() if u.scheme == "plaintext")


def _segments(sec: Section, name: str) -> Acl:
    """``acl:`` — segment name → list of topics (an empty list sees every private event)."""
    acl = sec.section(name)
    out: set[frozenset[str]] = set()
    for seg in acl.data:
        v = acl.raw(str(seg))
        if v is None:
            v = []
        if not isinstance(v, list):
            raise acl.error(str(seg), f"expected a list of topics, got {v!r}")
        out.add(frozenset(acl.strings(str(seg))))
    return frozenset(out)


_BCRYPT_RE = re.compile(r"^\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}$")


def _check_hash(u: Section, password: str) -> None:
    """A password that looks like a hash must be a well-formed one (else nobody could log in)."""
    scheme = _scheme(password)
    if scheme == "argon2id":
        import argon2

        try:
            argon2.extract_parameters(password)
        except argon2.exceptions.InvalidHashError:
            raise u.error("password", "is a malformed argon2id hash") from None
    elif scheme == "bcrypt" and not _BCRYPT_RE.match(password):
        raise u.error("password", "is a malformed bcrypt hash")


def parse_acl(data: object, path: str) -> AclFile:
    """Validate a parsed ACL document. Raises ConfigError naming the file and the user's key.

    The decoy hash is made here (it can take a tenth of a second): call off the event loop.
    """
    top = Section(data, path, "")
    users: dict[str, FileUser] = {}
    names: list[object] = list(top.data)
    for name in names:
        if isinstance(name, bool) or not isinstance(name, (str, int)) or str(name) == "":
            raise ConfigError(path, str(name), "a user name must be a non-empty string")
        u = top.section(str(name))
        password = u.string("password")
        if not password:
            raise u.error("password", "is required (a hash from --hash-password, or plaintext)")
        _check_hash(u, password)
        users[str(name)] = FileUser(
            name=str(name),
            password=password,
            acl=_segments(u, "acl"),
            topics=frozenset(u.strings("topics")),
        )
        u.warn_unknown()
    return AclFile(path=path, users=users, decoy=_decoy_hash([u.password for u in users.values()]))


def load_acl_file(path: str) -> AclFile:
    """Read and validate the ACL file; a missing file means no users (0.7.4 did the same)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        logger.warning("ACL file %s not found: no users, private events go to nobody", path)
        return parse_acl(None, path)
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "(file)", f"not UTF-8: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, "(file)", f"invalid YAML: {e}") from None
    return parse_acl(data, path)


class FileAuthenticator:
    """Users from the ACL file. Answers every credential pair; ``knows`` says whose they are."""

    def __init__(self, acl: AclFile) -> None:
        self.acl = acl
        self._verify_slots = asyncio.Semaphore(MAX_CONCURRENT_VERIFY)
        # positive answers only: a hit needs the right password, so it reveals nothing
        self._verified: dict[bytes, tuple[float, str]] = {}
        self._secret = os.urandom(32)

    @property
    def path(self) -> str:
        return self.acl.path

    def knows(self, username: str) -> bool:
        return username in self.acl.users

    def warn_plaintext(self) -> None:
        plain = self.acl.plaintext_users
        if plain:
            logger.warning("%s: plaintext password(s) for user(s) %s; store hashes instead "
                           "(python3 pypubsub.py --hash-password)", self.acl.path, ", ".join(plain))

    def _key(self, username: str, password: str) -> bytes:
        u = username.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, len(u).to_bytes(4, "big") + u
                        + password.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    async def authenticate(self, username: str, password: str) -> FilePrincipal | None:
        acl = self.acl
        user = acl.users.get(username)
        key = self._key(username, password)
        loop = asyncio.get_running_loop()
        if user is not None:
            seen = self._verified.get(key)
            if seen is not None and seen[0] > loop.time() and seen[1] == user.password:
                return user.principal()
        # an unknown user is checked against the decoy: same work, same time as a wrong password
        stored = user.password if user is not None else acl.decoy
        async with self._verify_slots:
            if _scheme(stored) == "plaintext":
                ok = _plain_equal(stored, password)
            else:
                ok = await asyncio.to_thread(verify_password, stored, password)
        if self.acl is not acl:
            # the file was reloaded while the hash was checked: answer from the new one, so a
            # stream being set up now cannot slip past the reload with the old rights
            return await self.authenticate(username, password)
        if user is None or not ok:
            return None
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[key] = (loop.time() + VERIFIED_TTL, user.password)
        return user.principal()

    def reload(self, new: AclFile) -> Callable[[FilePrincipal], FilePrincipal | None]:
        """Use ``new`` from now on; returns how to re-authorise a principal of the old file.

        A stream keeps the user's new rights only while the user exists and the password entry
        is unchanged; otherwise it loses them (it keeps streaming public events) until it
        reconnects with valid credentials.
        """
        old, self.acl = self.acl, new
        self._verified.clear()

        def reauthorise(p: FilePrincipal) -> FilePrincipal | None:
            before, now = old.users.get(p.user), new.users.get(p.user)
            if before is None or now is None or before.password != now.password:
                return None
            return now.principal()

        return reauthorise


def hash_password_cli(scheme: str, stdin: IO[str], stdout: IO[str], tty: bool) -> int:
    """``pypubsub.py --hash-password``: read a password, write its hash. Returns the exit code."""
    if tty:
        pw = getpass.getpass("Password: ")
        if pw != getpass.getpass("Again: "):
            logger.error("the passwords differ")
            return 1
    else:
        pw = stdin.readline().rstrip("\r\n")
    if not pw:
        logger.error("refusing to hash an empty password")
        return 1
    stdout.write(hash_password(pw, scheme) + "\n")
    stdout.flush()
    return 0
