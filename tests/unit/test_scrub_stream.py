"""A body scrubbed as it streams, in chunks cut anywhere, comes out as if scrubbed whole."""

from __future__ import annotations

import base64
import itertools
import random

from broker.scrub import MASK, Scrubber

SECRET = "s3cr3t-Token/with+chars"


def streamed(scrubber: Scrubber, body: bytes, cuts: list[int]) -> bytes:
    stream = scrubber.stream()
    edges = [0, *sorted(cuts), len(body)]
    out = b"".join(stream.feed(body[a:b]) for a, b in itertools.pairwise(edges))
    return out + stream.end()


def test_every_split_gives_the_whole_body_scrubbed() -> None:
    scrubber = Scrubber([SECRET, "short-pw"], ["Bearer " + SECRET])
    forms = [
        SECRET,
        "Bearer " + SECRET,
        base64.b64encode(SECRET.encode()).decode(),
        "short-pw",
        SECRET.upper(),
    ]
    rng = random.Random(7)
    for _ in range(300):
        parts = [rng.choice(forms) if rng.random() < 0.3 else "x" * rng.randint(0, 40) for _ in range(12)]
        body = "|".join(parts).encode()
        cuts = rng.sample(range(len(body) + 1), k=min(len(body), rng.randint(0, 15)))
        assert streamed(scrubber, body, cuts) == scrubber.data(body)
        assert SECRET.encode() not in streamed(scrubber, body, cuts)


def test_one_byte_at_a_time_and_nothing_to_scrub() -> None:
    body = f"token={SECRET}&again={SECRET}".encode()
    scrubber = Scrubber([SECRET])
    assert streamed(scrubber, body, list(range(1, len(body)))) == f"token={MASK}&again={MASK}".encode()
    assert streamed(Scrubber([]), body, [3, 9]) == body


def test_no_part_of_a_body_gives_four_characters_of_a_secret_away() -> None:
    # Any slice of an answer that echoes a secret (what an upstream's part, a cut connection or an
    # offset gives), buffered or streamed in 3-byte chunks: no run of 4 of its characters survives.
    scrubber = Scrubber([SECRET])
    body = f"API_TOKEN={SECRET}\nX=1\n".encode()
    runs = [SECRET[i : i + 4].encode() for i in range(len(SECRET) - 3)]
    for start in range(len(body)):
        for stop in range(start + 1, len(body) + 1):
            part = body[start:stop]
            for got in (scrubber.body(part), streamed(scrubber, part, list(range(3, len(part), 3)))):
                assert not [run for run in runs if run in got], (start, stop, got)


def test_a_body_that_begins_inside_a_secret_has_that_end_masked() -> None:
    scrubber = Scrubber([SECRET])
    tail = SECRET[5:].encode() + b"\nmore of the answer, long enough to be released at once\n"
    assert scrubber.body(tail).startswith(MASK.encode() + b"\nmore")
    assert streamed(scrubber, tail, [2, 9]) == scrubber.body(tail)
    # Three characters are no secret's: left as they are, like any short word.
    assert scrubber.body(SECRET[-3:].encode() + b" ok") == SECRET[-3:].encode() + b" ok"
    assert scrubber.body(b"an answer that holds nothing") == b"an answer that holds nothing"
