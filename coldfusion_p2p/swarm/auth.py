"""Moderated runs: who may join. Invites signed by the run owner, checked by the DHT and the averager.

One key file serves each node twice: its libp2p identity (``--identity``, an RSA key in libp2p's
format) fixes the node's peer id, which the transport authenticates, and signs its DHT requests.
An :class:`Invite` binds that key's *public* half (hence the peer id), the run id, an expiry and a
human name, signed by the run owner's key (an identity file too). With ``--require-invite``:

* the DHT refuses requests and responses of nodes without a valid invite (:class:`InviteAuthorizer`,
  hivemind's ``TokenAuthorizerBase``; every request is signed by the invitee's private key);
* hivemind's averager RPCs (joining a group, sending parts, downloading state) carry no auth, so
  the averager asks an :class:`InviteGate` about the caller's transport-authenticated peer id.
  Peers publish their invite in their swarm record; the gate caches the valid ones by the peer id
  their key derives.

Decisions (is this invite valid, which peers do these invites admit) are pure functions.

>>> owner = RSAPrivateKey()
>>> invite = sign_invite(owner, invitee_public_key, run_id="my-swarm", name="alice", expires=time.time() + 86400)
>>> invite_problem(Invite.decode(invite.encode()), owner.get_public_key(), "my-swarm", time.time()) is None
True
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon import P2P
from hivemind.proto import crypto_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import ValueWithExpiration
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from coldfusion_p2p.errors import UserError

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "cfinvite1."  # versioned, and tells an invite from a file name at a glance
MAX_TOKEN_LENGTH = 4096
INVITE_HOWTO = "coldfusion-peer invite --owner-key OWNER.key --public-key <your public key> --run-id RUN"


# ---------------------------------------------------------------- invites (pure)
@dataclass(frozen=True)
class Invite:
    """The run owner's word that the holder of ``public_key`` may join run ``run_id`` until ``expires``."""

    name: str  # who it is for, shown in logs and errors
    run_id: str
    public_key: bytes  # the invitee's RSA public key, OpenSSH format (RSAPublicKey.to_bytes())
    expires: int  # unix time
    signature: bytes = b""  # the owner's signature of signed_bytes() (base64, as hivemind signs)

    def signed_bytes(self) -> bytes:
        fields = {
            "v": 1,
            "name": self.name,
            "run_id": self.run_id,
            "public_key": self.public_key.decode(),
            "expires": self.expires,
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @property
    def peer_id(self) -> PeerID:
        return peer_id_of(self.public_key)

    @property
    def expires_text(self) -> str:
        return datetime.fromtimestamp(self.expires, UTC).isoformat(timespec="seconds")

    def to_token(self) -> AccessToken:
        """As hivemind's ``AccessToken`` (what the DHT's authorizer sends with every request)."""
        username = json.dumps({"name": self.name, "run_id": self.run_id}, sort_keys=True)
        return AccessToken(
            username=username, public_key=self.public_key, expiration_time=self.expires_text, signature=self.signature
        )

    @classmethod
    def from_token(cls, token: AccessToken) -> Invite:
        """Raises ValueError when the token is not one of ours."""
        try:
            names = json.loads(token.username)
            expires = datetime.fromisoformat(token.expiration_time)
            name, run_id = names["name"], names["run_id"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"not an invite token ({error})") from None
        if not isinstance(name, str) or not isinstance(run_id, str) or expires.tzinfo is None:
            raise ValueError("not an invite token (bad fields)")
        if not token.public_key.startswith(b"ssh-rsa ") or not token.signature:
            raise ValueError("not an invite token (no RSA public key or no signature)")
        return cls(name, run_id, bytes(token.public_key), int(expires.timestamp()), bytes(token.signature))

    def encode(self) -> str:
        """One printable line: what the owner hands to the invitee."""
        return TOKEN_PREFIX + base64.urlsafe_b64encode(self.to_token().SerializeToString()).decode()

    @classmethod
    def decode(cls, text: str) -> Invite:
        """Raises ValueError naming what is wrong with ``text``."""
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise ValueError(f"an invite token starts with {TOKEN_PREFIX}")
        if len(text) > MAX_TOKEN_LENGTH:
            raise ValueError("too long for an invite token")
        try:
            token = AccessToken.FromString(base64.urlsafe_b64decode(text[len(TOKEN_PREFIX) :].encode()))
        except (binascii.Error, ValueError, DecodeError) as error:
            raise ValueError(f"not valid base64 protobuf ({type(error).__name__}): truncated?") from None
        return cls.from_token(token)


def sign_invite(owner: RSAPrivateKey, public_key: bytes, *, run_id: str, name: str, expires: float) -> Invite:
    """The owner's invite for the holder of ``public_key`` (OpenSSH format) to run ``run_id``."""
    unsigned = Invite(name=name, run_id=run_id, public_key=public_key, expires=int(expires))
    return Invite(name, run_id, public_key, int(expires), owner.sign(unsigned.signed_bytes()))


def invite_problem(invite: Invite, owner: RSAPublicKey, run_id: str, now: float) -> str | None:
    """Why ``invite`` does not admit its holder to ``run_id`` at ``now``; None when it does."""
    if not owner.verify(invite.signed_bytes(), invite.signature):
        return "it is not signed by the run owner's key (forged, altered, or made with another owner key)"
    if invite.run_id != run_id:
        return f"it is for run {invite.run_id!r}, not {run_id!r}"
    if invite.expires <= now:
        return f"it expired at {invite.expires_text}"
    return None


def admitted_peers(tokens: Iterable[str], owner: RSAPublicKey, run_id: str, now: float) -> dict[PeerID, Invite]:
    """The peer ids that valid invites among ``tokens`` admit (malformed and invalid ones are skipped)."""
    admitted = {}
    for token in tokens:
        try:
            invite = Invite.decode(token)
            if invite_problem(invite, owner, run_id, now) is None:
                admitted[invite.peer_id] = invite
        except ValueError:
            continue
    return admitted


def peer_id_of(public_key: bytes) -> PeerID:
    """The libp2p peer id of an RSA public key (OpenSSH format), as ``PeerID.from_identity`` derives it."""
    key = serialization.load_ssh_public_key(public_key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))


