"""Gathering concurrent requests into one engine call, whatever adapter each one names.

Ray Serve's `@serve.batch` splits every batch by multiplexed model id (ray/serve/batching.py,
`_split_batch_by_model_id`), so with multiplexing it never puts two adapters in one batch:
the very thing one forward pass over many adapters is for. This batcher keeps Serve's
multiplexed routing (requests go to replicas that hold their adapter) and batches across
adapters inside the replica.
"""

import asyncio
from collections.abc import Callable


class Batcher:
    def __init__(self, run: Callable[[list], list], max_batch_size: int, wait_s: float):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def submit(self, item):
        """`run([item, ...])[i]` for this item, run together with what arrives meanwhile."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._serve())
        future = loop.create_future()
        await self.queue.put((item, future))
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            live = [(item, f) for item, f in batch if not f.done()]  # cancelled ones dropped
            if not live:
                continue
            try:
                results = await loop.run_in_executor(None, self.run, [item for item, _ in live])
            except Exception as e:  # every request of the batch gets the error
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), result in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(result)
