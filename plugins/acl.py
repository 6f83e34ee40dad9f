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
from plugins.credcache import CredentialCache, Lookup
from server.auth import Principal
from server.config import ConfigErrors, Section
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
#: verified pairs remembered at most (the oldest forgotten first): bounded memory
VERIFIED_MAX = 10_000
#: more hashed cost shapes than this in one file (each login verifies one hash of each): warned
MANY_SHAPES = 1


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


def _shape(stored: str) -> str:
    """What a verification of ``stored`` costs: its scheme and cost parameters."""
    scheme = _scheme(stored)
    if scheme == "argon2id":
        return stored.rsplit("$", 2)[0]  # "$argon2id$v=19$m=...,t=...,p=..."
    if scheme == "bcrypt":
        return "bcrypt$" + stored[4:6]  # $2a$/$2b$/$2y$ at one cost take the same time
    return "plaintext"


def _decoys(stored: list[str]) -> dict[str, str]:
    """One hash of a random password per cost shape in ``stored`` (scheme and parameters).

    Every authentication verifies one hash of each shape (the user's own for its shape, these
    decoys for the others; only decoys for an unknown user), so that a known user and an
    unknown one cost exactly the same whatever the mix of schemes in the file.
    """
    out: dict[str, str] = {}
    for h in stored:
        shape = _shape(h)
        if shape in out:
            continue
        decoy = secrets.token_urlsafe(24)
        if shape.startswith(ARGON2_PREFIX):
            import argon2

            out[shape] = argon2.PasswordHasher.from_parameters(argon2.extract_parameters(h)).hash(decoy)
        elif shape.startswith("bcrypt$"):
            out[shape] = hash_password(decoy, "bcrypt", cost=int(shape[7:]))
        else:
            out[shape] = decoy
    if not out:  # no users: an unknown user still pays a (plaintext) comparison
        out["plaintext"] = secrets.token_urlsafe(24)
    return out


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
    """A parsed ACL file: its users and one decoy hash per cost shape present in it."""

    path: str
    users: Mapping[str, FileUser]
    #: cost shape (scheme and parameters) → a hash of a random password of that shape
    decoys: Mapping[str, str]

    @property
    def plaintext_users(self) -> list[str]:
        return sorted(u.name for u in self.users.values() if u.scheme == "plaintext")

    def work(self, username: str) -> tuple[int, tuple[str, ...]]:
        """``(index of the user's own hash or -1, every hash to verify)`` for one authentication.

        One hash per cost shape of the file, in a fixed order: the user's own stands in for
        its shape. A known user and an unknown one verify the same shapes, so they cost the same.
        """
        user = self.users.get(username)
        hashes = [decoy for _, decoy in sorted(self.decoys.items())]
        if user is None:
            return -1, tuple(hashes)
        i = sorted(self.decoys).index(_shape(user.password))
        hashes[i] = user.password
        return i, tuple(hashes)


def _segments(sec: Section, name: str) -> Acl:
    """``acl:`` — segment name → list of topics (an empty list sees every private event)."""
    acl = sec.section(name)
    out: set[frozenset[str]] = set()
    for seg in acl.data:
        v = acl.raw(str(seg))
        if v is None:
            v = []
        if not isinstance(v, list):
            acl.report(str(seg), f"expected a list of topics, got {v!r}")
            continue
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
            u.report("password", "is a malformed argon2id hash")
    elif scheme == "bcrypt" and not _BCRYPT_RE.match(password):
        u.report("password", "is a malformed bcrypt hash")


def parse_acl(data: object, path: str) -> AclFile:
    """Validate a parsed ACL document. Raises ConfigErrors naming the file and the key of every
    error in it (all of them at once).

    The decoy hash is made here (it can take a tenth of a second): call off the event loop.
    """
    errors: list[ConfigError] = []
    top = Section(data, path, "", errors)
    users: dict[str, FileUser] = {}
    names: list[object] = list(top.data)
    for name in names:
        if isinstance(name, bool) or not isinstance(name, (str, int)) or str(name) == "":
            errors.append(ConfigError(path, str(name), "a user name must be a non-empty string"))
            continue
        u = top.section(str(name))
        password = u.string("password")
        if not password:
            u.report("password", "is required (a hash from --hash-password, or plaintext)")
            continue
        _check_hash(u, password)
        users[str(name)] = FileUser(
            name=str(name),
            password=password,
            acl=_segments(u, "acl"),
            topics=frozenset(u.strings("topics")),
        )
        u.warn_unknown()
    if errors:
        raise ConfigErrors(errors)
    acl = AclFile(path=path, users=users, decoys=_decoys([u.password for u in users.values()]))
    hashed = sorted(s for s in acl.decoys if s != "plaintext")
    if len(hashed) > MANY_SHAPES:
        logger.warning("%s: passwords are hashed %d different ways (%s); every login verifies one "
                       "hash of each, so that unknown users cost the same as known ones: re-hash "
                       "them alike (pypubsub.py --hash-password)", path, len(hashed),
                       ", ".join(hashed))
    return acl


