"""Token lists (shardkeeper/token.py): the first is sent, every one is accepted; an agent's
data plane and the leader's liveness check take any listed token, and GET /v1/auth says
which kind a token is. No ZooKeeper here (the rotation end to end: test_token_rotation_e2e)."""

from __future__ import annotations

import pytest

from shardkeeper.liveness import HELLO, HelloRefused, check_hello, hello, parse_hello
from shardkeeper.token import BadTokens, Tokens, accepted, fingerprint, split_tokens
from shardkeeper.wire import shard_path
from tests import dataplane_support
from tests.dataplane_support import PEER_TOKEN, SHARD, TOKEN, raw

cluster = dataplane_support.cluster


def test_a_token_list_is_separated_by_any_white_space_the_first_is_sent() -> None:
    assert split_tokens("old") == ("old",)
    assert split_tokens(" old \n new\t") == ("old", "new")
    assert split_tokens("") == split_tokens("  \n") == split_tokens(None) == ()
    tokens = Tokens.parse("new old\n", "peer")
    assert (tokens.client, tokens.client_accepted) == ("new", ("new", "old"))
    assert (tokens.peer, tokens.peer_accepted) == ("peer", ("peer",))
    assert tokens.counts() == ("accepting 2 client token(s) and 1 peer token(s), sending peer"
                               f" token {fingerprint('peer')}")


def test_the_single_token_format_and_constructor_still_work() -> None:
    assert Tokens("c", "p") == Tokens.parse("c", "p")
    assert Tokens("c", "p").client_accepted == ("c",)


@pytest.mark.parametrize("client, peer", [
    ("", "p"), ("c", "  "),  # empty
    ("c", "c"),  # the peer token equal to the client token
    ("a b", "x b"), ("a b", "b"),  # any peer token equal to any client token
])
def test_unusable_token_lists_are_refused(client: str, peer: str) -> None:
    with pytest.raises(BadTokens):
        Tokens.parse(client, peer)


def test_a_list_must_start_with_the_token_sent() -> None:
    with pytest.raises(BadTokens):
        Tokens("a", "p", client_accepted=("b", "a"))
    with pytest.raises(BadTokens):
        Tokens("a b", "p")


def test_tokens_never_show_in_their_repr() -> None:
    tokens = Tokens.parse("secret-client other-client", "secret-peer")
    text = repr(tokens)
    assert "secret" not in text and "other" not in text
    assert fingerprint("secret-client") in text and len(fingerprint("x")) == 8


def test_accepted_compares_against_every_token() -> None:
    assert accepted(b"Bearer b", ("a", "b"), b"Bearer ")
    assert not accepted(b"Bearer c", ("a", "b"), b"Bearer ")
    assert not accepted(b"b", (), b"")


def test_liveness_hello_with_any_accepted_peer_token() -> None:
    line = hello("agent-1", 12.5, "new")
    assert parse_hello(line, ("old", "new")) == ("agent-1", 12.5)
    assert parse_hello(line, ("old",)) is None


def test_the_plane_accepts_every_listed_token_and_auth_says_which(cluster) -> None:
    node = cluster.start("a")
    auth = "/v1/auth"
    assert raw(node.address, "GET", auth, token=TOKEN)[:2] == (
        200, {"credential": "client", "current": True})
    assert raw(node.address, "GET", auth, token=PEER_TOKEN)[1]["credential"] == "peer"
    assert raw(node.address, "GET", auth, token="next")[0] == 401
    assert raw(node.address, "GET", auth, token=None)[0] == 401
    # A rotation's first step: the new token is accepted, the old one still sent.
    node.plane.set_tokens(Tokens.parse(f"{TOKEN} next", f"{PEER_TOKEN} peer-next"))
    assert raw(node.address, "GET", auth, token="next")[1] == {
        "credential": "client", "current": False}
    assert raw(node.address, "GET", auth, token="peer-next")[1] == {
        "credential": "peer", "current": False}
    assert raw(node.address, "GET", shard_path(SHARD, "digest"), token="next")[0] != 401
    # Its last: the old tokens are refused.
    node.plane.set_tokens(Tokens.parse("next", "peer-next"))
    assert raw(node.address, "GET", auth, token="next")[1]["current"] is True
    for old in (TOKEN, PEER_TOKEN):
        assert raw(node.address, "GET", auth, token=old)[0] == 401
        assert raw(node.address, "GET", shard_path(SHARD, "digest"), token=old)[0] == 401
    assert raw(node.address, "POST", auth, token="next")[0] == 405


def test_a_refused_hello_says_why_and_names_its_agent_only_if_printable() -> None:
    with pytest.raises(HelloRefused, match="peer token") as refused:
        check_hello(hello("agent-1", 12.5, "stale"), ("old", "new"))
    assert refused.value.agent == "agent-1"
    with pytest.raises(HelloRefused, match="not a liveness hello"):
        check_hello(b"GET / HTTP/1.1", ("old",))
    with pytest.raises(HelloRefused) as refused:
        check_hello(HELLO + b" a\x1bgent 1.0 stale", ("old",))
    assert refused.value.agent is None
    with pytest.raises(HelloRefused, match="malformed") as refused:
        check_hello(HELLO + b" agent-1 soon old", ("old",))
    assert refused.value.agent == "agent-1"
