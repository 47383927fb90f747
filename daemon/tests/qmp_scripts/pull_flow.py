"""Pull-mode backup over NBD, as libvirt and virtnbdbackup do it with qemu-storage-daemon: a
copy-before-write node over the disk saving to a fleecing image, a snapshot-access node, and an
NBD export of it with the bitmap as a qemu:dirty-bitmap context. The guest keeps writing through
an export of the live disk (the copy-before-write node, whose creation is the point in time);
nbdcopy reads the point in time and
nbdinfo --map lists what the bitmap marks.
Usage: pull_flow.py QMP_SOCKET DIR   (DIR holds src.img and an empty fleece.img)
"""

import asyncio
import json
import os
import subprocess
import sys

from common import Session, report

CHUNK = 65536


async def guest_writes(uri, seed, offsets):
    commands = []
    for index, chunk in enumerate(offsets):
        commands += ["-c", f"write -P {(seed * 16 + index) % 255 + 1} {chunk * CHUNK} 64k"]
    guest = await asyncio.create_subprocess_exec("qemu-io", "-f", "raw", uri, *commands,
                                                 stdout=asyncio.subprocess.DEVNULL)
    assert await guest.wait() == 0, "the guest's writes failed"


async def main(qmp_path, work):
    path = lambda name: os.path.join(work, name)
    nbd = path("nbd.sock")
    uri = lambda export: f"nbd+unix:///{export}?socket={nbd}"
    s = Session("pull-flow")
    await s.connect(qmp_path)
    for name in ("src", "fleece"):
        await s.run("blockdev-add", driver="file", **{"node-name": name + "-file"}, filename=path(name + ".img"),
                    cache={"direct": True})
        await s.run("blockdev-add", driver="raw", **{"node-name": name}, file=name + "-file")
    await s.run("block-dirty-bitmap-add", node="src", name="b0")
    await s.run("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
    await s.run("block-export-add", type="nbd", id="pre", **{"node-name": "src"}, name="pre", writable=True)
    await guest_writes(uri("pre"), 1, [3, 4, 100])  # before the point in time: in b0
    await s.delete_export("pre")
    # The point in time: the bitmap stops, the copy-before-write node goes on, and from now on
    # the guest writes through it.
    await s.run("transaction", actions=[
        {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b0"}}])
    await s.run("blockdev-add", driver="copy-before-write", **{"node-name": "cbw"}, file="src", target="fleece")
    await s.run("blockdev-add", driver="snapshot-access", **{"node-name": "snap"}, file="cbw")
    await s.run("block-export-add", type="nbd", id="live", **{"node-name": "cbw"}, name="live", writable=True)
    subprocess.run(["nbdcopy", uri("live"), path("expected.img")], check=True)  # nobody writes yet
    await s.run("block-export-add", type="nbd", id="backup", **{"node-name": "snap"}, name="backup",
                bitmaps=[{"node": "src", "name": "b0"}])
    await guest_writes(uri("live"), 2, [3, 50, 200])  # after: saved to the fleece first
    subprocess.run(["nbdcopy", uri("backup"), path("got.img")], check=True)
    identical = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", path("got.img"),
                                path("expected.img")]).returncode == 0
    out = subprocess.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:b0", uri("backup")], check=True,
                         capture_output=True, text=True).stdout
    dirty = [[e["offset"], e["length"]] for e in json.loads(out) if e["type"] & 1]
    for export in ("backup", "live"):
        await s.delete_export(export)
    for node in ("snap", "cbw"):
        await s.run("blockdev-del", **{"node-name": node})
    await s.run("nbd-server-stop")
    await s.close()
    report(events=s.seen, identical=identical, dirty=dirty)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