def load_acl_file(path: str, *, reload: bool = False) -> AclFile:
    """Read and validate the ACL file.

    At start-up a missing file means no users (0.7.4 did the same). At ``reload``, a missing or
    empty file is refused (ConfigError) like any broken one: it is what a half-finished edit or
    a deploy gone wrong looks like, and taking it would revoke every user at once. An explicit
    empty mapping (``{}``) is how to remove every user.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if reload:
            raise ConfigError(path, "(file)", "not found (refusing to revoke every user; write "
                                              "{} to the file to remove them all)") from None
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
    if data is None and reload:
        raise ConfigError(path, "(file)", "is empty (refusing to revoke every user; write {} to "
                                          "the file to remove them all)")
    return parse_acl(data, path)


def _verify_all(own: int, hashes: tuple[str, ...], given: str) -> bool:
    """Verify ``given`` against every hash (CPU-bound); True when ``hashes[own]`` matches."""
    ok = False
    for i, h in enumerate(hashes):
        matched = verify_password(h, given)  # always run: the decoys cost what a real one does
        ok = ok or (matched and i == own)
    return ok


class FileAuthenticator:
    """Users from the ACL file. Answers every credential pair; ``knows`` says whose they are."""

    def __init__(self, acl: AclFile) -> None:
        self.acl = acl
        self._verify_slots = asyncio.Semaphore(MAX_CONCURRENT_VERIFY)
        # positive answers only (negative_ttl 0): a hit needs the right password, so it
        # reveals nothing, and every refusal pays the full verification
        self.cache = CredentialCache(VERIFIED_TTL, 0.0, VERIFIED_MAX, name="acl")
        #: hashes verified so far, per cost shape (what the decoy path exercised)
        self.verified_shapes: Counter[str] = Counter()

    @property
    def path(self) -> str:
        return self.acl.path

    def knows(self, username: str) -> bool:
        return username in self.acl.users

    def warn_plaintext(self) -> None:
        plain = self.acl.plaintext_users
        if plain:
            logger.warning("%s: plaintext password(s) for user(s) %s; store hashes instead "
                           "(pypubsub.py --hash-password)", self.acl.path, ", ".join(plain))

    async def authenticate(self, username: str, password: str) -> FilePrincipal | None:
        p = await self.cache.get(username, password, lambda: self._lookup(username, password))
        return p if isinstance(p, FilePrincipal) else None

    async def _lookup(self, username: str, password: str) -> Lookup:
        while True:
            acl = self.acl
            own, hashes = acl.work(username)
            # an unknown user verifies only decoys: the same shapes, the same time
            async with self._verify_slots:
                if all(_scheme(h) == "plaintext" for h in hashes):
                    ok = _verify_all(own, hashes, password)
                else:
                    ok = await asyncio.to_thread(_verify_all, own, hashes, password)
            self.verified_shapes.update(_shape(h) for h in hashes)
            if self.acl is acl:
                break
            # the file was reloaded while the hash was checked: answer from the new one, so a
            # stream being set up now cannot slip past the reload with the old rights
        user = acl.users.get(username)
        if user is None or not ok:
            return None, True
        return user.principal(), True

    def reload(self, new: AclFile) -> Callable[[Principal], Principal | None]:
        """Use ``new`` from now on; returns how to re-authorise a principal of the old file.

        A stream keeps the user's new rights only while the user exists and the password entry
        is unchanged; otherwise it loses them (it keeps streaming public events) until it
        reconnects with valid credentials.
        """
        old, self.acl = self.acl, new
        self.cache.clear()

        def reauthorise(p: Principal) -> Principal | None:
            if not isinstance(p, FilePrincipal):
                return p  # not one of this file's users: not ours to change
            before, now = old.users.get(p.user), new.users.get(p.user)
            if before is None or now is None or before.password != now.password:
                return None
            return now.principal()

        return reauthorise

    async def close(self) -> None:
        """End verifications still running (shutdown)."""
        await self.cache.close()


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
