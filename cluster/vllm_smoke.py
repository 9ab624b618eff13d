"""Smoke test of `backend: vllm` on a real GPU cluster: the serving API tests' requests against
a deployed app, each printed as PASS or FAIL. Not yet run on a GPU cluster (see README).

    # on the cluster's image: make vllm-env KIND=gpu (or the image's own vLLM environment)
    ftservice serve deploy serve/quickstart.yaml backend=vllm replicas.gpus=1 \\
        vllm.python=/opt/ftservice/.venv-vllm/bin/python --address http://HEAD:8265 --wait 900
    python cluster/vllm_smoke.py --url http://HEAD:8000 --key "$FTSERVICE_API_KEY" \\
        --base smollm2-135m-instruct --adapter quickstart

Exit status: the number of failed checks.
"""

from __future__ import annotations

import argparse
import sys
import time

import openai


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the app's URL, without /v1")
    parser.add_argument("--key", required=True, help="an inference (and admin) key")
    parser.add_argument("--base", required=True, help="the base's name on the API")
    parser.add_argument("--adapter", required=True, help="a servable adapter's name")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.key, max_retries=0)
    question = [{"role": "user", "content": "Who founded Brindlewood Instruments?"}]
    failed = 0

    def check(what: str, fn) -> None:
        nonlocal failed
        t0 = time.perf_counter()
        try:
            detail = fn()
            print(f"PASS {what} ({time.perf_counter() - t0:.2f} s) {detail or ''}")
        except Exception as e:  # a smoke test reports every failure and goes on
            failed += 1
            print(f"FAIL {what}: {type(e).__name__}: {e}")

    def models():
        ids = {m.id for m in client.models.list().data}
        assert {args.base, args.adapter} <= ids, ids
        return sorted(ids)

    def answer(model: str) -> str:
        out = client.chat.completions.create(model=model, messages=question, temperature=0,
                                             max_tokens=32)  # fmt: skip
        assert out.choices[0].message.content and out.usage.completion_tokens > 0
        return out.choices[0].message.content

    def chat(model: str):
        return repr(answer(model)[:80])

    def stream():
        chunks = list(client.chat.completions.create(
            model=args.adapter, messages=question, temperature=0, max_tokens=32, stream=True,
            stream_options={"include_usage": True}))  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer(args.adapter), "the stream differs from the answer"
        assert chunks[-1].usage.completion_tokens > 0
        return f"{len(chunks)} chunks"

    def echo():
        out = client.completions.create(model=args.adapter, prompt="The warranty covers",
                                        max_tokens=1, echo=True, logprobs=1)  # fmt: skip
        lps = out.choices[0].logprobs.token_logprobs
        assert lps[0] is None and all(lp is not None for lp in lps[1:])
        return f"{len(lps)} token logprobs"

    def unknown():
        try:
            client.chat.completions.create(model="no-such-adapter", messages=question)
        except openai.NotFoundError as e:
            return e.body["code"]
        raise AssertionError("an unknown model was answered")

    def mixed():
        from concurrent.futures import ThreadPoolExecutor

        alone = answer(args.base)
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(answer, [args.base, args.adapter] * 4))
        assert all(o == alone for o in outs[0::2]), "a base row batched with adapters changed"
        return "base rows equal the base alone"

    check("models list the base and the adapter", models)
    check("chat with the base", lambda: chat(args.base))
    check("chat with the adapter", lambda: chat(args.adapter))
    check("a stream with usage", stream)
    check("completions with echo and logprobs", echo)
    check("an unknown model answers 404", unknown)
    check("base and adapter requests batched together", mixed)
    print(f"{failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(main())
