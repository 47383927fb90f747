"""A mirror to READY while a guest writes through an NBD export, a copy-mode change, complete,
dismiss; the events in order. Usage: mirror_flow.py QMP_SOCKET SRC_IMAGE DST_IMAGE NBD_SOCKET
"""

import asyncio
import sys

from common import Session, report


async def main(qmp_path, src, dst, nbd):
    s = Session("mirror-flow")
    await s.connect(qmp_path)
    for name, path in (("src", src), ("dst", dst)):
        await s.run("blockdev-add", driver="file", **{"node-name": name + "-file"}, filename=path,
                    cache={"direct": True})
        await s.run("blockdev-add", driver="raw", **{"node-name": name}, file=name + "-file")
    await s.run("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
    await s.run("block-export-add", type="nbd", id="guest", **{"node-name": "src"}, writable=True)
    # The guest: 64 writes of 64 KiB through the export while the job runs.
    commands = []
    for index in range(64):
        commands += ["-c", f"write -P {index + 1} {(index * 97 % 256) * 65536} 64k"]
    guest = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", f"nbd+unix:///src?socket={nbd}", *commands,
        stdout=asyncio.subprocess.DEVNULL)
    await s.run("blockdev-mirror", **{"job-id": "m", "auto-dismiss": False}, device="src", target="dst",
                sync="full")
    await s.wait("BLOCK_JOB_READY", device="m")
    await s.run("block-job-change", id="m", type="mirror", **{"copy-mode": "write-blocking"})
    assert await guest.wait() == 0, "the guest's writes failed"
    jobs = await s.run("query-block-jobs")
    assert jobs[0]["device"] == "m" and jobs[0]["ready"], jobs
    await s.run("job-complete", id="m")
    completed = await s.wait("BLOCK_JOB_COMPLETED", device="m")
    assert "error" not in completed["data"], completed
    await s.wait("JOB_STATUS_CHANGE", id="m", status="concluded")
    await s.run("job-dismiss", id="m")
    await s.wait("JOB_STATUS_CHANGE", id="m", status="null")
    assert await s.run("query-block-jobs") == []
    await s.delete_export("guest")
    await s.run("nbd-server-stop")
    unknown = await s.error("blockdev-mirror", device="nosuch", target="dst", sync="full")
    missing = await s.error("job-pause")
    await s.close()
    report(events=s.seen, errors=[unknown["class"], missing["class"], missing["desc"]])


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
