"""The server's worker (frontends/server/worker.py) over the real engine and scheduler: requests that
arrive together are started together, so their prompts are evaluated in one decode, not one after
another (the 4th client's first token would wait for three prompts). Their system prompts differ: requests
sharing a long prompt start are staggered on purpose, the first evaluating it for the others to copy
(tests/runtime/test_scheduler.py)."""

from __future__ import annotations

import asyncio

from edgelora import Engine
from edgelora.frontends.server.app import Service
from edgelora.roles.session import Roles
from edgelora.runtime.llama import Context

PROMPTS = ["What is the moon?", "Name three fruits.", "Why is the sea salty?"]
SYSTEMS = ["Answer as a poet.", "Be brief.", "Explain it to a child."]


def test_requests_that_arrive_together_have_their_prompts_evaluated_in_one_decode(smol_path, monkeypatch):
    with Engine(smol_path, n_ctx=512, parallel=3, n_threads=2) as eng:
        service = Service(eng, Roles(eng))
        decodes = []  # per decode: {seq_id: tokens it evaluated}
        decode = Context.decode

        def recording_decode(context, batch):
            seqs = [batch.batch.seq_id[i][0] for i in range(batch.n)]
            decodes.append({s: seqs.count(s) for s in set(seqs)})
            return decode(context, batch)

        monkeypatch.setattr(Context, "decode", recording_decode)
        jobs = [service.chat_job({"model": "base", "max_tokens": 4, "temperature": 0,
                                  "messages": [{"role": "system", "content": system}, {"role": "user", "content": p}]})
                for system, p in zip(SYSTEMS, PROMPTS)]

        async def arrive_together():
            with eng.session():  # the worker's first job waits here while the other two arrive
                tasks = [asyncio.create_task(service.run_job(run)) for run in jobs]
                await asyncio.sleep(0.3)
            return await asyncio.gather(*tasks)

        results = asyncio.run(arrive_together())
        assert all(r["text"] for r in results)
        first = decodes[0]
        assert len(first) == 3 and all(n > 1 for n in first.values()), decodes[:3]  # 3 whole prompts at once
        assert len(decodes) == 4, len(decodes)  # then each decode steps all three: 1 prompt step + 3 tokens
