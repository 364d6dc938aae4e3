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
