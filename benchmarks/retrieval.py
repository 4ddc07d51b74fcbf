"""What does retrieval routing cost per query with thousands of experts?

:class:`~molora.routers.RetrievalRouter` scores a batch of queries against all expert keys in one
``[B, 384] x [384, E]`` matmul followed by ``topk`` (LoraRetriever's cosine top-k, k = 3). We time,
in one run and per query:

* ``router``: the router's forward (normalise, one matmul, top-k, softmax over the k kept);
* ``loop``: a per-expert loop of ``cosine_similarity`` (what a straightforward implementation
  does), then the same top-k;
* ``encoder``: the all-MiniLM-L6-v2 forward that produces the query embedding of a 32-token
  prompt (what a caller pays anyway, for scale).

Keys and queries are random unit vectors except that each query is a noisy copy of one key, so
the benchmark also checks that the right expert comes first. Best of repeated runs (robust to other load on the machine).

Run: ``python benchmarks/retrieval.py`` (writes ``benchmarks/results/retrieval.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from molora.context import RoutingSignals
from molora.routers import RetrievalRouter

DIM = 384


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # timeit's convention: the least disturbed run (other load only adds)


def encoder_seconds(batch: int, repeats: int) -> float | None:
    try:
        from molora.encoder import load_encoder
    except ImportError:  # pragma: no cover
        return None
    try:
        model, _ = load_encoder()
    except Exception:  # the encoder package is an extra: skip its column without it
        return None
    ids = torch.randint(1000, 5000, (batch, 32))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return best_seconds(lambda: model(input_ids=ids, attention_mask=mask), repeats)


def run(num_keys: int, batch: int, repeats: int, seed: int = 0, hnsw: bool = False, ef_search: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(num_keys, DIM, generator=g), dim=-1)
    truth = torch.randint(0, num_keys, (batch,), generator=g)
    queries = keys[truth] + 0.05 * torch.randn(batch, DIM, generator=g)
    router = RetrievalRouter(num_keys, DIM, top_k=3).eval()
    router.set_keys(keys)
    signals = RoutingSignals(embeddings=queries)

    with torch.no_grad():
        decision = router(queries, signals)
        t_router = best_seconds(lambda: router(queries, signals), repeats)

        def loop() -> torch.Tensor:
            q = F.normalize(queries, dim=-1)
            sims = torch.stack([F.cosine_similarity(q, router.keys[e].unsqueeze(0), dim=-1) for e in range(num_keys)], dim=1)
            return sims.topk(3, dim=-1).indices

        loop_indices = loop()
        t_loop = best_seconds(loop, max(1, repeats // 10))
    row_hnsw = {}
    if hnsw:
        approx = RetrievalRouter(num_keys, DIM, top_k=3, search="hnsw", ef_search=ef_search).eval()
        approx.set_keys(keys)
        with torch.no_grad():
            t0 = time.perf_counter()
            found = approx(queries, signals).indices            # the first call builds the index
            build = time.perf_counter() - t0
            t_hnsw = best_seconds(lambda: approx(queries, signals), repeats)
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, decision.indices)) / found.numel()
        row_hnsw = {"hnsw_us_per_query": 1e6 * t_hnsw / batch, "hnsw_build_s": build, "hnsw_recall_at_3": recall,
                    "hnsw_top1_equal_exact": float((found[:, 0] == decision.indices[:, 0]).float().mean()),
                    "exact_over_hnsw": t_router / t_hnsw, "ef_search": ef_search}
    return {
        **row_hnsw,
        "keys": num_keys,
        "batch": batch,
        "router_us_per_query": 1e6 * t_router / batch,
        "loop_us_per_query": 1e6 * t_loop / batch,
        "loop_over_router": t_loop / t_router,
        "top1_correct": float((decision.indices[:, 0] == truth).float().mean()),
        "same_as_loop": bool(torch.equal(decision.indices.sort(-1).values, loop_indices.sort(-1).values)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--hnsw", action="store_true", help="also the faiss HNSW index (search='hnsw'): latency and recall@3")
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "retrieval.json"))
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [run(k, b, args.repeats, hnsw=args.hnsw, ef_search=args.ef_search) for k in args.keys for b in args.batch]
    enc = {b: encoder_seconds(b, max(3, args.repeats // 5)) for b in args.batch}
    for row in rows:
        e = enc[row["batch"]]
        row["encoder_us_per_query"] = None if e is None else 1e6 * e / row["batch"]
        row["router_over_encoder"] = None if e is None else row["router_us_per_query"] / row["encoder_us_per_query"]

    header = f"{'keys':>6} {'batch':>5} {'router us/q':>12} {'loop us/q':>11} {'loop/router':>11} {'encoder us/q':>13} {'router/encoder':>15} {'top-1 ok':>8}"
    print(header)
    for r in rows:
        enc_us = "n/a" if r["encoder_us_per_query"] is None else f"{r['encoder_us_per_query']:.0f}"
        ratio = "n/a" if r["router_over_encoder"] is None else f"{r['router_over_encoder']:.3f}"
        print(f"{r['keys']:>6} {r['batch']:>5} {r['router_us_per_query']:>12.1f} {r['loop_us_per_query']:>11.1f} "
              f"{r['loop_over_router']:>10.0f}x {enc_us:>13} {ratio:>15} {r['top1_correct']:>8.2f}")
        if "hnsw_us_per_query" in r:
            print(f"{'':>6} {'':>5} hnsw {r['hnsw_us_per_query']:.1f} us/q (exact/hnsw {r['exact_over_hnsw']:.1f}x), "
                  f"recall@3 {r['hnsw_recall_at_3']:.3f}, top-1 as exact {r['hnsw_top1_equal_exact']:.2f}, index built in {r['hnsw_build_s']:.1f} s")
        assert r["same_as_loop"], "the router and the loop disagree on the top-3 experts"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "key_dim": DIM, "top_k": 3, "repeats": args.repeats}
    out.write_text(json.dumps({"setup": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
