"""A full and two incremental backups through transactions and a dirty bitmap, while a guest
writes through an NBD export between them and during the first incremental (whose point in
time is when its transaction returned); each backup restored over the ones before and compared
with the disk at its instant (qemu-img compare).
Usage: incremental_flow.py QMP_SOCKET DIR   (DIR holds src.img and empty full/inc1/inc2.img)
"""

import asyncio
import os
import shutil
import subprocess
import sys

from common import Session, report

CHUNK = 65536


async def guest_writes(nbd, seed):
    commands = []
    for index in range(16):
        offset = ((index * 37 + seed * 11) % 256) * CHUNK
        commands += ["-c", f"write -P {(seed * 16 + index) % 255 + 1} {offset} 64k"]
    guest = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", f"nbd+unix:///src?socket={nbd}", *commands, stdout=asyncio.subprocess.DEVNULL)
    assert await guest.wait() == 0, "the guest's writes failed"


def snapshot(nbd, path):
    """The disk as the guest sees it now, through the export."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///src?socket={nbd}", path],
                   check=True)


def data_extents(path):
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", path], check=True,
                         capture_output=True, text=True).stdout
    import json
    return [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]


def replay(incremental, restored):
    with open(incremental, "rb") as source, open(restored, "r+b") as target:
        for start, length in data_extents(incremental):
            source.seek(start)
            target.seek(start)
            target.write(source.read(length))


def identical(a, b):
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b]).returncode == 0


async def backup(s, job, target, sync, during=None, **extra):
    """Start a backup by a transaction; run `during` (guest writes) while it runs."""
    action = {"type": "blockdev-backup",
              "data": {"job-id": job, "device": "src", "target": target, "sync": sync, **extra}}
    actions = [action]
    if sync == "full":
        actions.insert(0, {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}})
    await s.run("transaction", actions=actions)
    if during is not None:
        await during
    completed = await s.wait("BLOCK_JOB_COMPLETED", device=job)
    assert "error" not in completed["data"], completed


async def main(qmp_path, work):
    path = lambda name: os.path.join(work, name)
    nbd = path("nbd.sock")
    s = Session("incremental-flow")
    await s.connect(qmp_path)
    for name in ("src", "full", "inc1", "inc2"):
        await s.run("blockdev-add", driver="file", **{"node-name": name + "-file"}, filename=path(name + ".img"),
                    cache={"direct": True})
        await s.run("blockdev-add", driver="raw", **{"node-name": name}, file=name + "-file")
    await s.run("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
    await s.run("block-export-add", type="nbd", id="guest", **{"node-name": "src"}, writable=True)
    await backup(s, "full", "full", "full")
    snapshot(nbd, path("at0.img"))
    await guest_writes(nbd, 1)
    snapshot(nbd, path("at1.img"))
    # Slowed, so the guest's writes (over the clusters it is copying, too) land while it runs:
    # copy-before-write keeps them out of it, and b0 records them for the next one.
    await backup(s, "inc1", "inc1", "incremental", bitmap="b0", speed=512 * 1024, during=guest_writes(nbd, 3))
    await guest_writes(nbd, 2)
    await backup(s, "inc2", "inc2", "incremental", bitmap="b0")
    snapshot(nbd, path("at2.img"))
    bitmaps = [n for n in await s.run("query-named-block-nodes") if n["node-name"] == "src"][0]["dirty-bitmaps"]
    aborted = await s.error("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "never"}},
        {"type": "abort", "data": {}}])
    after = [n for n in await s.run("query-named-block-nodes") if n["node-name"] == "src"][0]["dirty-bitmaps"]
    await s.delete_export("guest")
    await s.run("nbd-server-stop")
    await s.close()
    # Restore each instant from the chain.
    shutil.copyfile(path("full.img"), path("restored.img"))
    results = [identical(path("restored.img"), path("at0.img"))]
    replay(path("inc1.img"), path("restored.img"))
    results.append(identical(path("restored.img"), path("at1.img")))
    replay(path("inc2.img"), path("restored.img"))
    results.append(identical(path("restored.img"), path("at2.img")))
    report(events=s.seen, restored=results, bitmaps=[b["name"] for b in bitmaps],
           aborted=aborted["desc"], bitmaps_after_abort=[b["name"] for b in after])


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
