"""The split-brain guard's probe (tasks/preflight.py ``probe``): a primary that is alive but slow
to answer once (a loaded machine, a JVM pause) is asked again with more time, and only two
attempts without an answer call it down."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from burrow.errors import SourceUnavailable
from tasks.preflight import probe


class _Session:
    def lookup(self, keys: list[bytes]) -> list[Any]:
        return [None for _ in keys]

    def close(self) -> None:
        pass


class Flaky(BaseModel):
    """A cluster that gives no answer to its first ``silent`` sessions, then answers."""

    service: str = "zookeeper"
    connect_timeout: float = 30.0
    silent: int = 1
    calls: ClassVar[list[float]] = []

    def describe(self) -> str:
        return "zk://primary.example:2181"

    def connect(self) -> _Session:
        Flaky.calls.append(self.connect_timeout)
        if len(Flaky.calls) <= self.silent:
            raise SourceUnavailable("no answer: timed out")
        return _Session()


def test_a_primary_that_answers_the_second_attempt_answers() -> None:
    Flaky.calls = []
    answers, detail = probe(Flaky(silent=1), timeout=0.5)
    assert answers and "answered" in detail
    assert Flaky.calls == [0.5, 1.0]  # the second attempt with twice the time


def test_a_primary_silent_twice_is_down() -> None:
    Flaky.calls = []
    answers, detail = probe(Flaky(silent=2), timeout=0.5)
    assert not answers and "no answer" in detail
    assert Flaky.calls == [0.5, 1.0]


def test_a_primary_that_answers_at_once_is_asked_once() -> None:
    Flaky.calls = []
    answers, _ = probe(Flaky(silent=0), timeout=0.5)
    assert answers and Flaky.calls == [0.5]
