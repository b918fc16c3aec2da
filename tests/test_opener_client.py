"""The tracer's end of the privileged opener (tcpstates.opener.Opener) against a
peer on a real socketpair that answers as slowly as told: every request is
bounded in time, and a slow opener is not refused for good."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import threading
import time

import pytest

from tcpstates import opener


def _peer(sock: socket.socket, delays: list[float]) -> None:
    """Answers each request after its delay, with a descriptor of /dev/null."""
    for delay in delays:
        data = sock.recv(opener.REQUEST.size)
        if not data:
            return
        seq = opener.REQUEST.unpack(data)[0]
        time.sleep(delay)
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            socket.send_fds(sock, [json.dumps({"seq": seq, "index": 0, "name": "x"}).encode()], [fd])
        finally:
            os.close(fd)


def test_one_late_answer_does_not_make_every_later_request_fail():
    """After one answer came too late, requests only probe (50 ms) until the
    opener answers again. An opener that then takes 200 ms per request (a slow
    disk) was refused for ever: each request timed out after 50 ms, although
    the late answer of the one before proved the opener alive. Now an answer
    that arrives gives the request the whole 1 s."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer = threading.Thread(target=_peer, args=(theirs, [1.2, 0.2, 0.2, 0.2]), daemon=True)
    peer.start()
    client = opener.Opener(ours, pid=-1)
    try:
        for _ in range(2):     # the slow one, then the probe while the opener is still busy with it
            with pytest.raises(opener.OpenerError) as info:
                client.open(0)
            assert info.value.errno == errno.ETIMEDOUT
        # the opener answered the second request, late: it is there again
        assert select.select([ours], [], [], 5)[0], "the late answer never came"
        for _ in range(2):
            fd, reply = client.open(0)
            assert fd >= 0 and reply["name"] == "x"
            os.close(fd)
    finally:
        ours.close()
        peer.join(5)
        theirs.close()
