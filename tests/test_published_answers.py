"""Challenge answers this process published are answered from memory (issue 12):
the CA's repeated fetches of one token cost no store round trips on the node that
wrote it, and nothing else is ever answered from memory."""

from __future__ import annotations

from pathlib import Path

from acme_client import PublishedAnswers
from certstore import generate_key_text, open_store
from certstore.crypto import parse_key_text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_published_answers_skip_the_store_and_go_with_delete(tmp_path: Path) -> None:
    key = parse_key_text(generate_key_text(), "test")
    store = await open_store(f"sqlite:///{tmp_path / 'store.db'}", key)
    other_worker = await open_store(f"sqlite:///{tmp_path / 'store.db'}", key)
    clock = Clock()
    answers = PublishedAnswers(store, ttl=60.0, clock=clock)
    try:
        await answers.put_challenge("tok-1", "tok-1.thumb", "a.test")
        # written through: another worker (or node) answers from the store
        assert await other_worker.get_challenge("tok-1") == "tok-1.thumb"
        for _ in range(3):  # the CA's validation requests
            assert await answers.get_challenge("tok-1") == "tok-1.thumb"
        assert answers.hits == 3

        # a token another worker published: read from the store, not remembered
        await other_worker.put_challenge("tok-2", "tok-2.thumb", "b.test")
        assert await answers.get_challenge("tok-2") == "tok-2.thumb"
        await other_worker.delete_challenge("tok-2")
        assert await answers.get_challenge("tok-2") is None
        assert answers.hits == 3

        await answers.delete_challenge("tok-1")
        assert await answers.get_challenge("tok-1") is None
        assert await other_worker.get_challenge("tok-1") is None

        # TLS-ALPN-01 answers likewise, and memory never outlives its ttl
        await answers.put_alpn_challenge("c.test", "c.key-authz")
        assert await answers.get_alpn_challenge("c.test") == "c.key-authz"
        await other_worker.delete_alpn_challenge("c.test")  # a delete the memory did not see
        clock.now += 61
        assert await answers.get_alpn_challenge("c.test") is None
        assert len(answers) == 0
    finally:
        await other_worker.close()
        await store.close()
