"""What the QMP scripts share: a qemu.qmp client that records every event in order.

The scripts are ordinary qemu.qmp clients, as users write them for qemu-storage-daemon; the
tests run each one unchanged against qemu-storage-daemon and against tandemd. Each prints
one JSON object on stdout: the events it saw (name and, for JOB_STATUS_CHANGE, the status)
and whatever the test compares.
"""

import asyncio
import json
import sys

from qemu.qmp import EventListener, QMPClient

TIMEOUT_S = 120


class Session:
    def __init__(self, name):
        self.client = QMPClient(name)
        self.listener = EventListener()
        self.seen = []

    async def connect(self, path):
        await self.client.connect(path)
        self.client.register_listener(self.listener)

    async def run(self, command, **arguments):
        return await self.client.execute(command, arguments)

    async def error(self, command, **arguments):
        """The error class and text a command fails with (it must fail)."""
        from qemu.qmp import ExecuteError

        try:
            await self.client.execute(command, arguments)
        except ExecuteError as error:
            return {"class": error.error.error.class_, "desc": error.error.error.desc}
        raise AssertionError(f"{command} succeeded but must fail")

    async def delete_export(self, export_id):
        """block-export-del once no client uses the export (a client that just exited may still
        be counted for a moment; both daemons refuse a busy export in mode safe)."""
        from qemu.qmp import ExecuteError

        for _ in range(3000):
            try:
                await self.client.execute("block-export-del", {"id": export_id})
                break
            except ExecuteError as error:
                if "still in use" not in error.error.error.desc:
                    raise
                await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"export {export_id} stayed in use")
        await self.wait("BLOCK_EXPORT_DELETED", id=export_id)

    async def wait(self, name, **match):
        """Record events until `name` arrives with data matching `match`."""
        while True:
            event = await asyncio.wait_for(self.listener.get(), TIMEOUT_S)
            self.record(event)
            data = event.get("data", {})
            if event["event"] == name and all(data.get(k) == v for k, v in match.items()):
                return event

    def record(self, event):
        assert "timestamp" in event, event
        entry = event["event"]
        if entry == "JOB_STATUS_CHANGE":
            entry += ":" + event["data"]["status"]
        self.seen.append(entry)

    def drain(self):
        while not self.listener.empty():
            self.record(self.listener.get_nowait())

    async def close(self):
        self.drain()
        await self.client.disconnect()


def report(**fields):
    json.dump(fields, sys.stdout)
    sys.stdout.write("\n")
