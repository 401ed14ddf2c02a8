"""What the NodeCache tests share: two prompts on one prefix, a fast link and a slow CPU."""

from __future__ import annotations

from mesh.cache.lookup import LinkEstimate

PREFIX = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
          "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
          "Which planet is known as the red planet?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn\nAnswer: B\n\n")
Q1 = PREFIX + "Which planet has the most moons?\nA. Saturn\nB. Mars\nC. Venus\nD. Mercury\nAnswer:"
Q2 = PREFIX + "What is the largest planet?\nA. Earth\nB. Jupiter\nC. Mars\nD. Venus\nAnswer:"

FAST = LinkEstimate(bytes_per_s=1e9, rtt_s=0.001)
SLOW_CPU = 1.0  # prefill tokens/s: anything a fast link brings beats recomputing it