# ---------------------------------------------------------------- key files and user input
def prepare_identity(path: str | Path) -> PeerID:
    """Create the private key on first run (readable by its owner only), or check the existing one."""
    path = Path(path).expanduser()
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(path))  # hivemind writes it with mode 0400
        except (OSError, FileNotFoundError) as error:
            raise UserError(
                f"cannot create identity file {path} ({error})", "pass a writable --identity path"
            ) from None
    return load_identity(path, flag="--identity")[0]


def load_identity(path: str | Path, flag: str = "--identity") -> tuple[PeerID, RSAPrivateKey]:
    """The peer id and RSA private key of a libp2p identity file; UserError when absent or unusable."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(
            f"key file {path} ({flag}) does not exist", f"create it with: coldfusion-peer identity --identity {path}"
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(
            f"identity file {path} is unreadable ({error.strerror or error})",
            f"fix its permissions or pass another {flag}",
        ) from None
    try:
        protobuf = crypto_pb2.PrivateKey.FromString(data)
        if protobuf.key_type != crypto_pb2.RSA:
            raise ValueError("not an RSA key")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": protobuf.data})  # hivemind's own deserialization (DER)
        return PeerID.from_identity(data), key
    except Exception:  # protobuf/crypto errors of a truncated or foreign key file
        raise UserError(
            f"identity file {path} is corrupt (not a libp2p RSA private key)",
            "restore it from your backup, or move it away to create a new identity (the peer id will change)",
        ) from None


def public_key_text(key: RSAPrivateKey) -> str:
    """The one-line public key (``ssh-rsa AAAA...``) a node prints and the owner puts in an invite."""
    return key.get_public_key().to_bytes().decode()


def read_public_key(value: str, flag: str) -> RSAPublicKey:
    """An RSA public key given as its ``ssh-rsa ...`` line, a file holding that line, or an identity file."""
    text = value.strip()
    if not text.startswith("ssh-rsa "):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(
                f"{flag} is neither a public key (ssh-rsa ...) nor an existing file: {value[:80]!r}",
                "pass the line `coldfusion-peer identity` prints, or a file holding it",
            )
        data = path.read_bytes()
        if not data.lstrip().startswith(b"ssh-rsa "):
            return load_identity(path, flag)[1].get_public_key()
        text = data.decode(errors="replace").strip()
    try:
        return RSAPublicKey.from_bytes(text.encode())
    except Exception:  # cryptography raises several types for a damaged key
        raise UserError(
            f"{flag} is not a valid RSA public key",
            "copy the whole `ssh-rsa ...` line `coldfusion-peer identity` prints",
        ) from None


def read_invite(value: str) -> Invite:
    """``--invite``: a token or a file holding one; UserError when malformed."""
    text = value.strip()
    if not text.startswith(TOKEN_PREFIX):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(
                f"--invite is neither an invite token ({TOKEN_PREFIX}...) nor an existing file",
                "pass the token the run owner gave you, or the file holding it",
            )
        text = path.read_text(errors="replace").strip()
    try:
        return Invite.decode(text)
    except ValueError as error:
        raise UserError(
            f"the invite in --invite is malformed ({error})",
            f"copy the whole token the run owner gave you (one line starting with {TOKEN_PREFIX})",
        ) from None


# ---------------------------------------------------------------- one node's moderation settings
@dataclass(frozen=True)
class Moderation:
    """What a node of a moderated run needs: the owner's key to check others, its own key and invite."""

    run_id: str
    owner: RSAPublicKey
    identity_key: RSAPrivateKey
    invite: Invite

    def problem(self, invite: Invite, now: float | None = None) -> str | None:
        return invite_problem(invite, self.owner, self.run_id, time.time() if now is None else now)


