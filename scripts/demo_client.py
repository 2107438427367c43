"""Call the gateway with the official `openai` client, as a user would (used by `make demo`).

    python scripts/demo_client.py [BASE_URL]      (default http://127.0.0.1:8000)

A non-streamed chat to tiny-a (through its alias gpt-4o-mini), a completion, and a chat
streamed from tiny-b printed token by token as it arrives, with the time to first token.
"""

from __future__ import annotations

import sys
import time

import openai


def main(base_url: str = "http://127.0.0.1:8000") -> int:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=300)
    print("models:", ", ".join(m.id for m in client.models.list()))

    t0 = time.perf_counter()
    chat = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}], max_tokens=12)
    print(f"\nchat (model gpt-4o-mini -> {chat.model}, {time.perf_counter() - t0:.2f} s):")
    print(f"  {chat.choices[0].message.content!r}  [{chat.usage.completion_tokens} tokens]")

    comp = client.completions.create(model="tiny-a", prompt="Once upon a time", max_tokens=8)
    print(f"\ncompletion (tiny-a): {comp.choices[0].text!r}")

    print("\nstream (tiny-b), printed as it arrives:\n  ", end="", flush=True)
    t0 = time.perf_counter()
    first = None
    chunks = 0
    stream = client.chat.completions.create(
        model="tiny-b", messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=40, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            chunks += 1
            print(chunk.choices[0].delta.content, end="", flush=True)
    total = time.perf_counter() - t0
    print(f"\n  [{chunks} chunks; first token after {first or 0:.3f} s, all in {total:.2f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
