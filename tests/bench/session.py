"""Drive all servers through the same rounds, interleaved, so a noisy machine disturbs them alike.

Every server is up for the whole run, idle but for its own rounds; rounds go
level by level, rep by rep, one server at a time, in an order that rotates
each rep. Each round's CPU time is split between the server under test,
this client, our idle servers, and everything else on the machine; a round
during which everything else used the CPU is run again (a few times at
most) with a fresh prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from report import ServerResult
from servers import Server, machine_busy_seconds, wait_for_quiet
from workload import Endpoint, Workload, run_conversation, run_round

T = TypeVar("T")
Cpu = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    levels: list[int]
    reps: int
    conversations: int
    work: Workload
    quiet_wait: float  # seconds to wait before each round for other processes to go quiet
    disturbed: float  # a round is disturbed when other processes used more CPUs than this
    retries: int  # how many times a disturbed round is run again


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers

    @contextlib.contextmanager
    def measure(self, target: Server) -> Iterator[dict[str, float]]:
        """Yields a dict that holds, once the block ends, where the CPU time went."""
        out: dict[str, float] = {}
        wall, busy, me = time.perf_counter(), machine_busy_seconds(), _own_cpu_seconds()
        ours = {s.name: s.cpu_seconds() for s in self.servers}
        yield out
        wall = time.perf_counter() - wall
        busy, me = machine_busy_seconds() - busy, _own_cpu_seconds() - me
        used = {s.name: s.cpu_seconds() - ours[s.name] for s in self.servers}
        out.update(
            wall_s=wall,
            capacity_s=wall * (os.cpu_count() or 1),
            server_cpu_s=used[target.name],
            client_cpu_s=me,
            idle_servers_cpu_s=sum(used.values()) - used[target.name],
            other_cpu_s=max(0.0, busy - sum(used.values()) - me),
        )


class Session:
    def __init__(self, servers: list[Server], results: dict[str, ServerResult], plan: Plan):
        self.servers = servers
        self.results = results
        self.plan = plan
        self.meter = CpuMeter(servers)

    def _live(self, turn: int) -> list[Server]:
        """Servers still standing, in an order that rotates with `turn`."""
        for s in self.servers:
            if not s.alive() and self.results[s.name].error is None:
                code = s.proc.returncode if s.proc else None
                self.results[s.name].error = f"exited during the run (code {code})"
                say(f"  {s.name} exited (code {code})")
        live = [s for s in self.servers if self.results[s.name].error is None]
        k = turn % len(live) if live else 0
        return live[k:] + live[:k]

    async def run(self) -> None:
        warm = Workload(max_tokens=16, banned=self.plan.work.banned)
        for s in self._live(0):
            ep = Endpoint(s.root, s.headers)
            await run_round(ep, warm, 1, "warm-up a")
            await run_round(ep, warm, max(self.plan.levels), "warm-up b")
        for level in self.plan.levels:
            for rep in range(self.plan.reps):
                for s in self._live(rep):
                    await self._round(s, level, rep)
            for s in self.servers:
                self.results[s.name].rss_kib[level] = s.peak_rss_kib()
        for i in range(self.plan.conversations):
            for s in self._live(i):
                await self._conversation(s, i)

    async def _quiet(self) -> None:
        if self.plan.quiet_wait > 0:
            await asyncio.to_thread(wait_for_quiet, self.plan.quiet_wait)

    async def _measured(self, s: Server, run: Callable[[str], Awaitable[T]]) -> tuple[T, Cpu]:
        """run(attempt tag), again with a fresh prompt while other processes disturb it."""
        result = self.results[s.name]
        for attempt in range(self.plan.retries + 1):
            await self._quiet()
            with self.meter.measure(s) as cpu:
                value = await run(f"a{attempt}")
            result.add_cpu(cpu)
            others = cpu["other_cpu_s"] / cpu["wall_s"] if cpu["wall_s"] else 0.0
            cpu.update(attempt=attempt, others_cpus=others, disturbed=others > self.plan.disturbed)
            if not cpu["disturbed"] or attempt == self.plan.retries:
                return value, cpu
            result.retried += 1
            say(f"  {s.name:16} disturbed ({others:.1f} CPUs used by other processes): again")
        raise AssertionError("unreachable")

    async def _round(self, s: Server, level: int, rep: int) -> None:
        ep = Endpoint(s.root, s.headers)
        r, cpu = await self._measured(
            s, lambda a: run_round(ep, self.plan.work, level, f"c{level}r{rep}{a}")
        )
        result = self.results[s.name]
        result.rounds.setdefault(level, []).append(r)
        result.round_cpu.setdefault(level, []).append(cpu)
        tokens = sum(st.tokens for st in r.streams)
        say(
            f"  {s.name:16} c={level} round {rep + 1}/{self.plan.reps}: {tokens:5} tokens in "
            f"{r.wall_s:5.1f}s (other processes: {cpu['others_cpus']:.1f} CPUs)"
        )

    async def _conversation(self, s: Server, i: int) -> None:
        ep = Endpoint(s.root, s.headers)
        conv, cpu = await self._measured(
            s, lambda a: run_conversation(ep, self.plan.work, f"{i}{a}")
        )
        result = self.results[s.name]
        result.conversations.append(conv)
        result.conversation_cpu.append(cpu)
        say(f"  {s.name:16} conversation {i + 1}: follow-up prompt_n={conv.prompt_n}")
