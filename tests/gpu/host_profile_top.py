"""Where a scheduler's host time goes, from the load benchmark's py-spy samples (``PYSPY``).

``python tests/gpu/host_profile_top.py pyspy_<server>_bs<N>_<trace>.txt [--top 25]``: py-spy's raw format
is one collapsed stack per line (``frame;frame;...;frame count``, outermost first). Prints the share of
samples in which each function is on the stack (inclusive) and at its top (self), so two servers' files
show what a speculative step adds to a plain one. ``--json OUT`` also writes the top shares of every file
(by file name), for the docs. ``--under NAME`` keeps only the samples whose stack passes through a frame
whose name contains NAME, cut at that frame: what a stall inside one call (the context-K/V commit, say)
spends its time on.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def shares(path: Path, under: str | None = None) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, inclusive counts, self counts) by frame name (``function (file:line)`` without the line);
    with ``under``, of the samples inside the outermost frame whose name contains it, from that frame on."""
    total, inclusive, own = 0, Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        if under is not None:
            inside = [i for i, frame in enumerate(frames) if under in frame]
            if not inside:
                continue
            frames = frames[inside[0] :]
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    return total, inclusive, own


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path, help="also write the top shares of every file here")
    parser.add_argument("--under", help="only samples inside a frame whose name contains this")
    args = parser.parse_args()
    report: dict[str, dict] = {}
    for path in args.files:
        total, inclusive, own = shares(path, args.under)
        print(f"== {path.name}: {total} samples")
        report[path.name] = {"samples": total}
        for title, counts in (("inclusive", inclusive), ("self", own)):
            print(f"-- {title}")
            top = counts.most_common(args.top)
            report[path.name][title] = {frame: round(n / max(total, 1), 4) for frame, n in top}
            for frame, n in top:
                print(f"{100 * n / max(total, 1):6.1f}%  {frame}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
