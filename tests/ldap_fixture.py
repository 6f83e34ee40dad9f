"""A real OpenLDAP slapd on a free loopback port, for the LDAP tests and the auth benchmark.

cn=config is built offline with slapadd, the directory is seeded with people and groups, and
slapd runs in the foreground with ``-d stats`` so that its log shows every BIND (the tests count
binds to prove the cache works and that refused credentials never reached the server).
A missing slapd is an error, never a skip.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tests.support import HOST, free_port, wait_until

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

#: uid → (password, the groupOfNames it belongs to)
USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "alice": ("alice-pw", ("committers", "admins")),
    "bob": ("bob-pw", ("committers",)),
    "carol": ("carol-pw", ()),
    "evelyn": ("evelyn-pw", ()),
    # a real uid full of filter metacharacters: unescaped, (memberUid=eve*) would match evelyn
    "eve*": ("eve-pw", ()),
}
#: posixGroup → memberUid values (a substring-matchable attribute, for the injection test)
POSIX_GROUPS = {"posixadmins": ("evelyn",)}
#: an entry that a DN injection ("alice,ou=x") would reach if the username were not escaped
SHADOW = ("alice", f"ou=x,{PEOPLE}", "x-pw", ("admins",))


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _config_ldif(t: Path) -> str:
    schemas = "".join(f"include: file://{SCHEMA_DIR}/{s}.ldif\n\n"
                      for s in ("core", "cosine", "nis", "inetorgperson"))
    return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {t}/slapd.pid
olcArgsFile: {t}/slapd.args

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_DIR}
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schemas}dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {t}/db
olcDbMaxSize: 67108864
olcSuffix: {SUFFIX}
olcRootDN: cn=admin,{SUFFIX}
olcRootPW: adminpw
olcDbIndex: objectClass eq
olcDbIndex: uid eq
olcDbIndex: member eq
olcDbIndex: memberUid eq,sub
olcAccess: {{0}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{1}}to * by users read by * none
"""


def _person(uid: str, parent: str, password: str) -> str:
    return f"""\
dn: uid={_dn_value(uid)},{parent}
objectClass: inetOrgPerson
uid: {uid}
cn: {uid}
sn: {uid}
userPassword: {ssha(password)}

"""


def _dn_value(v: str) -> str:
    return re.sub(r'([,+"\\<>;=])', r"\\\1", v)


def data_ldif(extra_users: Iterable[str] = ()) -> str:
    """People, groups and ``extra_users`` (password ``<uid>-pw``, members of committers)."""
    extra = list(extra_users)
    out = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n",
           f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n",
           f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n\n",
           f"dn: {SHADOW[1]}\nobjectClass: organizationalUnit\nou: x\n\n"]
    members: dict[str, list[str]] = {}
    for uid, (pw, groups) in USERS.items():
        out.append(_person(uid, PEOPLE, pw))
        for g in groups:
            members.setdefault(g, []).append(f"uid={uid},{PEOPLE}")
    for uid in extra:
        out.append(_person(uid, PEOPLE, f"{uid}-pw"))
        members.setdefault("committers", []).append(f"uid={uid},{PEOPLE}")
    uid, parent, pw, groups = SHADOW
    out.append(_person(uid, parent, pw))
    for g in groups:
        members.setdefault(g, []).append(f"uid={uid},{parent}")
    for g, ms in members.items():
        out.append(f"dn: cn={g},{GROUPS}\nobjectClass: groupOfNames\ncn: {g}\n"
                   + "".join(f"member: {m}\n" for m in ms) + "\n")
    for gid, (g, uids) in enumerate(POSIX_GROUPS.items(), start=5000):
        out.append(f"dn: cn={g},{GROUPS}\nobjectClass: posixGroup\ncn: {g}\ngidNumber: {gid}\n"
                   + "".join(f"memberUid: {u}\n" for u in uids) + "\n")
    return "".join(out)


class Slapd:
    """slapd in the foreground (``-d stats``), owned by this object."""

    def __init__(self, extra_users: Iterable[str] = ()) -> None:
        for tool in ("slapd", "slapadd"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise RuntimeError(f"{tool} is not installed (apt-get install slapd ldap-utils)")
        self.dir = Path(tempfile.mkdtemp(prefix="pypubsub-slapd-"))
        self.port = free_port()
        self.log_path = self.dir / "slapd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (self.dir / "slapd.d").mkdir()
        (self.dir / "db").mkdir()
        (self.dir / "config.ldif").write_text(_config_ldif(self.dir))
        (self.dir / "data.ldif").write_text(data_ldif(extra_users))
        self._run(["slapadd", "-n0", "-F", str(self.dir / "slapd.d"), "-l", str(self.dir / "config.ldif")])
        self._run(["slapadd", "-q", "-n1", "-F", str(self.dir / "slapd.d"), "-l",
                   str(self.dir / "data.ldif")])

    @staticmethod
    def _run(cmd: list[str]) -> None:
        exe = shutil.which(cmd[0]) or f"/usr/sbin/{cmd[0]}"
        r = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")

    @property
    def uri(self) -> str:
        return f"ldap://{HOST}:{self.port}"

    def start(self) -> Slapd:
        exe = shutil.which("slapd") or "/usr/sbin/slapd"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([exe, "-d", "stats", "-h", f"ldap://{HOST}:{self.port}/",
                                      "-F", str(self.dir / "slapd.d")],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(up, 10, "slapd to listen")
        return self

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGCONT)  # in case a test paused it
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def binds(self, dn_contains: str = "") -> list[str]:
        """The DNs of every BIND slapd logged so far (anonymous binds show as an empty DN)."""
        dns = re.findall(r'BIND dn="([^"]*)" method=', self.log())
        return [d for d in dns if dn_contains in d]

    def wait_binds(self, n: int, timeout: float = 10.0) -> None:
        wait_until(lambda: len(self.binds()) >= n, timeout, f"{n} binds in slapd's log")


def ldap_config(slapd: Slapd, **extra: object) -> dict[str, object]:
    """A ``clients.ldap`` section for ``slapd`` using both acl shapes of 0.7.4."""
    cfg: dict[str, object] = {
        "uri": slapd.uri,
        "user_dn": f"uid=%s,{PEOPLE}",
        "base_scope": GROUPS,
        "membership_patterns": [
            f"(&(objectClass=groupOfNames)(member=uid=%s,{PEOPLE}))",
            "(&(objectClass=posixGroup)(memberUid=%s))",
        ],
        "acl": {
            "committers": ["commits"],                               # 0.7.4's sample shape
            "admins": {"adm": ["admin"], "ops": ["ops", "infra"]},  # 0.7.4's code shape
            "posixadmins": ["admin"],
        },
        "publish_topics": {"admins": ["deploys"]},
        "timeout": 1,
    }
    cfg.update(extra)
    return cfg
