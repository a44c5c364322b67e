#!/usr/bin/env python3
"""Whole subtrees of /usr adding up to about FILES files and BYTES bytes.

Usage: usr-subtrees.py FILES BYTES > subtrees.txt 2> choice.txt

Each step takes the subtree that fills the larger share of what is left of
both budgets (files and bytes) without exceeding either, until 99 % of the
files are there or nothing fits. Shared by scripts/bench-tree and
scripts/bench-sync, so both measure the same kind of tree.
"""
import os, stat, sys
F, B = int(sys.argv[1]), int(sys.argv[2])
files, size = {}, {}
for root, dirs, names in os.walk("/usr", topdown=False):
    f = b = 0
    for n in names:
        try:
            st = os.lstat(os.path.join(root, n))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            f += 1
            b += st.st_size
    for d in dirs:
        p = os.path.join(root, d)
        f += files.get(p, 0)
        b += size.get(p, 0)
    files[root], size[root] = f, b
if files["/usr"] <= F:
    print(f"/usr has only {files['/usr']} files (fewer than {F}): all of it", file=sys.stderr)
    print("/usr")
    sys.exit()
cand = sorted(p for p in files if files[p] > 0 and p != "/usr")
chosen, fr, br = [], F, B
while fr > F // 100:
    best, score = None, 0.0
    for p in cand:
        if files[p] <= fr and size[p] <= br:
            s = min(files[p] / fr, size[p] / br if br else 1.0)
            if s > score:
                best, score = p, s
    if best is None:
        break
    chosen.append(best)
    fr -= files[best]
    br -= size[best]
    cand = [p for p in cand if not (p == best or p.startswith(best + "/") or best.startswith(p + "/"))]
for p in sorted(chosen):
    print(p)
print(f"{len(chosen)} subtrees of /usr", file=sys.stderr)
