#!/usr/bin/env python3
"""Builds a test disk image and simulates days of use on it.

    gen-disk.py base IMG SIZE_MIB DATA_MIB     an ext4 image holding real files
    gen-disk.py day IMG N NEW_MIB WRITES       day N: new files + scattered 4 KiB writes
    gen-disk.py changed A B                    bytes that differ between two images

The image is a real ext4 file system (mkfs.ext4 -d, then debugfs to add files;
no mount needed), filled with files copied from /usr (text, binaries, compressed
archives: what a VM's disk holds) and a database-like file, `db.bin`, whose
blocks take the scattered in-place 4 KiB writes. Everything is seeded, so the
same machine makes the same image.
"""
import os
import random
import subprocess
import sys
import tempfile

POOL_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/lib", "/usr/bin"]


def pool_files(for_days):
    """Files from /usr; one in eight (by a hash of the path) is kept for the
    days, so that a day's new files are not copies of what the base holds."""
    import zlib
    out = []
    for d in POOL_DIRS:
        for root, dirs, files in os.walk(d):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(root, f)
                try:
                    if (zlib.crc32(p.encode()) % 8 == 0) != for_days:
                        continue
                    if os.path.isfile(p) and not os.path.islink(p):
                        s = os.path.getsize(p)
                        if 1024 <= s <= 16 << 20:
                            out.append((p, s))
                except OSError:
                    pass
    return out


def pick(files, rnd, budget):
    chosen, total = [], 0
    idx = list(range(len(files)))
    rnd.shuffle(idx)
    for i in idx:
        p, s = files[i]
        if total + s > budget:
            continue
        chosen.append(p)
        total += s
        if total >= budget * 0.98:
            break
    return chosen, total


def prand(rnd, n):
    return rnd.randbytes(n)


def base(img, size_mib, data_mib):
    rnd = random.Random(1)
    files = pool_files(False)
    with tempfile.TemporaryDirectory() as d:
        chosen, total = pick(files, rnd, (data_mib - 256) << 20)
        for k, p in enumerate(chosen):
            dst = os.path.join(d, "files", f"{k // 500:03d}", f"{k:06d}-{os.path.basename(p)}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(p, "rb") as s, open(dst, "wb") as o:
                o.write(s.read())
        # The database file: half random, half repetitive records.
        with open(os.path.join(d, "db.bin"), "wb") as o:
            for i in range(256):
                if i % 2:
                    o.write(prand(rnd, 1 << 20))
                else:
                    rec = b"".join(b"row %08d name=%s value=%d\n" % (j, b"x" * (j % 13), j * 7) for j in range(i * 20000, i * 20000 + 20000))
                    o.write(rec[: 1 << 20].ljust(1 << 20, b"\0"))
        if os.path.exists(img):
            os.unlink(img)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=1,nodiscard", "-d", d, img, f"{size_mib}M"], check=True)
    print(f"base image {img}: {size_mib} MiB, {total >> 20} MiB of files + 256 MiB db.bin", file=sys.stderr)


def day(img, n, new_mib, writes):
    rnd = random.Random(1000 + n)
    files = pool_files(True)
    chosen, total = pick(files, rnd, (new_mib << 20) - (4 << 20))
    with tempfile.TemporaryDirectory() as d:
        cmds = [f"mkdir /day{n}"]
        for k, p in enumerate(chosen):
            cmds.append(f"write {p} /day{n}/{k:05d}-{os.path.basename(p).replace(' ', '_')}")
        rnd_path = os.path.join(d, "random.bin")
        with open(rnd_path, "wb") as o:
            o.write(prand(rnd, 4 << 20))
        cmds.append(f"write {rnd_path} /day{n}/random.bin")
        blocks = sorted(rnd.sample(range(256 * 256), writes * 2))
        cmds += [f"bmap /db.bin {b}" for b in blocks]
        cf = os.path.join(d, "cmds")
        with open(cf, "w") as o:
            o.write("\n".join(cmds) + "\n")
        r = subprocess.run(["debugfs", "-w", "-f", cf, img], check=True, capture_output=True, text=True)
    phys = [int(l) for l in r.stdout.splitlines() if l.strip().isdigit()]
    # 0 is a hole of db.bin (mkfs.ext4 -d keeps zero blocks sparse): never write there.
    phys = [p for p in phys if p > 0][:writes]
    if len(phys) != writes:
        sys.exit(f"debugfs gave {len(phys)} usable block numbers for {writes} writes")
    with open(img, "r+b") as f:
        for b in phys:
            f.seek(b * 4096)
            f.write(prand(rnd, 4096))
    print(f"day {n}: {total >> 20} MiB of new files + 4 MiB random, {writes} scattered 4 KiB writes", file=sys.stderr)


def changed(a, b):
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(1 << 20)
            y = fb.read(1 << 20)
            if not x and not y:
                break
            if x == y:
                continue
            if len(x) != len(y):
                n += abs(len(x) - len(y))
                m = min(len(x), len(y))
                x, y = x[:m], y[:m]
            z = (int.from_bytes(x, "little") ^ int.from_bytes(y, "little")).to_bytes(len(x), "little")
            n += len(z) - z.count(0)
    print(n)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "base":
        base(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "day":
        day(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "changed":
        changed(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
