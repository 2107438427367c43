"""One client per model at once, on a gateway whose budget fits one model at a time (used by
`make demo`): each answer is printed with how long it waited (time to its first token).

    python scripts/demo_timeshare.py BASE_URL MODEL [MODEL ...] [--seconds 15] [--max-tokens 16]

Every client sends streamed chat requests back to back for `--seconds` (at least one each),
with the official `openai` client. The gateway's scheduler lets the models take turns: one
holds the core while the other's requests wait in its queue, then it drains and the other is
brought up. Exit 1 if any request was not answered.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import openai


def client(base_url: str, model: str, seconds: float, max_tokens: int, t0: float,
           results: list[tuple[str, bool, float]], lock: threading.Lock) -> None:
    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=900,
                        max_retries=0)
    n = 0
    while n == 0 or time.monotonic() - t0 < seconds:
        n += 1
        sent = time.monotonic()
        first: float | None = None
        text = ""
        try:
            stream = api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Hello {n}"}],
                max_tokens=max_tokens, stream=True)
            for chunk in stream:
                if first is None:
                    first = time.monotonic() - sent
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            ok, what = True, repr(text[:24])
        except openai.APIError as exc:
            ok, what = False, f"FAILED: {exc}"
        waited = first if first is not None else time.monotonic() - sent
        with lock:
            results.append((model, ok, waited))
            print(f"  [{sent - t0:5.1f} s] {model:8} #{n}: waited {waited:5.1f} s, total "
                  f"{time.monotonic() - sent:5.1f} s  {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_url")
    p.add_argument("models", nargs="+")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    results: list[tuple[str, bool, float]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(args.base_url, m, args.seconds,
                                                      args.max_tokens, t0, results, lock))
               for m in args.models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("  per model: " + "; ".join(
        f"{m} {sum(ok for mm, ok, _ in results if mm == m)}/"
        f"{sum(mm == m for mm, _, _ in results)} answered, worst wait "
        f"{max((w for mm, _, w in results if mm == m), default=0.0):.1f} s"
        for m in args.models))
    return 0 if results and all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