def load_moderation(
    *,
    require_invite: bool,
    run_id: str,
    identity: str | None,
    invite: str | None,
    owner_public_key: str | None,
    now: float | None = None,
) -> Moderation | None:
    """None for an open run; otherwise this node's checked moderation settings (UserError if unusable)."""
    if not require_invite:
        return None
    if not (identity and invite and owner_public_key):
        raise UserError(
            "a moderated run (--require-invite) needs --identity, --invite and --owner-public-key",
            "pass all three (the invite was issued by the run owner for your identity's public key)",
        )
    owner = read_public_key(owner_public_key, "--owner-public-key")
    peer_id, key = load_identity(identity)
    own_invite = read_invite(invite)
    moderation = Moderation(run_id=run_id, owner=owner, identity_key=key, invite=own_invite)
    problem = moderation.problem(own_invite, now)
    if problem is not None:
        raise UserError(
            f"your invite ({own_invite.name!r}) is not valid for run {run_id!r}: {problem}",
            "ask the run owner for a new invite, and check --run-id and --owner-public-key",
        )
    if own_invite.public_key != key.get_public_key().to_bytes():
        raise UserError(
            f"your invite was issued for peer id {own_invite.peer_id.to_base58()}, "
            f"but --identity {identity} is peer id {peer_id.to_base58()}",
            "pass the --identity file the invite was made for, or ask for an invite for this identity's public key",
        )
    return moderation


def issue_invite(
    *, owner_key: str, public_key: str, run_id: str, name: str | None, valid_days: float, now: float | None = None
) -> Invite:
    """``coldfusion-peer invite``: the owner signs an invite for ``public_key``."""
    _, owner = load_identity(owner_key, "--owner-key")
    invitee = read_public_key(public_key, "--public-key").to_bytes()
    now = time.time() if now is None else now
    expires = now + valid_days * 86400.0
    return sign_invite(owner, invitee, run_id=run_id, name=name or peer_id_of(invitee).to_base58(), expires=expires)


