#!/usr/bin/env bash
# The demo: builds dsync, makes a 1 GiB ext4 disk image with real files,
# backs up four "days" of use, lists the snapshots, restores the oldest, then
# mounts every version and copies the oldest out of the mount with qemu-img,
# checking each copy byte for byte. Everything happens in a temporary
# directory (DEMO_DIR to keep it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
dsync="$PWD/target/release/dsync"
gen="$PWD/scripts/gen-disk.py"
work="${DEMO_DIR:-$(mktemp -d)}"
mkdir -p "$work"
cleanup() {
  fusermount3 -u "$work/mnt" 2>/dev/null || true
  [ -n "${DEMO_DIR:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
fusermount3 -u mnt 2>/dev/null || true
rm -rf repo vm mnt restored

echo "== building a 1 GiB ext4 disk image with ~400 MiB of files"
mkdir -p vm
python3 "$gen" base vm/disk.img 1024 400
cp --sparse=always vm/disk.img day0.img

echo "== day 0: first backup"
"$dsync" backup repo vm/disk.img
for day in 1 2 3; do
  echo "== day $day: new files and 200 scattered 4 KiB writes, then an incremental backup"
  python3 "$gen" day vm/disk.img "$day" 20 200
  "$dsync" backup repo vm/disk.img
done

echo "== the snapshots"
"$dsync" list repo

oldest=$("$dsync" list repo --json | head -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "== restoring the oldest snapshot ($oldest) as fast as the newest"
time "$dsync" restore repo "$oldest" --to restored
cmp restored/disk.img day0.img
echo "== restored/disk.img is byte-identical to day 0's image"
du -h --apparent-size restored/disk.img | sed 's/^/   apparent: /'
du -h restored/disk.img | sed 's/^/   on disk:  /'
echo "== repository size"
du -sh repo

echo "== mounting every version read-only at $work/mnt"
mkdir -p mnt
"$dsync" mount repo mnt --daemon
ls -l mnt
first=$(ls mnt | grep T | sort | head -n 1)
echo "== qemu-img convert straight from the mount: mnt/$first/disk.img"
time qemu-img convert -f raw -O raw "mnt/$first/disk.img" from-mount.img
cmp from-mount.img day0.img
echo "== from-mount.img is byte-identical to day 0's image"
fusermount3 -u mnt
