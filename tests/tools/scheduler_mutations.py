"""Break each scheduling policy in turn and check that tests/test_scheduler_unit.py notices.

    python tests/tools/scheduler_mutations.py

Each mutation replaces one line of vergeai/runtime/scheduler.py, prefix.py or stepcost.py,
runs the unit tests (a few seconds) and restores the file, whatever happens.
Prints CAUGHT or MISSED per policy; exits 1 if any is missed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (policy, file, what the code says, a plausible way to get it wrong)
MUTATIONS = [
    (
        "admission order",
        "vergeai/runtime/scheduler.py",
        "            if len(free) < job.slots_needed:\n                break",
        "            if len(free) < job.slots_needed:\n"
        "                waiting.append(waiting.popleft())\n                break",
    ),
    ("slot choice", "vergeai/runtime/prefix.py", "len(best.tokens) - kept <= SLACK", "True"),
    (
        "scope",
        "vergeai/runtime/prefix.py",
        "return n if scope == job.scope else min(n, public, job.public)",
        "return n",
    ),
    (
        "last token again",
        "vergeai/runtime/prefix.py",
        "return min(n, len(job.tokens) - 1)",
        "return min(n, len(job.tokens))",
    ),
    (
        "await",
        "vergeai/runtime/prefix.py",
        "if coming >= held + MIN_SHARED and",
        "if coming >= held and",
    ),
    (
        "copy in",
        "vergeai/runtime/prefix.py",
        "            if n < own + MIN_SHARED:\n                return",
        "            if True:\n                return",
    ),
    (
        "keeper",
        "vergeai/runtime/prefix.py",
        "            slot.keep_at = n",
        "            slot.keep_at = 0",
    ),
    (
        "chunking",
        "vergeai/runtime/scheduler.py",
        "budget = min(budget, self.cost.chunk(outputs, budget))",
        "budget = budget",
    ),
    (
        "chunk from the step's cost",
        "vergeai/runtime/stepcost.py",
        "room = STEP_TARGET - outputs * (self.per_output or 0.0)",
        "room = FIRST_CHUNK * self.per_token",
    ),
    (
        "outputs priced apart",
        "vergeai/runtime/stepcost.py",
        "prompt_seconds = seconds - outputs * (self.per_output or 0.0)",
        "prompt_seconds = seconds",
    ),
    (
        "drafts beside a prompt",
        "vergeai/runtime/scheduler.py",
        "return PROMPTING_DRAFT if long_prompt else 0",
        "return MAX_DRAFT",
    ),
    (
        "drafts with many generating",
        "vergeai/runtime/scheduler.py",
        "if generating > MAX_DRAFTING:",
        "if generating > 2 * MAX_DRAFTING:",
    ),
    ("draft room", "vergeai/runtime/scheduler.py", "or (others and not reliable)", "or False"),
    (
        "fork",
        "vergeai/runtime/scheduler.py",
        "ready += [Ready(f, index) for f in self._fork(slot)]",
        "self._fork(slot)",
    ),
    ("logits", "vergeai/runtime/scheduler.py", "every = slot.drafted > 0 or", "every = False or"),
]


def main() -> int:
    missed = 0
    for name, path, right, wrong in MUTATIONS:
        source = ROOT / path
        original = source.read_text()
        assert original.count(right) == 1, f"{name}: the line to mutate is not unique"
        source.write_text(original.replace(right, wrong))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                 "tests/test_scheduler_unit.py"],
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            caught = run.returncode != 0
        except subprocess.TimeoutExpired:
            caught = True  # the tests hung: noticed, if not gracefully
        finally:
            source.write_text(original)
        missed += not caught
        print(f"{name:30} {'CAUGHT' if caught else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