# ---------------------------------------------------------------- enforcement: DHT and averager
class InviteAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer for a moderated run: requests and responses carry a valid invite,
    signed by the private key the invite names."""

    def __init__(self, moderation: Moderation):
        super().__init__(local_private_key=moderation.identity_key)
        self.moderation = moderation

    async def get_token(self) -> AccessToken:
        return self.moderation.invite.to_token()

    def is_token_valid(self, access_token: AccessToken) -> bool:
        try:
            invite = Invite.from_token(access_token)
        except ValueError:
            return False
        return self.moderation.problem(invite) is None

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # an invite is fixed; when it expires, the others refuse it


class InviteGate:
    """Decides whether a remote peer id may use this node's averager: only if it holds a valid invite.

    Invites come from the peers' swarm records; valid ones are cached by peer id until they expire.
    An unknown peer id causes at most one refresh from the DHT per ``refresh_period`` seconds (a
    stranger knocking often cannot make us flood the DHT), and the cache holds at most
    ``max_peers`` entries.
    """

    def __init__(
        self,
        dht,
        records_key: str,
        moderation: Moderation,
        *,
        refresh_period: float = 1.0,
        fetch_timeout: float = 5.0,
        max_peers: int = 10_000,
    ):
        self.dht, self.records_key, self.moderation = dht, records_key, moderation
        self.refresh_period, self.fetch_timeout, self.max_peers = refresh_period, fetch_timeout, max_peers
        self._admitted: dict[PeerID, Invite] = {moderation.invite.peer_id: moderation.invite}
        self._last_refresh = -math.inf
        self._refused_logged: set[PeerID] = set()
        self._background: asyncio.Task | None = None

    def _is_admitted(self, peer_id: PeerID, now: float) -> bool:
        invite = self._admitted.get(peer_id)
        return invite is not None and invite.expires > now

    async def admits(self, peer_id: PeerID, *, refresh: bool = True) -> bool:
        if self._is_admitted(peer_id, time.time()):
            return True
        if refresh and time.monotonic() - self._last_refresh >= self.refresh_period:
            await self.refresh()
        if self._is_admitted(peer_id, time.time()):
            return True
        if peer_id not in self._refused_logged and len(self._refused_logged) < self.max_peers:
            self._refused_logged.add(peer_id)
            logger.warning("refused averaging requests from %s: no valid invite for this run", peer_id.to_base58())
        return False

    def refresh_soon(self) -> None:
        """Refresh in the background of the running event loop (at most one such refresh at a time)."""
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self.refresh())

    async def refresh(self) -> None:
        """Re-read the invites published in the swarm's records (bounded in time, never fatal)."""
        self._last_refresh = time.monotonic()
        try:
            found = await asyncio.wait_for(
                self.dht.get(self.records_key, latest=True, return_future=True), timeout=self.fetch_timeout
            )
        except Exception as error:  # a slow DHT: keep what we know
            logger.debug("reading invites failed: %r", error)
            return
        self.update(published_tokens(found), time.time())

    def update(self, tokens: Iterable[str], now: float) -> None:
        """Add the valid invites among ``tokens``; drop expired ones and keep at most ``max_peers``."""
        moderation = self.moderation
        self._admitted.update(admitted_peers(tokens, moderation.owner, moderation.run_id, now))
        self._admitted = {peer: invite for peer, invite in self._admitted.items() if invite.expires > now}
        if len(self._admitted) > self.max_peers:  # keep the ones that stay valid longest
            newest = sorted(self._admitted.items(), key=lambda item: item[1].expires)[-self.max_peers :]
            self._admitted = dict(newest)

    async def uninvited(self, peer_ids: Iterable[PeerID]) -> list[PeerID]:
        """The members of a group that hold no valid invite (empty: everyone may take part)."""
        peer_ids = list(peer_ids)
        if not all(self._is_admitted(peer_id, time.time()) for peer_id in peer_ids):
            await self.refresh()  # our own group, once per round: worth a lookup whatever the rate limit
        return [peer_id for peer_id in peer_ids if not await self.admits(peer_id, refresh=False)]


def published_tokens(found) -> list[str]:
    """The ``invite`` fields of the records under one DHT key (what ``dht.get`` returned)."""
    if found is None or not isinstance(found.value, dict):
        return []
    tokens = []
    for entry in found.value.values():
        if isinstance(entry, ValueWithExpiration) and isinstance(entry.value, dict):
            token = entry.value.get("invite")
            if isinstance(token, str) and token:
                tokens.append(token)
    return tokens
